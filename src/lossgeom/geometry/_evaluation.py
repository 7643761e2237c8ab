"""Evaluate an objective at many parameter points: the one path every picture takes.

Slices, paths and curves all end in "the loss (and accuracy) at these points, on
the objective's data and perhaps on a second set". Points go through
:meth:`Objective.evaluate_metrics` in chunks (``vmap`` over points, one pass over
the data per chunk), never by copying the model per point. With
``recompute_norm=True`` each point first gets BatchNorm statistics recomputed on the
objective's data, which needs one extra pass per point.

Points given as ``center + coefs @ dirs`` (slices, rays) lie on a low-dimensional
plane; there the first layer's work is shared across points when the model
allows it (:mod:`lossgeom.geometry._shared_layer`), which removes the first
layer's cost from every point but ``k + 1``. :data:`EVALUATION_PATHS` counts
which path each evaluation took.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import Tensor, nn

from lossgeom.geometry._shared_layer import (
    SharedFirstLayer,
    evaluate_shared,
    split_first_layer,
)
from lossgeom.objective import Objective

__all__ = [
    "EVALUATION_PATHS",
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

# Which path evaluate_grid took, per objective evaluated: "shared_first_layer" or
# "per_point". For tests and benchmarks that must know the fast path ran.
EVALUATION_PATHS: Counter[str] = Counter()


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
    """Metrics at ``center + coefs @ dirs`` for every row of ``coefs`` ``(m, k)``.

    Each objective (``obj``, then ``eval_obj``) takes the shared-first-layer
    path when its model splits and sharing pays (:func:`_shared_split`), and the
    point-by-point path otherwise; both give the same numbers up to float
    rounding. Recomputed BatchNorm statistics differ per point, so they always
    go point by point.
    """
    chunk = default_chunk_size(obj) if chunk_size == "auto" else chunk_size
    if recompute_norm and obj.has_norm_statistics and obj.mode == "eval":
        EVALUATION_PATHS["per_point"] += 1 + (eval_obj is not None)
        return _grouped(obj, center, coefs, dirs, True, eval_obj, chunk)
    out: dict[str, Tensor] = {}
    targets = [("", obj)] + ([("eval_", eval_obj)] if eval_obj is not None else [])
    for prefix, o in targets:
        split = _shared_split(o, coefs.shape[0], dirs.shape[0])
        if split is not None:
            EVALUATION_PATHS["shared_first_layer"] += 1
            values = evaluate_shared(o, split, center, coefs, dirs, chunk)
            values = {k: v.cpu() for k, v in values.items()}
        else:
            EVALUATION_PATHS["per_point"] += 1
            values = _grouped(o, center, coefs, dirs, False, None, chunk)
        out.update((prefix + k, v) for k, v in values.items())
    return out


# Sharing the first layer pays when its fan-in is at least this many times the
# k + 1 outputs the combination reads per output element (see _shared_split).
_FAN_IN_PER_OUTPUT_READ = 16


def _shared_split(obj: Objective, m: int, k: int) -> SharedFirstLayer | None:
    """``obj``'s model split at its first layer, when sharing that layer pays.

    Sharing costs ``k + 1`` passes of the first layer per batch, against ``m``
    point by point, and per point a combination that reads ``k + 1`` stored
    outputs per output element, against the layer's ``fan_in`` multiply-adds
    on the inputs. The combination runs at memory speed, the layer at
    matrix-product speed: measured in ``benchmarks/slices.py`` on a 2-core CPU,
    sharing a dense layer with 64 inputs made a plane (``k = 2``) 2.1x faster
    than point by point, while sharing a 3 x 3 convolution with one input
    channel (fan-in 9) made every point 0.6-0.8 ms (17-33%) slower than running
    it. So it is taken when ``m > k + 1`` and ``fan_in >= 16 (k + 1)``: a plane
    on a dense first layer of 48 inputs or more, or a convolution with as many
    inputs per output (a 7 x 7 stem on 3 channels); not small convolutions,
    whose outputs are large and cheap to compute.
    """
    if m <= k + 1:
        return None
    split, _ = split_first_layer(obj)
    if split is None or split.fan_in < _FAN_IN_PER_OUTPUT_READ * (k + 1):
        return None
    return split


def _grouped(
    obj: Objective,
    center: Tensor,
    coefs: Tensor,
    dirs: Tensor,
    recompute_norm: bool,
    eval_obj: Objective | None,
    chunk_size: int | None,
) -> dict[str, Tensor]:
    """Point by point: the points built a group at a time, then evaluated."""
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
