"""Sections made of stored results: probes, pairs, advice, hypotheses, methods.

Both a run's report and a study's report use these: a stored result is loaded
with :func:`lossgeom.load_result`, drawn by its type (not by the probe's name),
and listed in the methods section with its definition, parameters and cost. A
result that cannot be loaded becomes a note naming its folder.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lossgeom._results import load_result
from lossgeom.report._base import array
from lossgeom.report._document import (
    Figure,
    Heading,
    Items,
    Section,
    Table,
    Text,
    attempt,
    fmt,
    short_json,
)

__all__ = [
    "METRIC_DEFINITIONS",
    "Methods",
    "Stored",
    "load_stored",
    "probe_sections",
]

#: What the training columns drawn in a report are (docs/training.md).
METRIC_DEFINITIONS = {
    "train_loss": "mean loss on a seeded subset of metrics.eval_samples training "
    "examples (the whole training set when null)",
    "test_loss": "mean loss on a seeded subset of metrics.eval_samples test examples",
    "train_accuracy": "share of correctly classified training examples (same subset)",
    "test_accuracy": "share of correctly classified test examples (same subset)",
    "sharpness": "lambda_max(H): the top eigenvalue of the Hessian of the probe "
    "objective (metrics.probe_samples examples), warm-started Lanczos with its "
    "residual and convergence flag",
    "eos_threshold": "the edge-of-stability threshold of the optimizer at this step "
    "size: 2 / lr for gradient descent and SGD (Cohen et al. 2021); heavy-ball, "
    "Nesterov and Adam have their own (docs/training.md)",
    "trace": "tr(H) of the probe objective's Hessian by lg.trace (Hutchinson or "
    "Hutch++ within metrics.trace_max_matvecs products), with its standard error",
}


@dataclass
class Stored:
    """A stored result, where it came from, and (once loaded) the result.

    Attributes:
        key: the probe's column (``eigenvalues``, ``interpolate_step50``, ...).
        name: the probe's name (``eigenvalues``, ``density``, ...).
        step: the training step it was taken at.
        owner: the run or pair it belongs to.
        label: its legend entry (``seed 0``, ``step 40``, ``seeds 0-1``).
        group: the figure it joins (a setting's label; ``""`` in a run).
        path: its folder.
        result: the loaded result, or ``None``.
    """

    key: str
    name: str
    step: int
    owner: str
    label: str
    group: str
    path: Path
    result: Any = None


class Methods:
    """Collects each quantity's definition, parameters and cost from its results."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], dict] = {}

    def add(self, key: str, result: Any) -> None:
        """Count ``result`` under the quantity ``key``."""
        name = type(result).__name__
        entry = self._entries.setdefault(
            (key, name),
            {"definitions": [], "parameters": [], "n": 0, "costs": []},
        )
        definition = str(getattr(result, "definition", "") or "")
        if definition and definition not in entry["definitions"]:
            entry["definitions"].append(definition)
        params = short_json(getattr(result, "parameters", {}) or {}, 600)
        if params not in entry["parameters"]:
            entry["parameters"].append(params)
        entry["n"] += 1
        cost = getattr(result, "cost", None)
        if cost is not None:
            entry["costs"].append(
                (float(cost.matvecs), float(cost.data_passes), float(cost.seconds))
            )

    def section(self, metrics: Iterable[str] = ()) -> Section:
        """The methods section: the training columns, then each stored quantity."""
        blocks: list = []
        metrics = [m for m in metrics if m in METRIC_DEFINITIONS]
        if metrics:
            blocks.append(Text("Training metrics (columns of metrics.jsonl):"))
            blocks.append(Items([(m, METRIC_DEFINITIONS[m]) for m in metrics]))
        for (key, name), entry in self._entries.items():
            blocks.append(Heading(f"{key} ({name}), {entry['n']} stored result(s)"))
            items = [("definition", d) for d in entry["definitions"]]
            for i, params in enumerate(entry["parameters"][:3]):
                label = "parameters" if i == 0 else "parameters (another setting)"
                items.append((label, "none recorded" if params == "{}" else params))
            if len(entry["parameters"]) > 3:
                items.append(("parameters", f"{len(entry['parameters'])} variants"))
            if entry["costs"]:
                items.append(("cost", _cost_text(entry["costs"])))
            blocks.append(Items(items))
        if not blocks:
            blocks.append(Text("No stored result and no training metric to describe."))
        return Section("methods", "Methods", blocks)


def _cost_text(costs: list[tuple[float, float, float]]) -> str:
    c = np.asarray(costs, dtype=np.float64)
    mean, total = c.mean(0), c.sum(0)
    return (
        f"per result {fmt(mean[0])} operator products (matvecs), {fmt(mean[1])} "
        f"data passes, {fmt(mean[2], 3)} s (mean of {len(costs)}; "
        f"{fmt(total[2], 3)} s in all)"
    )


#: Where a probe's results go, by the probe's name (for the note of a damaged one).
_SECTION_OF = {
    "eigenvalues": "spectra",
    "density": "spectra",
    "slice_1d": "landscape",
    "slice_2d": "landscape",
    "interpolate": "paths",
    "connect": "paths",
}


def load_stored(
    stored: list[Stored], methods: Methods
) -> tuple[list[Stored], dict[str, list]]:
    """Load each stored result.

    Returns:
        ``(loaded, notes)``: the results that loaded, and for each section id
        the notes of those that did not (naming the folder and the error).
    """
    loaded, notes = [], defaultdict(list)
    for s in stored:
        where = notes[_SECTION_OF.get(s.name, "other-results")]
        s.result = attempt(
            where,
            f"the stored result {s.key} at step {s.step} ({s.path})",
            "run the probe again (delete the run or pair directory and run the "
            "study again: lossgeom study run STUDY.yaml --out DIR), or restore the "
            "folder from a copy",
            lambda s=s: load_result(s.path),
        )
        if s.result is not None:
            methods.add(s.key, s.result)
            loaded.append(s)
    return loaded, dict(notes)


def _by(stored: list[Stored], kind: str) -> dict[tuple[str, str], list[Stored]]:
    """The stored results of one class name, by ``(group, key)``, in order."""
    out: dict[tuple[str, str], list[Stored]] = defaultdict(list)
    for s in stored:
        if type(s.result).__name__ == kind:
            out[(s.group, s.key)].append(s)
    return out


def _title(group: str, what: str) -> str:
    return f"{what}, {group}" if group else what


def _eigen_caption(label: str, eig: Any) -> str:
    values = [fmt(v) for v in array(eig.values).reshape(-1).tolist()]
    ok = np.asarray(array(eig.converged), dtype=bool).reshape(-1)
    conv = "all converged" if ok.all() else f"{int(ok.sum())} of {ok.size} converged"
    return f"{label}: top eigenvalues {', '.join(values)} ({conv})"


def _density_figures(stored: list[Stored]) -> list:
    eig = {
        (s.owner, s.step): s.result
        for s in stored
        if type(s.result).__name__ == "EigenResult"
    }
    blocks: list = []
    for (group, key), items in _by(stored, "DensityResult").items():
        data = [(s.label, s.result, eig.get((s.owner, s.step))) for s in items]
        marked = [_eigen_caption(lbl, e) for lbl, _, e in data if e is not None]
        caption = (
            f"Spectral density of the Hessian ({key}), one line per "
            f"{'seed' if group else 'step'}; "
            + (
                "the top eigenvalues of the eigenvalues probe at the same step are "
                "marked (dashed). " + "; ".join(marked) + "."
                if marked
                else "no eigenvalues probe at the same step to mark."
            )
        )
        blocks.append(
            Figure("density", _title(group, f"Spectral density ({key})"), data, caption)
        )
    return blocks


def _eigen_table(stored: list[Stored]) -> list:
    rows = []
    for s in stored:
        if type(s.result).__name__ != "EigenResult":
            continue
        r = s.result
        ok = np.asarray(array(r.converged), dtype=bool).reshape(-1)
        rows.append(
            [
                s.group or "run",
                s.label,
                s.key,
                str(s.step),
                ", ".join(fmt(v) for v in array(r.values).reshape(-1).tolist()),
                fmt(float(array(r.residuals).max()) if ok.size else None),
                f"{int(ok.sum())}/{ok.size}",
            ]
        )
    if not rows:
        return []
    header = ["setting", "of", "key", "step", "eigenvalues", "max residual"]
    return [
        Table(
            [*header, "converged"],
            rows,
            "Top Hessian eigenvalues (EigenResult) with their residual "
            "certificates ||H u - lambda u||.",
        )
    ]


def _landscape_figures(stored: list[Stored]) -> list:
    blocks: list = []
    for (group, key), items in _by(stored, "SliceResult").items():
        data = [(s.label, s.result) for s in items]
        r = items[0].result
        norm = r.directions.get("normalization", "given")
        blocks.append(
            Figure(
                "slice",
                _title(group, f"1-D slices ({key})"),
                data,
                f"Loss along {r.loss.shape[0]} random {norm}-normalized direction(s) "
                "through the weights (alpha = 0): mean over directions, 10-90% "
                "band, each direction thinly.",
            )
        )
    for (group, key), items in _by(stored, "Surface").items():
        for s in items:
            blocks.append(
                Figure(
                    "surface",
                    _title(group, f"2-D plane ({key}), {s.label}"),
                    s.result,
                    "Loss on a plane of two directions through the weights (star); "
                    "a trajectory, when stored, drawn on top.",
                )
            )
    return blocks


def _path_figures(stored: list[Stored]) -> list:
    blocks: list = []
    groups: dict[tuple[str, str], list[Stored]] = defaultdict(list)
    for s in stored:
        if type(s.result).__name__ in ("PathResult", "ConnectResult"):
            groups[(s.group, s.key)].append(s)
    for (group, key), items in groups.items():
        data = [(s.label, s.result) for s in items]
        barriers = "; ".join(
            f"{s.label}: barrier {fmt(float(s.result.barrier))}" for s in items
        )
        blocks.append(
            Figure(
                "paths",
                _title(group, f"Paths between seeds ({key})"),
                data,
                "Loss along the path from one seed's weights (t = 0) to the "
                "other's (t = 1); barrier = max_t L(t) - ((1 - t) L(0) + t L(1)). "
                + barriers
                + ".",
            )
        )
    return blocks


_DRAWN = {"DensityResult", "EigenResult", "SliceResult", "Surface", "PathResult"}


def _other_table(stored: list[Stored]) -> list:
    rows = []
    for s in stored:
        name = type(s.result).__name__
        if name in _DRAWN or name == "ConnectResult":
            continue
        scalars = attempt([], "", "", s.result.scalars) or {}
        shown = ", ".join(f"{k} = {fmt(v)}" for k, v in list(scalars.items())[:8])
        rows.append([s.group or "run", s.label, s.key, str(s.step), name, shown])
    if not rows:
        return []
    header = ["setting", "of", "key", "step", "result", "headline numbers"]
    return [Table(header, rows, "Other stored probe results.")]


def probe_sections(stored: list[Stored], notes: dict[str, list]) -> list[Section]:
    """Sections for the loaded probe results, each with the notes of its damaged ones.

    Args:
        stored: the loaded results (:func:`load_stored`).
        notes: the notes of those that did not load, by section id.
    """
    made = {
        "spectra": _density_figures(stored) + _eigen_table(stored),
        "landscape": _landscape_figures(stored),
        "paths": _path_figures(stored),
        "other-results": _other_table(stored),
    }
    titles = {
        "spectra": "Spectral densities and top eigenvalues",
        "landscape": "Loss landscape: 1-D slices and 2-D planes",
        "paths": "Interpolation and curve barriers",
        "other-results": "Other probe results",
    }
    sections = []
    for sid, title in titles.items():
        blocks = notes.get(sid, []) + made[sid]
        if blocks:
            sections.append(Section(sid, title, blocks))
    return sections
