"""Linear paths between two parameter vectors and their loss barriers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lossgeom._results import CostMeter, Result
from lossgeom.geometry._evaluation import (
    barrier,
    evaluate_points,
    second_objective,
)
from lossgeom.objective import Objective, check_direction

__all__ = ["BARRIER_DEFINITION", "PathResult", "interpolate"]

BARRIER_DEFINITION = (
    "max over t of L(t) - ((1 - t) L(0) + t L(1)) on the evaluated grid: the largest "
    "rise of the loss above the straight line between the end values (Frankle et "
    "al. 2020; Entezari et al. 2021). The accuracy barrier is the largest drop below "
    "that line."
)


@dataclass(frozen=True)
class PathResult(Result):
    """Loss (and accuracy) along a path ``theta(t)``, ``t`` in ``[0, 1]``.

    Attributes:
        ts: the path parameters evaluated, ``(n,)``, from 0 to 1.
        loss: loss at each ``t`` on the objective's data.
        accuracy: accuracy at each ``t`` (classification only, else ``None``).
        eval_loss: loss on the second evaluation set (``None`` if none given).
        eval_accuracy: accuracy on the second set.
        barrier: loss barrier (see ``definition``) on the objective's data.
        barrier_t: the ``t`` where it is attained.
        accuracy_barrier: largest accuracy drop below the straight line.
        eval_barrier: loss barrier on the second set.
        kind: ``"linear"`` or the curve kind.
        recompute_norm: whether BatchNorm statistics were recomputed per point.
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`; ``definition`` is the barrier's.
    """

    ts: Tensor
    loss: Tensor
    accuracy: Tensor | None
    eval_loss: Tensor | None
    eval_accuracy: Tensor | None
    barrier: float
    barrier_t: float
    accuracy_barrier: float | None
    eval_barrier: float | None
    kind: str
    recompute_norm: bool
    definition: str = field(default=BARRIER_DEFINITION, kw_only=True)

    def scalars(self) -> dict[str, float]:
        """The loss barrier (``value``), and the others where measured."""
        out = {"value": self.barrier}
        for name in ("accuracy_barrier", "eval_barrier"):
            if getattr(self, name) is not None:
                out[name] = float(getattr(self, name))
        return out


def path_result(
    obj: Objective,
    ts: Tensor,
    points: Tensor,
    *,
    kind: str,
    recompute_norm: bool | None,
    eval_data: object | None,
    chunk_size: int | None | str,
    meter: CostMeter,
    info: dict | None = None,
) -> PathResult:
    """Evaluate ``points`` (one per ``t``) and wrap them with their barriers."""
    recompute = obj.has_norm_statistics if recompute_norm is None else recompute_norm
    eval_obj = second_objective(obj, eval_data)
    values = evaluate_points(
        obj, points, recompute_norm=recompute, eval_obj=eval_obj, chunk_size=chunk_size
    )
    loss_barrier, t_max = barrier(ts, values["loss"])
    acc = values.get("accuracy")
    eval_loss = values.get("eval_loss")
    return PathResult(
        ts=ts.detach().cpu(),
        loss=values["loss"].cpu(),
        accuracy=None if acc is None else acc.cpu(),
        eval_loss=None if eval_loss is None else eval_loss.cpu(),
        eval_accuracy=(
            None
            if values.get("eval_accuracy") is None
            else values["eval_accuracy"].cpu()
        ),
        barrier=loss_barrier,
        barrier_t=t_max,
        accuracy_barrier=None if acc is None else barrier(ts, -acc)[0],
        eval_barrier=None if eval_loss is None else barrier(ts, eval_loss)[0],
        kind=kind,
        recompute_norm=bool(
            recompute and obj.has_norm_statistics and obj.mode == "eval"
        ),
        parameters={"objective": obj.info()},
        details=dict(info or {}),
        cost=meter.stop(),
    )


def interpolate(
    obj: Objective,
    theta_a: Tensor,
    theta_b: Tensor,
    *,
    n_points: int = 25,
    recompute_norm: bool | None = None,
    eval_data: object | None = None,
    chunk_size: int | None | str = "auto",
) -> PathResult:
    """Loss along the straight line ``(1 - t) theta_a + t theta_b``, and its barrier.

    Args:
        obj: the objective (model, loss, data); its model is never changed.
        theta_a: start, a flat vector like ``obj.theta``.
        theta_b: end (e.g. another trained network's ``obj.flatten(...)``).
        n_points: number of evenly spaced ``t`` in ``[0, 1]``, ends included (>= 2).
        recompute_norm: recompute BatchNorm running statistics at every point on
            the objective's data (``None``: when the model has BatchNorm). The end
            networks' statistics do not describe the points between them.
        eval_data: a second evaluation set (data, or an :class:`Objective`).
        chunk_size: points per vectorised evaluation, 1, or "auto" (see
            :func:`lossgeom.slice_1d`).

    Returns:
        A :class:`PathResult`; ``barrier`` is defined in ``definition``.

    Example:
        >>> import torch, lossgeom as lg
        >>> model = torch.nn.Linear(2, 1).double()
        >>> X = torch.randn(16, 2, dtype=torch.float64)
        >>> obj = lg.Objective(model, torch.nn.MSELoss(), (X, X.sum(1, keepdim=True)))
        >>> path = lg.interpolate(obj, obj.theta, torch.zeros(3, dtype=torch.float64))
        >>> path.ts.shape, path.barrier <= 0  # a convex loss has no barrier
        (torch.Size([25]), True)
    """
    meter = CostMeter(obj)
    a = check_direction(obj, theta_a, "theta_a")
    b = check_direction(obj, theta_b, "theta_b")
    if not isinstance(n_points, int) or n_points < 2:
        raise ValueError(
            f"n_points must be an int >= 2 (the ends are included); got {n_points!r}."
        )
    ts = torch.linspace(0.0, 1.0, n_points, dtype=obj.dtype, device=obj.device)
    points = torch.lerp(a.expand(n_points, -1), b.expand(n_points, -1), ts[:, None])
    return path_result(
        obj,
        ts,
        points,
        kind="linear",
        recompute_norm=recompute_norm,
        eval_data=eval_data,
        chunk_size=chunk_size,
        meter=meter,
        info={"distance": float((b.double() - a.double()).norm())},
    )
