"""Reading a run directory into a report: which directory it is, what it holds.

:func:`detect` tells a run directory from a study directory; :func:`run_document`
reads a run's config, status, metrics, stored probe results and advice into a
:class:`~lossgeom.report._document.Document`. What is missing or damaged
becomes a note in its section, and the rest is still read.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lossgeom.report._document import (
    Code,
    Curves,
    Document,
    Figure,
    Note,
    Section,
    Series,
    Text,
    attempt,
    fmt,
    guarded,
)
from lossgeom.report._sections import Methods, Stored, load_stored, probe_sections
from lossgeom.report._training import _column
from lossgeom.report._verdicts import advice_section

__all__ = [
    "PANELS",
    "WHAT_DIRECTORIES",
    "detect",
    "read_yaml_text",
    "run_document",
    "status_of",
]

RUN_FILES = ("config.yaml", "metrics.jsonl", "status.json")
STUDY_FILES = ("study.yaml", "study.json", "index.sqlite")
WHAT_DIRECTORIES = (
    "A run directory (written by `lossgeom train CONFIG.yaml --out DIR`, or a "
    "study's runs/<id>/) holds config.yaml, metrics.jsonl and status.json; a "
    "study directory (written by `lossgeom study run STUDY.yaml --out DIR`) holds "
    "study.yaml, index.sqlite and runs/."
)
_TRAIN = "lossgeom train CONFIG.yaml --out DIR"

#: The training panels: ``(id, title, y label, [(column, label, dash)], caption)``.
PANELS: tuple[tuple[str, str, str, list[tuple[str, str, str]], str], ...] = (
    (
        "loss",
        "Loss",
        "loss",
        [("train_loss", "train", "solid"), ("test_loss", "test", "dot")],
        "Training (solid) and test (dotted) loss against the step.",
    ),
    (
        "accuracy",
        "Accuracy",
        "accuracy",
        [("train_accuracy", "train", "solid"), ("test_accuracy", "test", "dot")],
        "Training (solid) and test (dotted) accuracy against the step.",
    ),
    (
        "sharpness",
        "Sharpness and the edge of stability",
        "eigenvalue",
        [
            ("sharpness", "lambda_max(H)", "solid"),
            ("preconditioned_sharpness", "lambda_max(P^-1 H)", "solid"),
            ("eos_threshold", "edge of stability", "dash"),
        ],
        "The top Hessian eigenvalue lambda_max against the stability threshold "
        "the run recorded (dashed; 2 / lr for gradient descent and SGD).",
    ),
    (
        "trace",
        "Hessian trace",
        "tr(H)",
        [("trace", "tr(H)", "solid")],
        "The Hessian trace tr(H) (lg.trace on the probe objective).",
    ),
)


def detect(path: Path) -> str:
    """``"run"`` or ``"study"``: which kind of directory ``path`` is.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a file, or a directory of neither kind (the
            message says what each kind holds).
    """
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist. {WHAT_DIRECTORIES}")
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not a directory. {WHAT_DIRECTORIES}")
    if any((path / f).exists() for f in STUDY_FILES):
        return "study"
    if any((path / f).exists() for f in RUN_FILES):
        return "run"
    raise ValueError(
        f"{path} is neither a run directory nor a study directory: it holds none "
        f"of {', '.join(RUN_FILES + STUDY_FILES)}. {WHAT_DIRECTORIES}"
    )


def read_yaml_text(path: Path) -> tuple[str, Any]:
    """A YAML file's text and its content (safe loading; plain data only)."""
    import yaml

    text = path.read_text(encoding="utf-8")
    return text, yaml.safe_load(text)


def read_rows(run_dir: Path) -> tuple[list[dict], list[str]]:
    """The metrics rows of a run and the warnings about damaged lines."""
    from lossgeom.train import MetricsLog

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = MetricsLog(run_dir / "metrics.jsonl").read()
    return rows, [str(w.message) for w in caught]


def run_curves(rows: list[dict]) -> list[Figure]:
    """One curves figure per training panel the rows hold data for."""
    figures = []
    for _, title, ylabel, lines, caption in PANELS:
        series = []
        for i, (column, label, dash) in enumerate(lines):
            steps, values = _column(rows, column)
            if not steps.size:
                continue
            lo = hi = None
            se_steps, se = _column(rows, f"{column}_stderr")
            if se_steps.size == steps.size and np.array_equal(se_steps, steps):
                lo, hi = values - se, values + se
            if column == "eos_threshold":
                formulas = {str(r["eos_formula"]) for r in rows if r.get("eos_formula")}
                label += f" ({', '.join(sorted(formulas))})" if formulas else ""
            group = -1 if dash == "dash" else i
            series.append(Series(label, steps, values, lo, hi, group, dash))
        if series and any(s.dash != "dash" for s in series):
            figures.append(
                Figure(
                    "curves",
                    title,
                    Curves(ylabel, series),
                    caption + _extra(rows, title),
                )
            )
    return figures


def _extra(rows: list[dict], title: str) -> str:
    """What a panel's caption adds for this run: unconverged estimates, divergence."""
    out = ""
    if title == "Hessian trace" and any("trace_stderr" in r for r in rows):
        out += " The band is one standard error of the estimate either side."
    if title.startswith("Sharpness"):
        bad = sum(1 for r in rows if r.get("sharpness_converged") is False)
        if bad:
            out += f" {bad} sharpness estimate(s) did not converge."
    diverged = [r.get("step") for r in rows if r.get("diverged")]
    if diverged:
        out += f" The run diverged at step {diverged[0]}."
    return out


