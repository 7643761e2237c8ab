"""Sections of judgements: stored hypothesis tests, and the advisor's advice.

A study's analyses are the results ``lg.analysis.analyze`` stores under
``<study>/analysis/<hypothesis>/``; a run's advice is a result stored under
``<run>/advice/`` with a field ``recommendations`` (a list of dicts with
``rule``, ``message``, ``evidence``, ``expected_effect`` and ``change``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lossgeom._results import load_result
from lossgeom.report._document import (
    Bullets,
    Heading,
    Items,
    Note,
    Section,
    Table,
    Text,
    attempt,
    fmt,
    short_json,
)
from lossgeom.report._sections import Methods

__all__ = ["advice_section", "hypotheses_section"]

_TEST_HEADER = [
    "#",
    "claim",
    "test",
    "n",
    "effect",
    "confidence interval",
    "p (raw)",
    "p (Holm)",
    "verdict",
]


def _test_row(i: int, t: Any) -> list[str]:
    return [
        str(i),
        str(t.claim),
        str(t.test),
        fmt(t.n),
        f"{t.effect_name} = {fmt(t.effect)}",
        f"[{fmt(t.ci_low)}, {fmt(t.ci_high)}] ({fmt(100 * t.confidence, 3)}%)",
        fmt(t.p_value, 3),
        "n/a" if t.p_adjusted is None else fmt(t.p_adjusted, 3),
        str(t.verdict),
    ]


def _hypothesis_blocks(h: Any, methods: Methods) -> list:
    methods.add(str(h.hypothesis), h)
    blocks: list = [Heading(f"{h.hypothesis}: {h.claim}")]
    facts = [("verdict", str(h.verdict))]
    if h.held_fixed:
        facts.append(("held fixed", "; ".join(map(str, h.held_fixed))))
    blocks.append(Items(facts))
    rows = []
    for i, t in enumerate(h.tests, start=1):
        rows.append(_test_row(i, t))
        methods.add(f"{h.hypothesis} tests", t)
    blocks.append(
        Table(
            _TEST_HEADER,
            rows,
            f"The tests of {h.hypothesis}, Holm-adjusted as one family; the verdict "
            "is supported when every test is, contradicted when any test is, "
            "inconclusive otherwise.",
        )
    )
    caveats = [str(c) for c in h.caveats]
    for i, t in enumerate(h.tests, start=1):
        caveats += [f"test {i}: {c}" for c in t.caveats]
    if caveats:
        blocks.append(Bullets(caveats, "Caveats:"))
    return blocks


def hypotheses_section(study_dir: Path, methods: Methods) -> Section | None:
    """Every stored hypothesis result of ``study_dir/analysis/*/``, or ``None``."""
    folder = study_dir / "analysis"
    found = sorted(p for p in folder.glob("*") if p.is_dir()) if folder.is_dir() else []
    if not found:
        return None
    blocks: list = []
    for where in found:
        notes: list = []
        result = attempt(
            notes,
            f"the stored analysis {where.name} ({where})",
            f"run it again: lossgeom analyze {study_dir} --hypothesis {where.name}",
            lambda where=where: load_result(where),
        )
        if result is None:
            blocks += notes
        elif not hasattr(result, "tests") or not hasattr(result, "verdict"):
            blocks.append(
                Note(
                    f"{where} holds a {type(result).__name__}, not a hypothesis "
                    "result; it is left out.",
                    kind="damaged",
                )
            )
        else:
            blocks += _hypothesis_blocks(result, methods)
    return Section("hypotheses", "Hypotheses", blocks)


def _get(rec: Any, key: str) -> Any:
    return rec.get(key) if isinstance(rec, Mapping) else getattr(rec, key, None)


def _pairs(value: Any, sep: str) -> str:
    if not isinstance(value, Mapping):
        return "" if value is None else short_json(value)
    parts = []
    for k, v in value.items():
        shown = fmt(v) if isinstance(v, (int, float)) else short_json(v, 80)
        parts.append(f"{k}{sep}{shown}")
    return "; ".join(parts)


def _not_evaluated(result: Any) -> list:
    """The rules the advisor could not evaluate, with what would turn them on."""
    details = getattr(result, "details", None) or {}
    missing = details.get("not_evaluated") if isinstance(details, Mapping) else None
    if not isinstance(missing, Mapping) or not missing:
        return []
    lines = []
    for rule, why in missing.items():
        why = why if isinstance(why, Mapping) else {"reason": why}
        text = f"{rule}: {why.get('reason', '')}"
        if why.get("enable"):
            text += f"; turn on: {'; '.join(map(str, why['enable']))}"
        lines.append(text)
    return [Bullets(lines, "Rules not evaluated:")]


def _advice_blocks(label: str, result: Any) -> list:
    recs = getattr(result, "recommendations", None)
    if recs is None:
        return [
            Note(
                f"{label}: the stored advice ({type(result).__name__}) has no field "
                "recommendations; it is left out.",
                kind="damaged",
            )
        ]
    if not recs:
        return [
            Text(f"{label}: the advisor ran and recommends no change."),
            *_not_evaluated(result),
        ]
    rows = [
        [
            str(_get(r, "rule") or ""),
            str(_get(r, "message") or ""),
            _pairs(_get(r, "evidence"), " = "),
            str(_get(r, "expected_effect") or ""),
            _pairs(_get(r, "change"), ": "),
        ]
        for r in recs
    ]
    header = ["rule", "advice", "evidence", "expected effect", "change (config)"]
    return [Table(header, rows, f"Advice for {label}."), *_not_evaluated(result)]


def advice_section(found: list[tuple[str, Path]], methods: Methods) -> Section | None:
    """The advice stored in each ``(label, folder)``, or ``None`` when there is none."""
    if not found:
        return None
    blocks: list = []
    for label, where in found:
        result = attempt(
            blocks,
            f"the stored advice of {label} ({where})",
            "run the advisor again on the run",
            lambda where=where: load_result(where),
        )
        if result is not None:
            methods.add("advice", result)
            blocks += _advice_blocks(label, result)
    return Section("advice", "Advice", blocks)
