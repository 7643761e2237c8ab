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

import torch
from torch import Tensor, nn

from lossgeom.objective import Objective

__all__ = [
    "evaluate_grid",
    "evaluate_points",
    "second_objective",
]


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


_VMAP_CHUNK = 64


def default_chunk_size(obj: Objective) -> int:
    """How ``chunk_size="auto"`` evaluates many points of ``obj``.

    One point at a time (``1``) for models with convolutions on the CPU, where a
    batch of convolution weights under ``vmap`` becomes a grouped convolution that
    is several times slower per point than a plain one (measured in
    ``benchmarks/slices.py``); otherwise 64 points per ``vmap`` call, which
    amortises per-call overhead for dense models. A fixed rule rather than a
    timing, so the same call always takes the same path (and rounds the same).
    """
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in obj.model.modules())
    return 1 if has_conv and obj.device.type == "cpu" else _VMAP_CHUNK


def evaluate_points(
    obj: Objective,
    points: Tensor,
    *,
    recompute_norm: bool = False,
    eval_obj: Objective | None = None,
    chunk_size: int | None | str = "auto",
) -> dict[str, Tensor]:
    """Loss (and accuracy) at each row of ``points``, and on ``eval_obj`` if given.

    ``chunk_size="auto"`` follows :func:`default_chunk_size`.

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

    # In train mode BatchNorm uses batch statistics: nothing to recompute.
    if not recompute_norm or not obj.has_norm_statistics or obj.mode == "train":
        run(points, default_chunk_size(obj) if chunk_size == "auto" else chunk_size)
    else:
        for p in points:
            stats = obj.norm_statistics(p)
            for prefix, o in targets:
                with o.using_buffers(stats):
                    metrics = o.evaluate_metrics(p[None], chunk_size=1)
                for k, v in metrics.items():
                    out.setdefault(prefix + k, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


# Grid points built at once are bounded to about this many numbers (the points
# themselves are d numbers each); the data pass inside is chunked by chunk_size.
_MAX_POINT_NUMBERS = 2**26


def evaluate_grid(
    obj: Objective,
    center: Tensor,
    coefs: Tensor,
    dirs: Tensor,
    *,
    recompute_norm: bool,
    eval_obj: Objective | None,
    chunk_size: int | None | str,
) -> dict[str, Tensor]:
    """Metrics at ``center + coefs @ dirs`` for every row of ``coefs`` ``(m, k)``."""
    per_group = max(1, _MAX_POINT_NUMBERS // obj.dim)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, coefs.shape[0], per_group):
        c = coefs[start : start + per_group]
        points = torch.addmm(center.expand(c.shape[0], -1), c, dirs)
        values = evaluate_points(
            obj,
            points,
            recompute_norm=recompute_norm,
            eval_obj=eval_obj,
            chunk_size=chunk_size,
        )
        for k, v in values.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v).cpu() for k, v in parts.items()}


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
