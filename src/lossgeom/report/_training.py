"""Figures of a training run: losses, accuracies, sharpness at the edge of stability.

A run is its metrics rows: ``lossgeom.train`` writes one JSON object per
measurement to ``metrics.jsonl`` (``step``, ``train_loss``, ``test_accuracy``,
``sharpness``, ``eos_threshold``, ...). The figure draws the columns as written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lossgeom.report._base import as_list, finish, new_figure, number
from lossgeom.train import MetricsLog

__all__ = ["PANELS", "metrics_rows", "plot_training"]

#: The named panels: the columns each draws, with their legend labels.
PANELS: dict[str, tuple[tuple[str, str], ...]] = {
    "loss": (("train_loss", "train"), ("test_loss", "test")),
    "accuracy": (("train_accuracy", "train"), ("test_accuracy", "test")),
    "sharpness": (
        ("sharpness", "sharpness lambda_max(H)"),
        ("preconditioned_sharpness", "preconditioned lambda_max(P^-1 H)"),
    ),
}


def metrics_rows(run: Any) -> list[dict]:
    """The metrics rows of a run, as a list of dicts.

    Args:
        run: the rows themselves (a list of dicts), a
            :class:`~lossgeom.TrainResult`, a run directory holding
            ``metrics.jsonl``, or the path of such a file.

    Returns:
        The rows in the order written (a line cut short by a kill is left out).

    Raises:
        FileNotFoundError: a path with no ``metrics.jsonl``.
        TypeError: anything else.
    """
    if isinstance(run, (str, os.PathLike)):
        path = Path(run)
        file = path / "metrics.jsonl" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no metrics file at {file}: expected a run directory written by "
                "lossgeom.train (with metrics.jsonl) or the path of a metrics.jsonl."
            )
        return MetricsLog(file).read()
    rows = getattr(run, "metrics", run)
    if isinstance(rows, Sequence) and all(isinstance(r, Mapping) for r in rows):
        return [dict(r) for r in rows]
    raise TypeError(
        "expected metrics rows (a list of dicts), a TrainResult, a run directory or "
        f"a metrics.jsonl path; got {type(run).__name__}."
    )


def _column(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of the rows that hold a number in ``key``."""
    steps, values = [], []
    for row in rows:
        value, step = number(row.get(key)), number(row.get("step"))
        if value is not None and step is not None:
            steps.append(step)
            values.append(value)
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def _lines(panel: str) -> tuple[tuple[str, str], ...]:
    return PANELS.get(panel, ((panel, panel),))


def _has_data(rows: list[dict], panel: str) -> bool:
    return any(_column(rows, key)[0].size for key, _ in _lines(panel))


def _draw_panel(ax: Any, rows: list[dict], panel: str) -> None:
    for key, label in _lines(panel):
        steps, values = _column(rows, key)
        if not steps.size:
            continue
        (line,) = ax.plot(steps, values, marker=".", ms=3, lw=1.2, label=label)
        line.set_gid(key)
        stderr_steps, stderr = _column(rows, f"{key}_stderr")
        if stderr_steps.size == steps.size and np.array_equal(stderr_steps, steps):
            ax.fill_between(
                steps,
                values - stderr,
                values + stderr,
                color=line.get_color(),
                alpha=0.2,
                label=f"{label} +- stderr",
            )
    if panel == "sharpness":
        _draw_stability(ax, rows)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.replace("_", " "))


def _draw_stability(ax: Any, rows: list[dict]) -> None:
    """The edge-of-stability threshold as recorded, and unconverged sharpness."""
    steps, threshold = _column(rows, "eos_threshold")
    if steps.size:
        formulas = {r["eos_formula"] for r in rows if r.get("eos_formula")}
        formula = " / ".join(sorted(formulas)) if formulas else "recorded"
        (line,) = ax.plot(
            steps,
            threshold,
            color="k",
            ls="--",
            lw=1,
            label=f"edge of stability {formula}",
        )
        line.set_gid("eos_threshold")
    bad = [
        (number(r.get("step")), number(r.get("sharpness")))
        for r in rows
        if r.get("sharpness_converged") is False
    ]
    bad = [(s, v) for s, v in bad if s is not None and v is not None]
    if bad:
        s, v = zip(*bad, strict=True)
        (line,) = ax.plot(
            s, v, ls="none", marker="x", color="tab:red", label="not converged"
        )
        line.set_gid("sharpness_not_converged")


