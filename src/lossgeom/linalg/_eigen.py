"""What the eigenvalue methods share: the result, the ends of a spectrum, checks.

:func:`~lossgeom.linalg.lanczos` and :func:`~lossgeom.linalg.power_iteration` both
return an :class:`EigenResult`, take ``which`` from :data:`Which` and check their
arguments the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from lossgeom._results import Result
from lossgeom.linalg._operator import SymmetricOperator

__all__ = ["EIGEN_DEFINITION", "Criterion", "EigenResult", "Which", "gap_bounds"]

EIGEN_DEFINITION = (
    "eigenpairs (lambda_i, u_i) of a symmetric operator A at the requested end of "
    "its spectrum, by Krylov iteration; residual r_i = ||A u_i - lambda_i u_i|| "
    "(some eigenvalue of A lies within r_i of lambda_i); error bound "
    "e_i = min(r_i, r_i^2 / gap_i), gap_i the distance from lambda_i to the other "
    "Ritz values less their residuals (Kato-Temple); a pair is converged when "
    "r_i <= tol * spectral_scale (criterion 'residual') or e_i <= tol * "
    "spectral_scale (criterion 'value')"
)

Which = Literal["largest", "smallest", "both", "magnitude"]
Criterion = Literal["residual", "value"]
_CRITERIA = ("residual", "value")
_WHICH = ("largest", "smallest", "both", "magnitude")


@dataclass(frozen=True)
class EigenResult(Result):
    """Eigenpairs with their certificates.

    Attributes:
        values: eigenvalue estimates; descending for ``"largest"``, ``"both"`` and
            ``"magnitude"`` (by absolute value), ascending for ``"smallest"``.
        vectors: unit eigenvector estimates, shape ``(d, k)``.
        residuals: ``||A u_i - lambda_i u_i||`` for each pair, computed explicitly
            (or, with ``explicit_residuals=False``, from the Lanczos relation).
        converged: per pair, ``residuals <= tol * spectral_scale`` (criterion
            ``"residual"``) or ``error_bounds <= tol * spectral_scale``
            (criterion ``"value"``).
        method: ``"lanczos"``, ``"power"`` or ``"lobpcg"``.
        which: which end of the spectrum.
        tol: the relative residual tolerance.
        spectral_scale: the largest absolute Ritz value seen (an estimate of
            ``||A||``); residuals are judged relative to it.
        n_restarts: thick restarts (Lanczos) or total iterations (power).
        error_bounds: a bound on ``|lambda_i - lambda_true|`` per value,
            ``min(r_i, r_i^2 / gap_i)`` (see :func:`gap_bounds`); ``None`` for
            methods that do not compute one.
        criterion: what ``tol`` bounds: ``"residual"`` or ``"value"``.
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`; ``cost.matvecs`` counts the final residual
            check too, ``details`` the basis size, budget and verification rounds.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    converged: Tensor
    method: str
    which: str
    tol: float
    spectral_scale: float
    n_restarts: int = 0
    error_bounds: Tensor | None = None
    criterion: str = "residual"
    definition: str = field(default=EIGEN_DEFINITION, kw_only=True)
    bulky: ClassVar[tuple[str, ...]] = ("vectors",)

    @property
    def all_converged(self) -> bool:
        """Whether every pair met the tolerance."""
        return bool(self.converged.all())

    def scalars(self) -> dict[str, float]:
        """The extreme eigenvalue found (``value``) and its residual (``bound``)."""
        if self.values.numel() == 0:
            return {}
        return {"value": float(self.values[0]), "bound": float(self.residuals[0])}


def gap_bounds(
    values: Tensor,
    residuals: Tensor,
    others: Tensor,
    other_residuals: Tensor,
    floor: float = 0.0,
) -> Tensor:
    """Error bounds ``min(r_i, r_i^2 / gap_i)`` of Ritz values, from their gaps.

    ``values[i]`` is the Rayleigh quotient of a unit vector with residual norm
    ``residuals[i]``; some eigenvalue lies within ``r_i`` of it (Weyl), and when
    the nearest *other* eigenvalue is ``gap_i`` away, the one it approximates is
    within ``r_i^2 / gap_i`` (the Kato-Temple inequality; Parlett, *The
    Symmetric Eigenvalue Problem*, 1998, section 10.5). The other eigenvalues are
    known only through the other Ritz values (``values`` without ``i``, and
    ``others``), each within its residual of one, so
    ``gap_i = min_j |lambda_i - theta_j| - r_j``; where that is not larger than
    ``r_i`` the bound is ``r_i``. The gap assumes the Krylov space has seen
    every eigenvalue near ``lambda_i``: the verification search
    (``verify=True``) is what checks that for the wanted end. No bound is
    smaller than ``floor``, the rounding error of a Ritz value computed from
    products in finite precision (the callers pass ``2 eps ||A||``, ``eps`` the
    products' rounding unit; measured errors of float32 Hessian eigenvalues
    against float64 references were 0.3-0.5 ``eps ||A||``).

    Args:
        values: the Ritz values bounded, ``(k,)``.
        residuals: their residual norms, ``(k,)``.
        others: further Ritz values, ``(m,)``.
        other_residuals: their residual norms, ``(m,)``.
        floor: the smallest bound reported.

    Returns:
        ``(k,)`` float64 bounds.
    """
    v = values.double().reshape(-1)
    r = residuals.double().reshape(-1).to(v.device)
    pool = torch.cat([v, others.double().reshape(-1).to(v.device)])
    radii = torch.cat([r, other_residuals.double().reshape(-1).to(v.device)])
    dist = (v[:, None] - pool[None, :]).abs() - radii[None, :]
    k = v.numel()
    if pool.numel() <= 1:  # nothing known about the rest of the spectrum
        return r.clamp_min(floor)
    dist[torch.arange(k), torch.arange(k)] = math.inf
    gap = dist.min(dim=1).values
    quad = torch.where(gap > r, r * r / gap.clamp_min(torch.finfo(v.dtype).tiny), r)
    return torch.minimum(r, quad).clamp_min(floor)


def _check_args(op: SymmetricOperator, k: int, which: str, tol: float) -> int:
    if not hasattr(op, "shape") or not hasattr(op, "__matmul__"):
        raise TypeError(
            "expected a symmetric operator with .shape and @ (e.g. lg.hessian(obj)); "
            f"got {type(op).__name__}."
        )
    d = op.shape[0]
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}; got {which!r}.")
    wanted = 2 * k if which == "both" else k
    if not isinstance(k, int) or k < 1 or wanted > d:
        raise ValueError(
            f"k must be an integer with 1 <= k <= d = {d}"
            + (" (and 2k <= d for which='both')" if which == "both" else "")
            + f"; got k={k!r}."
        )
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(
            f"tol must be a positive number (a relative residual, e.g. 1e-6); got {tol!r}."
        )
    return wanted


def _key(values: Tensor, which: str) -> Tensor:
    """Sort key of ``which``: larger means more wanted (``"both"`` is not a key)."""
    if which == "largest":
        return values
    if which == "smallest":
        return -values
    return values.abs()
