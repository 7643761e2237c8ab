"""What every hypothesis analysis shares: its result, its verdict, its study readers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd

from lossgeom._results import Result
from lossgeom.analysis._base import TestResult

__all__ = ["HypothesisResult"]


@dataclass(frozen=True, kw_only=True, eq=False)
class HypothesisResult(Result):
    """A hypothesis tested on a study: its tests, verdict and caveats.

    Attributes:
        hypothesis: its label (``H1`` ... ``H5``).
        claim: the hypothesis in words.
        study: the study directory analysed.
        tests: one test per link or measure (Holm-adjusted as a family).
        verdict: ``supported`` when every test is, ``contradicted`` when any
            test is, ``inconclusive`` otherwise.
        held_fixed: what the compared runs share.
        caveats: what to keep in mind reading the verdict.
        data: the paired values each test used, by test claim.
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`.
    """

    hypothesis: str
    claim: str
    study: str
    tests: list[TestResult]
    verdict: str
    held_fixed: list[str] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    definition: str = field(
        default="a hypothesis of the research program tested on paired runs of a "
        "study; see docs/hypotheses.md",
        kw_only=True,
    )
    bulky: ClassVar[tuple[str, ...]] = ()

    def scalars(self) -> dict[str, float]:
        """Each test's effect and p-value, by its position."""
        out: dict[str, float] = {}
        for i, t in enumerate(self.tests):
            out[f"test{i}_effect"] = float(t.effect)
            out[f"test{i}_p"] = float(t.p)
        return out

    def summary(self) -> str:
        """The verdict, each test on a line, then the caveats."""
        lines = [f"{self.hypothesis}: {self.claim}", f"  verdict: {self.verdict}"]
        lines += [f"  - {t.summary()}" for t in self.tests]
        if self.held_fixed:
            lines.append("  held fixed: " + "; ".join(self.held_fixed))
        lines += [f"  caveat: {c}" for c in self.caveats]
        return "\n".join(lines)


def _overall(tests: list[TestResult]) -> str:
    verdicts = {t.verdict for t in tests}
    if verdicts == {"supported"}:
        return "supported"
    if "contradicted" in verdicts:
        return "contradicted"
    return "inconclusive"


def _final(path: str | os.PathLike) -> pd.DataFrame:
    """One row per finished or diverged run: its last measured value of each column."""
    from lossgeom import study

    frame = study.load(path)
    frame = frame[frame["status"].isin(["finished", "diverged"])]
    runs = study.runs(path).set_index("run_id")
    final = frame.sort_values("step", kind="stable").groupby("run_id").last()
    final["stopped"] = runs.loc[final.index, "stopped"]
    return final


def _overrides(path: str | os.PathLike) -> dict[str, dict]:
    from lossgeom.study._store import INDEX, connect

    con = connect(Path(path) / INDEX, readonly=True)
    try:
        rows = con.execute("SELECT run_id, overrides FROM runs").fetchall()
    finally:
        con.close()
    return {r[0]: json.loads(r[1]) for r in rows}


def _pairs_by(
    final: pd.DataFrame, overrides: dict[str, dict], axis: str, low, high
) -> list[tuple[str, str]]:
    """``(run at low, run at high)`` of the runs equal but for ``axis``, same seed."""
    keyed: dict[str, dict] = {}
    for run_id, row in final.iterrows():
        other = {k: v for k, v in overrides[run_id].items() if k != axis}
        key = json.dumps([other, int(row["seed"])], sort_keys=True)
        keyed.setdefault(key, {})[row[axis]] = run_id
    return [(d[low], d[high]) for d in keyed.values() if low in d and high in d]


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _column(final: pd.DataFrame, names: tuple[str, ...], what: str, fix: str) -> str:
    for name in names:
        if name in final.columns and final[name].notna().any():
            return name
    raise ValueError(
        f"the study has no {what} (looked for columns {list(names)}); {fix}"
    )