def plot_training(
    run: Any,
    *,
    panels: Sequence[str] | None = None,
    ax: Any = None,
    path: str | os.PathLike | None = None,
    dpi: int = 150,
) -> Any:
    """Training curves of a run, one panel per quantity, against the step.

    ``"loss"`` and ``"accuracy"`` draw the train and test columns;
    ``"sharpness"`` draws the top Hessian eigenvalue (and, for Adam, the
    preconditioned one) with the edge-of-stability threshold that training
    recorded beside it (``eos_threshold``, e.g. ``2 / eta`` for gradient
    descent), unconverged estimates marked. Any other name draws that column,
    with a ``+- stderr`` band when ``<name>_stderr`` is recorded too (e.g.
    ``"trace"``, ``"grad_norm"``). A diverged run is marked where it stopped.
    Each line's ``gid`` is the column it draws.

    Args:
        run: the metrics rows (a list of dicts), a
            :class:`~lossgeom.TrainResult`, a run directory or its
            ``metrics.jsonl``.
        panels: the panels, in order (default: those of ``"loss"``,
            ``"accuracy"`` and ``"sharpness"`` that the run recorded).
        ax: draw here: one axes per panel (a single axes for one panel).
        path: write a PNG here (atomically).
        dpi: resolution of the PNG.

    Returns:
        The matplotlib figure.

    Example:
        >>> rows = [{"step": 0, "train_loss": 2.3, "sharpness": 5.0,
        ...          "eos_threshold": 40.0, "eos_formula": "2 / eta"},
        ...         {"step": 10, "train_loss": 1.1, "sharpness": 30.0,
        ...          "eos_threshold": 40.0, "eos_formula": "2 / eta"}]
        >>> fig = plot_training(rows)
        >>> [a.get_ylabel() for a in fig.axes]
        ['loss', 'sharpness']
        >>> [line.get_gid() for line in fig.axes[1].lines]
        ['sharpness', 'eos_threshold']
    """
    rows = metrics_rows(run)
    if not rows:
        raise ValueError(
            "the run has no metrics rows to draw; train with a metrics section "
            "(MetricsConfig) so that lossgeom.train writes metrics.jsonl."
        )
    if panels is None:
        panels = [p for p in PANELS if _has_data(rows, p)]
        if not panels:
            raise ValueError(
                f"the run recorded none of {list(PANELS)}'s columns; name the "
                f"columns to draw with panels=[...] (it has {sorted(rows[-1])})."
            )
    panels = list(panels)
    for panel in panels:
        if not _has_data(rows, panel):
            wanted = [key for key, _ in _lines(panel)]
            raise ValueError(
                f"panel {panel!r} needs one of the columns {wanted}, which the run "
                f"did not record (its last row has {sorted(rows[-1])})."
            )
    if ax is None:
        fig = new_figure((4.2 * len(panels), 3.4))
        axes = [fig.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
    else:
        axes = as_list(ax)
        if len(axes) != len(panels):
            raise ValueError(
                f"got {len(axes)} axes for {len(panels)} panels {panels}; pass one "
                "axes per panel, or ax=None for a new figure."
            )
        fig = axes[0].figure
    diverged = [number(r.get("step")) for r in rows if r.get("diverged")]
    diverged = [s for s in diverged if s is not None]
    for a, panel in zip(axes, panels, strict=True):
        _draw_panel(a, rows, panel)
        for step in diverged[:1]:
            a.axvline(step, color="tab:red", lw=1, label=f"diverged at step {step:g}")
        a.legend(fontsize=8)
    if ax is None:
        fig.tight_layout()
    return finish(fig, path, dpi)
