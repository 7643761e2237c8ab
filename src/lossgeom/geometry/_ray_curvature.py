"""Curvature along random rays by finite differences, checked against ``d.Hd``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lossgeom._results import CostMeter, Result
from lossgeom.geometry._directions import random_directions
from lossgeom.geometry._evaluation import evaluate_grid
from lossgeom.objective import Normalization, Objective, OneDim, check_direction

__all__ = ["RayCurvature", "ray_curvature"]


@dataclass(frozen=True)
class RayCurvature(Result):
    """Second derivatives of the loss along random rays, by finite differences.

    ``fd[i] = (L(theta + h d_i) - 2 L(theta) + L(theta - h d_i)) / h^2`` estimates
    ``d_i . H d_i``; with ``exact`` the Hessian-vector products give the exact
    values to compare with (the difference is the finite-difference error, of
    order ``h^2`` times the fourth derivative, plus rounding ``eps L / h^2``).
    On ReLU networks the two measure different things: a finite step crosses
    kinks whose curvature the Hessian (which sees ReLU as piecewise linear) does
    not contain, so ``relative_difference`` is then not small at any step.

    Attributes:
        fd: finite-difference curvatures ``(n_rays,)``.
        exact: ``d.Hd`` per ray (``None`` when not asked).
        mean, std, stderr: of ``fd`` over rays.
        negative_fraction: fraction of rays with ``fd < 0``.
        relative_difference: ``max |fd - exact| / mean |exact|`` (``None``
            without ``exact``).
        step: ``h``.
        directions: how the rays were drawn.
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`.
    """

    fd: Tensor
    exact: Tensor | None
    mean: float
    std: float
    stderr: float
    negative_fraction: float
    step: float
    relative_difference: float | None = None
    directions: dict = field(default_factory=dict)
    definition: str = field(
        default="d.Hd along random rays d by central differences "
        "(L(theta + h d) - 2 L(theta) + L(theta - h d)) / h^2, with the exact "
        "d.Hd from Hessian-vector products to compare",
        kw_only=True,
    )

    def scalars(self) -> dict[str, float]:
        """The mean curvature over rays (``value``) with its standard error."""
        return {
            "value": self.mean,
            "stderr": self.stderr,
            "negative_fraction": self.negative_fraction,
        }


def ray_curvature(
    obj: Objective,
    n_rays: int = 64,
    *,
    normalization: Normalization = "filter",
    step: float = 1e-2,
    seed: int = 0,
    one_dim: OneDim = "zero",
    theta: Tensor | None = None,
    exact: bool = True,
    chunk_size: int | None | str = "auto",
) -> RayCurvature:
    """Monte Carlo curvature along random rays, cross-checked against ``d.Hd``.

    All ``2 n_rays + 1`` points go through one batched evaluation; with ``exact``
    the rays' Hessian products go through one batched HVP.

    Args:
        obj: the objective.
        n_rays: number of random directions.
        normalization: normalization of the rays (:func:`random_directions`).
        seed: first seed of the rays.
        one_dim: rule for 1-D parameters.
        step: finite-difference step ``h`` in units of the direction.
        theta: where (default ``obj.theta``).
        exact: also compute ``d.Hd`` exactly.
        chunk_size: points per vectorised evaluation, 1, or "auto" (see
            :func:`slice_1d`).
    """
    if not isinstance(n_rays, int) or n_rays < 1:
        raise ValueError(f"n_rays must be an int >= 1; got {n_rays!r}.")
    if not step > 0:
        raise ValueError(f"step must be > 0; got {step!r}.")
    meter = CostMeter(obj)
    center = obj.theta if theta is None else check_direction(obj, theta, "theta")
    dirs = random_directions(
        obj, n_rays, normalization, seed=seed, one_dim=one_dim, theta=center
    )
    eye = torch.eye(n_rays, dtype=obj.dtype, device=obj.device)
    coefs = torch.cat([step * eye, -step * eye, eye[:1] * 0])
    values = evaluate_grid(
        obj,
        center,
        coefs,
        dirs,
        recompute_norm=False,
        eval_obj=None,
        chunk_size=chunk_size,
    )["loss"].double()
    plus, minus, mid = values[:n_rays], values[n_rays : 2 * n_rays], values[-1]
    fd = (plus - 2 * mid + minus) / step**2
    ex = None
    if exact:
        HV = obj.hvp(dirs.T.contiguous(), theta=center)
        ex = (dirs * HV.T).sum(1).double().cpu()
    std = float(fd.std()) if n_rays > 1 else math.nan
    return RayCurvature(
        fd=fd,
        exact=ex,
        mean=float(fd.mean()),
        std=std,
        stderr=std / math.sqrt(n_rays) if n_rays > 1 else math.nan,
        negative_fraction=float((fd < 0).double().mean()),
        step=float(step),
        relative_difference=(
            None
            if ex is None
            else float((fd - ex).abs().max() / ex.abs().mean().clamp_min(1e-300))
        ),
        directions={"normalization": normalization, "one_dim": one_dim, "seed": seed},
        parameters={"objective": obj.info(), "n_rays": n_rays, "step": float(step)},
        cost=meter.stop(),
    )
