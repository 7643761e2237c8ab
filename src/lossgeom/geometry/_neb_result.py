"""The result of a nudged elastic band: the path, its barrier and its saddle point.

:class:`NEBResult` is a :class:`~lossgeom.geometry.ConnectResult` whose control
points are the band's images; :func:`neb_result` evaluates the final band
densely (with :func:`~lossgeom.geometry._paths.path_result`) and the straight
line, and fills it in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lossgeom._results import Cost, CostMeter
from lossgeom.geometry._curves import ConnectResult
from lossgeom.geometry._neb_forces import BandForces, interior_maximum
from lossgeom.geometry._paths import BARRIER_DEFINITION, interpolate, path_result
from lossgeom.objective import Objective

__all__ = ["NEB_DEFINITION", "NEBResult", "neb_result"]

NEB_DEFINITION = (
    "nudged elastic band with climbing image (Henkelman, Uberuaga & Jonsson 2000, "
    "J. Chem. Phys. 113, 9901; improved tangent: Henkelman & Jonsson 2000, J. Chem. "
    "Phys. 113, 9978): images between fixed ends relaxed under the gradient's "
    "component perpendicular to the band plus springs along it; the highest image, "
    "when it is a maximum along the band, climbs to a saddle point, certified by "
    "its gradient norm. The path is the polygon through the images, t its "
    "normalised arc length. Barrier: " + BARRIER_DEFINITION
)


@dataclass(frozen=True, eq=False, kw_only=True)
class NEBResult(ConnectResult):
    """A relaxed nudged elastic band: the path, its barrier and its saddle point.

    A :class:`~lossgeom.geometry.ConnectResult` whose ``control_points`` are the
    images, ends included, and whose curve is the polygon through them:
    ``result(t)`` interpolates linearly between the images placed at
    :attr:`image_ts`. ``ts``, ``loss``, ``barrier`` and the straight line's
    fields are as for every curve, here at ``per_segment`` points per segment
    (the images among them) and as many points on the line.

    Attributes:
        image_ts: ``(n_images,)``, the images' places on the path: their
            distance along it over its length, from 0 to 1.
        image_loss: ``(n_images,)``, the loss at each image (the full data, in
            the mode the band was relaxed in).
        image_grad_norm: ``(n_images,)``, the gradient norm at each image.
        image_residual: ``(n_images,)``, what the convergence test reads: the
            norm of the gradient's component perpendicular to the band (for the
            climbing image, the whole gradient); NaN at the fixed ends.
        saddle_index: index in ``control_points`` of the saddle estimate: the
            highest movable image when it is higher than both its neighbours
            (``None`` when it is not: the loss along the band has no interior
            maximum, and there is no barrier to cross).
        saddle_loss: the loss there (NaN without a saddle estimate).
        saddle_grad_norm: the gradient norm there: the certificate of a
            stationary point, zero at a saddle point (meaningful with
            ``climbing``; NaN without a saddle estimate).
        saddle_t: its place on the path (NaN without one).
        max_residual: the largest of ``image_residual``.
        tol: the tolerance of the convergence test.
        converged: ``max_residual < tol``, on the full data at the final band.
        history_force: the largest residual at each logged iteration (on that
            iteration's minibatch with ``minibatch``); ``history_loss`` holds
            the highest movable image's loss and ``history_step`` the iteration.
        cycles: refinement cycles run; ``steps`` counts the iterations of all of
            them (fewer than asked when the band converged early).
    """

    image_ts: Tensor
    image_loss: Tensor
    image_grad_norm: Tensor
    image_residual: Tensor
    saddle_index: int | None
    saddle_loss: float
    saddle_grad_norm: float
    saddle_t: float
    max_residual: float
    tol: float
    converged: bool
    history_force: Tensor
    cycles: int = 1
    definition: str = field(default=NEB_DEFINITION, kw_only=True)

    @property
    def images(self) -> int:
        """Number of movable images (the ends excluded)."""
        return self.bends

    @property
    def saddle(self) -> Tensor | None:
        """The saddle estimate's parameters ``(d,)``, or ``None`` without one."""
        if self.saddle_index is None:
            return None
        return self.control_points[self.saddle_index]

    def scalars(self) -> dict[str, float]:
        """The barriers, and the saddle estimate with its certificate."""
        return {
            **super().scalars(),
            "saddle_loss": self.saddle_loss,
            "saddle_grad_norm": self.saddle_grad_norm,
            "max_residual": self.max_residual,
        }

    def point(self, t: float | Sequence[float] | Tensor) -> Tensor:
        """Parameters on the polygon through the images: ``(d,)`` or ``(m, d)``.

        Args:
            t: path parameter(s) in ``[0, 1]`` (normalised arc length): a number,
                a 0-d or 1-D tensor, or a sequence of numbers.

        Returns:
            The point(s), in the dtype and on the device of ``control_points``.
        """
        R = self.control_points
        tt = torch.as_tensor(t, dtype=R.dtype, device=R.device)
        if tt.ndim > 1 or not bool(((tt >= 0) & (tt <= 1)).all()):
            raise ValueError(
                "expected t as a number or a 1-D tensor of path parameters in "
                f"[0, 1]; got shape {tuple(tt.shape)} with values from "
                f"{tt.min().item():.4g} to {tt.max().item():.4g}."
            )
        knots = self.image_ts.to(device=R.device, dtype=R.dtype)
        flat = tt.reshape(-1)
        i = torch.searchsorted(knots, flat, right=True) - 1
        i = i.clamp(0, len(knots) - 2)
        width = (knots[i + 1] - knots[i]).clamp_min(torch.finfo(R.dtype).tiny)
        u = ((flat - knots[i]) / width).clamp(0, 1)[:, None]
        out = R[i] + u * (R[i + 1] - R[i])
        return out[0] if tt.ndim == 0 else out

    __call__ = point


def neb_result(
    obj: Objective,
    band: Tensor,
    E: Tensor,
    G: Tensor,
    forces: BandForces,
    *,
    history: tuple[list[int], list[float], list[float]],
    iterations: int,
    cycles: int,
    tol: float,
    per_segment: int,
    recompute_norm: bool,
    chunk_size: int | None | str,
    eval_data: object | None,
    parameters: dict[str, Any],
    details: dict[str, Any],
    meters: tuple[CostMeter, CostMeter | None],
) -> NEBResult:
    """Evaluate the final band and the straight line; wrap them in an NEBResult.

    Args:
        obj: the objective.
        band: the final band ``(n + 2, d)``, ends included.
        E: the full-data loss at every image.
        G: the full-data gradient at every image.
        forces: the band's forces at ``E`` and ``G``.
        history: logged iterations, highest image loss, largest residual.
        iterations: iterations taken, all cycles together.
        cycles: cycles run.
        tol: the convergence threshold.
        per_segment: evaluation points per segment.
        recompute_norm: recompute BatchNorm statistics at each point.
        chunk_size: points per vectorised evaluation.
        eval_data: a second evaluation set.
        parameters: the settings, for the result.
        details: further outputs (e.g. the minibatch gradients spent).
        meters: the objective's meter, and that of its copy in another mode.
    """
    a, b = band[0], band[-1]
    gaps = (band[1:] - band[:-1]).norm(dim=1)
    knots = torch.cat([gaps.new_zeros(1), gaps.cumsum(0)]) / gaps.sum()
    knots[-1] = 1.0
    u = torch.arange(per_segment, dtype=band.dtype, device=band.device) / per_segment
    steps = band[1:] - band[:-1]
    points = (band[:-1, None] + u[:, None] * steps[:, None]).flatten(0, 1)
    points = torch.cat([points, band[-1:]])
    ts = (knots[:-1, None] + u * (knots[1:] - knots[:-1])[:, None]).flatten()
    ts = torch.cat([ts, knots[-1:]])
    kw: dict[str, Any] = {
        "recompute_norm": recompute_norm,
        "eval_data": eval_data,
        "chunk_size": chunk_size,
    }
    path = path_result(obj, ts, points, kind="neb", meter=CostMeter(obj), **kw)
    line = interpolate(obj, a, b, n_points=len(ts), **kw)
    residual = torch.full_like(E, math.nan)
    residual[1:-1] = forces.residual
    saddle = interior_maximum(E)
    grad_norm = G.norm(dim=1)
    nan = math.nan
    steps_logged, top, force = history
    return NEBResult(
        control_points=band,
        kind="neb",
        ts=path.ts,
        loss=path.loss,
        accuracy=path.accuracy,
        barrier=path.barrier,
        barrier_t=path.barrier_t,
        linear_loss=line.loss,
        linear_accuracy=line.accuracy,
        linear_barrier=float(line.barrier),
        history_step=torch.tensor(steps_logged, dtype=torch.int64),
        history_loss=torch.tensor(top, dtype=torch.float64),
        steps=iterations,
        eval_loss=path.eval_loss,
        eval_barrier=path.eval_barrier,
        linear_eval_loss=line.eval_loss,
        linear_eval_barrier=line.eval_barrier,
        image_ts=knots.cpu(),
        image_loss=E.cpu(),
        image_grad_norm=grad_norm.cpu(),
        image_residual=residual.cpu(),
        saddle_index=saddle,
        saddle_loss=nan if saddle is None else float(E[saddle]),
        saddle_grad_norm=nan if saddle is None else float(grad_norm[saddle]),
        saddle_t=nan if saddle is None else float(knots[saddle]),
        max_residual=forces.max_residual,
        tol=float(tol),
        converged=bool(forces.max_residual < tol),
        history_force=torch.tensor(force, dtype=torch.float64),
        cycles=cycles,
        parameters=parameters,
        details={"local_maxima": _local_maxima(E), **details},
        cost=_cost(*meters),
    )


def _local_maxima(E: Tensor) -> list[int]:
    """Movable images higher than both neighbours: saddle candidates (one climbs)."""
    here = E[1:-1]
    peak = (here > E[:-2]) & (here > E[2:])
    return (peak.nonzero().flatten() + 1).tolist()


def _cost(meter: CostMeter, force_meter: CostMeter | None) -> Cost:
    """The cost on the objective, plus the work done on its copy in another mode."""
    cost = meter.stop()
    if force_meter is None:
        return cost
    spent = force_meter.stop()
    return cost.add(spent.matvecs, spent.data_passes, **spent.counters)
