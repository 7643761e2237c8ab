"""``advise``: the training advisor on a run directory, and between two runs.

The rules read the first ``early_fraction`` of a run's metrics rows, the rows
of a study's probes in that window and whether the run diverged in it; given
other runs of the same model and data, the loss barrier between their early
weights (docs/advice.md).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lossgeom._results import Cost, save_result
from lossgeom.geometry import interpolate
from lossgeom.train._advice import ADVICE, AdviceResult, check_thresholds, recommend
from lossgeom.train._advice_base import AdviceThresholds, number
from lossgeom.train._build import build_state, resolve_device
from lossgeom.train._config import TrainConfig, load_config
from lossgeom.train._state import MetricsLog, checkpoints, read_checkpoint, read_status

__all__ = ["advise"]

_PROBES = "probes.jsonl"  # a study's probe rows in a run directory


def _run_config(run_dir: Path, what: str) -> TrainConfig:
    if not run_dir.exists():
        raise FileNotFoundError(
            f"{what} {run_dir} does not exist; give the directory of a training "
            "run (it holds config.yaml and metrics.jsonl)."
        )
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(
            f"{what} {run_dir} is not a run directory: it has no config.yaml. Give "
            "the directory lg.train or `lossgeom train --out` wrote (in a study: "
            "DIR/runs/<run id>)."
        )
    return load_config(run_dir / "config.yaml")


def _window_rows(path: Path, end: float) -> list[dict]:
    return [r for r in MetricsLog(path).read() if r["step"] <= end]


def advise(
    run_dir: str | os.PathLike,
    *,
    early_fraction: float = 0.1,
    others: Sequence[str | os.PathLike] = (),
    thresholds: AdviceThresholds | dict | None = None,
    save: bool = True,
    device: str | torch.device | None = None,
    allow_factory: bool = False,
) -> AdviceResult:
    """Advice for a training run from the first ``early_fraction`` of its steps.

    The rules read the metrics rows of steps ``<= early_fraction * steps``
    (``metrics.jsonl``), the rows of a study's probes in that window
    (``probes.jsonl``: slice statistics, noise scale) and whether the run
    diverged in it (``status.json``). With ``others`` (runs of the same
    model, data and loss, e.g. other seeds), the loss barrier on the straight
    path between this run's and each other run's weights at the latest
    checkpoint step both have in the window is measured on this run's probe
    set, for the ``seed_sensitive`` rule. A rule that cannot be evaluated says
    what to turn on (``details["not_evaluated"]``).

    Args:
        run_dir: the run directory.
        early_fraction: the window, as a fraction of the configured steps, in
            ``(0, 1]``.
        others: run directories of other seeds.
        thresholds: :class:`AdviceThresholds` or a dict of some of its fields.
        save: save the result in ``<run_dir>/advice/`` (replacing what is
            there), where reports read it.
        device: where the barrier is measured (default: the run's device).
        allow_factory: allow a ``model.factory`` config to run its code when
            the barrier between runs is measured (as for ``lg.train``).

    Returns:
        An :class:`AdviceResult`.

    Raises:
        FileNotFoundError: ``run_dir`` (or another run) does not exist.
        ValueError: not a run directory, no metrics rows in the window yet, an
            ``early_fraction`` outside ``(0, 1]``, or another run that trains a
            different model or data.
        ConfigError: a ``model.factory`` without ``allow_factory``.
        DamagedFileError: a file of the run directory is damaged (named).
    """
    start = time.perf_counter()
    if (
        isinstance(early_fraction, bool)
        or not isinstance(early_fraction, (int, float))
        or not 0 < early_fraction <= 1
    ):
        raise ValueError(
            f"early_fraction must be a number in (0, 1] (the window, as a fraction "
            f"of the run's steps); got {early_fraction!r}."
        )
    th = check_thresholds(thresholds)
    if isinstance(others, (str, os.PathLike)):
        others = [others]
    run_dir = Path(run_dir)
    cfg = _run_config(run_dir, "run directory")
    end = early_fraction * cfg.steps
    rows = _window_rows(run_dir / "metrics.jsonl", end)
    if not [r for r in rows if r.get("diverged") is not True]:
        raise ValueError(
            f"{run_dir} has no metrics rows in its first {end:g} steps yet "
            f"(early_fraction {early_fraction:g} of {cfg.steps} steps); train it "
            "(with metrics on: metrics.every at most the window) or advise later."
        )
    stored = read_status(run_dir) or {}
    status = stored.get("status")
    diverged_at = None
    if status == "diverged" and stored.get("step", math.inf) <= end:
        diverged_at = stored["step"]
    pairs, missing, cost = None, None, Cost()
    if others:
        pairs, missing, cost = _measure_pairs(
            run_dir, cfg, rows, others, end, device, allow_factory
        )
    last = max(r["step"] for r in rows)
    res = recommend(
        rows,
        cfg,
        thresholds=th,
        diverged_at=diverged_at,
        probe_rows=_window_rows(run_dir / _PROBES, end),
        pairs=pairs,
        pair_missing=missing,
        run_dir=str(run_dir),
        status=status,
        window={
            "early_fraction": early_fraction,
            "end_step": end,
            "steps": cfg.steps,
            "complete": status in ("finished", "diverged") or last >= end,
        },
    )
    res = AdviceResult(
        recommendations=res.recommendations,
        run_dir=res.run_dir,
        status=res.status,
        window=res.window,
        parameters={
            **res.parameters,
            "early_fraction": early_fraction,
            "others": [str(o) for o in others],
        },
        details=res.details,
        cost=cost.add(seconds=time.perf_counter() - start),
    )
    if save:
        save_result(res, run_dir / ADVICE)
    return res


def _ratio_at(rows: list[dict], step: int) -> float | None:
    """The ``eos_ratio`` of the last row at or before ``step``."""
    found = None
    for row in rows:
        r = number(row.get("eos_ratio"))
        if row["step"] <= step and r is not None:
            found = r
    return found


def _measure_pairs(
    run_dir: Path,
    cfg: TrainConfig,
    rows: list[dict],
    others: Sequence[str | os.PathLike],
    end: float,
    device: str | torch.device | None,
    allow_factory: bool,
) -> tuple[list[dict], str | None, Cost]:
    """The barrier to each other run at the latest common early checkpoint step."""
    mine = dict(checkpoints(run_dir / "checkpoints"))
    same = ("model", "data", "loss", "dtype")
    plain = cfg.model_dump(mode="json")
    pairs, missing, cost, state = [], [], Cost(), None
    for other in map(Path, others):
        other_cfg = _run_config(other, "other run")
        other_plain = other_cfg.model_dump(mode="json")
        differ = [k for k in same if plain[k] != other_plain[k]]
        if differ:
            raise ValueError(
                f"other run {other} trains a different {', '.join(differ)} than "
                f"{run_dir}; the barrier is measured between runs of the same "
                "model, data and loss (e.g. other seeds)."
            )
        theirs = dict(checkpoints(other / "checkpoints"))
        common = sorted(s for s in mine.keys() & theirs.keys() if s <= end)
        if not common:
            missing.append(
                f"{other}: no checkpoint step common to both runs in the first "
                f"{end:g} steps (this run: {sorted(mine)}; the other: "
                f"{sorted(theirs)})"
            )
            continue
        step = common[-1]
        r_a = _ratio_at(rows, step)
        r_b = _ratio_at(_window_rows(other / "metrics.jsonl", end), step)
        if r_a is None or r_b is None:
            missing.append(
                f"{other}: no sharpness (eos_ratio) at step {step} in both runs "
                "(metrics.sharpness: true)"
            )
            continue
        if state is None:
            where = torch.device(device) if device is not None else resolve_device(cfg)
            state = build_state(cfg, run_dir, where, allow_factory=allow_factory)
        obj = state.objective
        thetas = [
            obj.flatten(
                {
                    k.removeprefix("model/"): v
                    for k, v in read_checkpoint(side).tensors.items()
                }
            ).to(obj.device, obj.dtype)
            for side in (mine[step], theirs[step])
        ]
        path = interpolate(obj, *thetas, n_points=11)
        cost = cost + path.cost
        pairs.append(
            {
                "other": str(other),
                "step": step,
                "barrier": float(path.barrier),
                "loss_a": float(path.loss[0]),
                "loss_b": float(path.loss[-1]),
                "distance": float((thetas[1] - thetas[0]).norm()),
                "eos_ratio_a": r_a,
                "eos_ratio_b": r_b,
            }
        )
    return pairs, ("; ".join(missing) or None), cost