def _training_section(run_dir: Path, status: dict | None) -> tuple[Section, list[str]]:
    """The training curves of a run, and the columns they draw."""
    blocks: list = []
    rows = attempt(
        blocks,
        f"the metrics of {run_dir / 'metrics.jsonl'}",
        "restore the file, or train the run again",
        lambda: read_rows(run_dir),
    )
    rows, damaged = rows if rows is not None else ([], [])
    blocks += [Note(w, "the other rows are drawn", kind="damaged") for w in damaged]
    if status and status.get("status") == "running":
        blocks.append(
            Text(
                f"The run is still running (step {status.get('step')}): the report "
                "shows what it had written when it was made."
            )
        )
    if not rows:
        blocks.append(
            Note(
                f"the run has no metrics yet: {run_dir / 'metrics.jsonl'} is "
                "missing or empty.",
                "lossgeom train writes a row at step 0 and every metrics.every "
                f"steps when the config has a metrics section; wait for the first "
                f"row, or train with one: {_TRAIN}",
            )
        )
        return Section("training", "Training curves", blocks), []
    figures = run_curves(rows)
    if not figures:
        blocks.append(
            Note(
                "the metrics rows hold none of the drawn columns (train_loss, "
                f"test_accuracy, sharpness, trace, ...); the last row has "
                f"{sorted(rows[-1])}.",
                "train with metrics.eval_samples, metrics.sharpness and "
                "metrics.trace_max_matvecs set (docs/training.md)",
            )
        )
    blocks += figures
    drawn = [c for _, _, _, lines, _ in PANELS for c, _, _ in lines]
    present = [c for c in drawn if any(c in r for r in rows)]
    return Section("training", "Training curves", blocks), present


def _probe_entries(run_dir: Path) -> list[Stored]:
    """The stored probe results of a run: ``probes/<key>/step_<N>/``."""
    names: dict[str, str] = {}
    log = run_dir / "probes.jsonl"
    if log.is_file():
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                names[str(row["key"])] = str(row["name"])
            except (ValueError, KeyError, TypeError):
                continue
    out = []
    for key_dir in sorted(p for p in (run_dir / "probes").glob("*") if p.is_dir()):
        for step_dir in sorted(key_dir.glob("step_*")):
            match = re.fullmatch(r"step_(\d+)", step_dir.name)
            if match and step_dir.is_dir():
                step = int(match.group(1))
                key = key_dir.name
                name = names.get(key, key)
                out.append(
                    Stored(key, name, step, run_dir.name, f"step {step}", "", step_dir)
                )
    return out


def status_of(run_dir: Path, notes: list) -> dict | None:
    path = run_dir / "status.json"
    if not path.is_file():
        return None
    status = attempt(
        notes,
        f"the run's status ({path})",
        "delete status.json to let lossgeom train resume the run",
        lambda: json.loads(path.read_text(encoding="utf-8")),
    )
    return status if isinstance(status, dict) else None


def _config_section(run_dir: Path) -> tuple[Section, dict]:
    blocks: list = []
    path = run_dir / "config.yaml"
    if not path.is_file():
        blocks.append(
            Note(
                f"the run has no resolved config: {path} is missing.",
                f"lossgeom train writes it when the run starts: {_TRAIN}",
            )
        )
        return Section("config", "Configuration", blocks), {}
    read = attempt(
        blocks, f"the config {path}", "restore the file", lambda: read_yaml_text(path)
    )
    if read is not None:
        blocks.append(
            Text("The resolved config (every default filled in), as the run saved it:")
        )
        blocks.append(Code(read[0]))
    config = read[1] if read is not None and isinstance(read[1], dict) else {}
    return Section("config", "Configuration", blocks), config


def run_document(run_dir: Path) -> Document:
    """The report of one training run directory."""
    notes: list = []
    status = status_of(run_dir, notes)
    config_section, config = _config_section(run_dir)
    sections = [config_section]
    made, failed = guarded(
        "the training curves",
        lambda: _training_section(run_dir, status),
        "training",
        "Training curves",
    )
    sections.append(failed or made[0])
    methods = Methods()

    def probes() -> list[Section]:
        stored, damaged = load_stored(_probe_entries(run_dir), methods)
        return probe_sections(stored, damaged)

    found, failed = guarded("the probe results", probes, "results", "Probe results")
    sections += [failed] if failed else found
    if (run_dir / "advice").is_dir():
        advice, failed = guarded(
            "the advice",
            lambda: advice_section([("this run", run_dir / "advice")], methods),
            "advice",
            "Advice",
        )
        sections.append(failed or advice)
    sections.append(methods.section(made[1] if made else []))
    if notes:
        sections.insert(0, Section("problems", "Problems", notes))
    facts = [("run directory", str(run_dir))]
    if status:
        facts.append(("status", f"{status.get('status')} at step {status.get('step')}"))
        for key in ("reason", "error"):
            if status.get(key):
                facts.append((key, str(status[key])))
    optim = config.get("optim") if isinstance(config.get("optim"), dict) else {}
    if optim:
        facts.append(("optimizer", f"{optim.get('name')}, lr {fmt(optim.get('lr'))}"))
    name = config.get("name") or run_dir.name
    return Document(f"Run {name}", "run", run_dir, facts, sections)
