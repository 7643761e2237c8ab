"""Evaluate an objective at many parameter points: the one path every picture takes.

Slices, paths and curves all end in "the loss (and accuracy) at these points, on
the objective's data and perhaps on a second set". Points go through
:meth:`Objective.evaluate_metrics` in chunks (``vmap`` over points, one pass over
the data per chunk), never by copying the model per point. With
``recompute_norm=True`` each point first gets BatchNorm statistics recomputed on the
objective's data, which needs one extra pass per point.
"""

from __future__ import annotations

import math
import time
import weakref

import torch
from torch import Tensor

from lossgeom.objective import Objective

__all__ = ["check_direction", "evaluate_points", "second_objective"]


def second_objective(obj: Objective, eval_data: object | None) -> Objective | None:
    """An objective on a second evaluation set with ``obj``'s model, loss and mode.

    ``eval_data`` may be an :class:`Objective` already (it must have the same
    parameter count) or anything :class:`Objective` accepts as data.
    """
    if eval_data is None:
        return None
    if isinstance(eval_data, Objective):
        if eval_data.dim != obj.dim:
            raise ValueError(
                f"the evaluation objective has {eval_data.dim} parameters but the "
                f"objective has {obj.dim}; build both on the same model."
            )
        return eval_data
    return Objective(obj.model, obj.loss_fn, eval_data, mode=obj.mode)


def check_direction(obj: Objective, v: object, name: str) -> Tensor:
    """Validate a flat direction or parameter vector for ``obj``."""
    if not isinstance(v, Tensor) or v.ndim != 1 or v.shape[0] != obj.dim:
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(
            f"expected {name} to be a flat vector of shape ({obj.dim},) like "
            f"obj.theta; got {got}. Build directions with lg.random_direction(obj) "
            "and parameter vectors with obj.flatten(...) or lg.Objective(...).theta."
        )
    if not v.is_floating_point():
        raise ValueError(f"{name} must be floating point; got {v.dtype}.")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} contains NaN or inf values.")
    return v.detach().to(device=obj.device, dtype=obj.dtype)


# Objectives whose fastest way over many points has been measured: chunk size.
_CHOSEN: weakref.WeakKeyDictionary[Objective, int] = weakref.WeakKeyDictionary()
_PROBE = 8  # points evaluated each way when choosing
_VMAP_CHUNK = 64


def evaluate_points(
    obj: Objective,
    points: Tensor,
    *,
    recompute_norm: bool = False,
    eval_obj: Objective | None = None,
    chunk_size: int | None | str = "auto",
) -> dict[str, Tensor]:
    """Loss (and accuracy) at each row of ``points``, and on ``eval_obj`` if given.

    ``chunk_size="auto"`` measures, on the first points (useful work, nothing is
    evaluated twice), whether this objective is faster one point after another
    or with points vectorised (``vmap``, 64 at a time), remembers the answer for
    the objective, and uses it. Vectorising wins for small dense models where
    per-call overhead dominates; on the CPU convolutions are faster one point at
    a time (a batch of convolution weights becomes a grouped convolution).

    Returns:
        ``{"loss", "accuracy"?, "eval_loss"?, "eval_accuracy"?}``, each ``(m,)``.
    """
    if points.shape[0] == 0:
        raise ValueError(
            "the grid has no points; give at least one value of each coordinate."
        )
    targets = [("", obj)] + ([("eval_", eval_obj)] if eval_obj is not None else [])
    out: dict[str, list[Tensor]] = {}

    def run(pts: Tensor, chunk: int | None) -> None:
        for prefix, o in targets:
            for k, v in o.evaluate_metrics(pts, chunk_size=chunk).items():
                out.setdefault(prefix + k, []).append(v)

    if not recompute_norm or not obj.has_norm_statistics:
        if chunk_size == "auto":
            chunk = _CHOSEN.get(obj)
            if chunk is None and points.shape[0] >= 3 * _PROBE:
                t0 = time.perf_counter()
                run(points[:_PROBE], 1)
                t1 = time.perf_counter()
                run(points[_PROBE : 2 * _PROBE], _PROBE)
                t2 = time.perf_counter()
                chunk = 1 if t1 - t0 <= t2 - t1 else _VMAP_CHUNK
                _CHOSEN[obj] = chunk
                points = points[2 * _PROBE :]
            run(points, chunk if chunk is not None else _VMAP_CHUNK)
        else:
            run(points, chunk_size)
    else:
        for p in points:
            stats = obj.norm_statistics(p)
            for prefix, o in targets:
                with o.using_buffers(stats):
                    metrics = o.evaluate_metrics(p[None], chunk_size=1)
                for k, v in metrics.items():
                    out.setdefault(prefix + k, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def barrier(ts: Tensor, values: Tensor) -> tuple[float, float]:
    """``max_t [f(t) - ((1 - t) f(0) + t f(1))]`` on the grid, and its ``t``.

    ``ts`` must start at 0 and end at 1. NaN when a value is not finite.
    """
    line = (1 - ts) * values[0] + ts * values[-1]
    excess = values - line
    if not bool(torch.isfinite(excess).all()):
        return math.nan, math.nan
    i = int(torch.argmax(excess))
    return float(excess[i]), float(ts[i])
