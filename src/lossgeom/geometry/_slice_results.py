"""What a slice returns: the 1-D and 2-D results and their ruggedness statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lossgeom._results import Result

__all__ = ["SLICE_DEFINITION", "SURFACE_DEFINITION", "SliceResult", "Surface"]


def _tv(y: Tensor, dim: int) -> Tensor:
    return y.diff(dim=dim).abs().sum(dim)


def _step(x: Tensor) -> float:
    """The spacing of a uniform grid (positive); ``ValueError`` if not uniform."""
    if x.numel() < 2:
        return 1.0
    gaps = x.double().diff().abs()
    h = float(gaps.mean())
    if float((gaps - h).abs().max()) > 1e-6 * max(h, 1e-300):
        raise ValueError(
            "slice statistics need an evenly spaced grid (e.g. torch.linspace); "
            f"got spacings from {float(gaps.min()):.3g} to {float(gaps.max()):.3g}."
        )
    return h


def _second_energy(y: Tensor, x: Tensor, dim: int) -> Tensor:
    """``sum (second difference / h^2)^2 h``: a discrete integral of ``L''^2``."""
    h = _step(x)
    d2 = y.diff(n=2, dim=dim) / h**2
    return (d2 * d2).sum(dim) * h


SLICE_DEFINITION = (
    "L(theta + alpha d) on a grid of alpha along one or more directions d "
    "(normalized filter-wise by default, Li et al. 2018), on the objective's data"
)
SURFACE_DEFINITION = (
    "L(theta + alpha d1 + beta d2) on a grid of (alpha, beta) over two directions "
    "(normalized filter-wise by default, Li et al. 2018), on the objective's data"
)


@dataclass(frozen=True)
class SliceResult(Result):
    """A 1-D slice ``L(theta + alpha d)`` along one or more directions.

    Attributes:
        alphas: grid ``(n_alpha,)``, in units of the direction.
        loss: ``(n_dir, n_alpha)`` loss on the objective's data.
        accuracy: ``(n_dir, n_alpha)`` (classification only).
        eval_loss, eval_accuracy: the same on the second evaluation set.
        quadratic: ``(n_dir, n_alpha)`` local quadratic model
            ``L + alpha g.d + alpha^2 d.Hd / 2`` when asked for.
        slope, curvature: ``g.d`` and ``d.Hd`` per direction (with ``quadratic``).
        directions: how the directions were made (normalization, seed, ...).
        recompute_norm: whether BatchNorm statistics were recomputed per point.
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`; ``parameters`` describes the objective.
    """

    alphas: Tensor
    loss: Tensor
    accuracy: Tensor | None = None
    eval_loss: Tensor | None = None
    eval_accuracy: Tensor | None = None
    quadratic: Tensor | None = None
    slope: Tensor | None = None
    curvature: Tensor | None = None
    directions: dict = field(default_factory=dict)
    recompute_norm: bool = False
    definition: str = field(default=SLICE_DEFINITION, kw_only=True)

    def scalars(self) -> dict[str, float]:
        """The ruggedness statistics (:meth:`statistics`)."""
        return {k: float(v) for k, v in self.statistics().items()}

    @property
    def mean(self) -> Tensor:
        """Mean loss over directions at each alpha, ``(n_alpha,)``."""
        return self.loss.mean(0)

    def band(self, lower: float = 0.1, upper: float = 0.9) -> tuple[Tensor, Tensor]:
        """Quantile band of the loss over directions at each alpha."""
        q = torch.tensor([lower, upper], dtype=self.loss.dtype)
        lo, hi = torch.quantile(self.loss, q, dim=0)
        return lo, hi

    def statistics(self) -> dict[str, float]:
        """Ruggedness of the slices (means over directions, with standard errors).

        - ``total_variation``: ``sum |L(a_{i+1}) - L(a_i)|`` along a slice;
        - ``excess_variation``: total variation minus the rise from the minimum to
          the two ends (0 for a slice that falls then rises once; grows with every
          extra bump);
        - ``second_difference_energy``: ``sum (Delta^2 L / h^2)^2 h`` (a discrete
          integral of ``L''^2``);
        - ``slice_variance``: variance of the loss across directions, averaged
          over the grid (how much the picture depends on the direction drawn).
        """
        loss = self.loss.double()
        tv = _tv(loss, 1)
        rise = (loss[:, 0] - loss.min(1).values) + (loss[:, -1] - loss.min(1).values)
        excess = tv - rise
        energy = _second_energy(loss, self.alphas.double(), 1)
        n = loss.shape[0]

        def se(x: Tensor) -> float:
            return float(x.std() / math.sqrt(n)) if n > 1 else math.nan

        return {
            "total_variation": float(tv.mean()),
            "total_variation_stderr": se(tv),
            "excess_variation": float(excess.mean()),
            "excess_variation_stderr": se(excess),
            "second_difference_energy": float(energy.mean()),
            "second_difference_energy_stderr": se(energy),
            "slice_variance": float(loss.var(0).mean()) if n > 1 else math.nan,
            "n_directions": n,
        }


@dataclass(frozen=True)
class Surface(Result):
    """A 2-D slice ``L(theta + alpha d1 + beta d2)`` on a grid.

    Attributes:
        alphas, betas: the grid axes.
        loss: ``(n_alpha, n_beta)``; ``loss[i, j]`` is at ``(alphas[i], betas[j])``.
        accuracy, eval_loss, eval_accuracy: as for :class:`SliceResult`.
        directions: how ``d1`` and ``d2`` were made, their norms and cosine.
        trajectory: optional ``(T, 2)`` coordinates of a path to draw on top
            (e.g. :class:`PCADirections` ``coords``), with ``trajectory_residuals``.
        recompute_norm: whether BatchNorm statistics were recomputed per point.
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`.
    """

    alphas: Tensor
    betas: Tensor
    loss: Tensor
    accuracy: Tensor | None = None
    eval_loss: Tensor | None = None
    eval_accuracy: Tensor | None = None
    directions: dict = field(default_factory=dict)
    trajectory: Tensor | None = None
    trajectory_residuals: Tensor | None = None
    recompute_norm: bool = False
    definition: str = field(default=SURFACE_DEFINITION, kw_only=True)

    def scalars(self) -> dict[str, float]:
        """The ruggedness statistics (:meth:`statistics`)."""
        return self.statistics()

    def statistics(self) -> dict[str, float]:
        """Ruggedness of the surface.

        Total variation along each axis (mean per line) and the discrete integral
        of the squared Laplacian.
        """
        loss = self.loss.double()
        a, b = self.alphas.double(), self.betas.double()
        ha, hb = _step(a), _step(b)
        out = {
            "total_variation_alpha": float(_tv(loss, 0).mean()),
            "total_variation_beta": float(_tv(loss, 1).mean()),
        }
        if min(loss.shape) >= 3:
            lap = loss[2:, 1:-1] - 2 * loss[1:-1, 1:-1] + loss[:-2, 1:-1]
            lap = lap / ha**2
            lap = (
                lap + (loss[1:-1, 2:] - 2 * loss[1:-1, 1:-1] + loss[1:-1, :-2]) / hb**2
            )
            out["laplacian_energy"] = float((lap * lap).sum() * ha * hb)
        return out
