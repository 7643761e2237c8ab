"""What the eigenvalue methods share: the result, the ends of a spectrum, checks.

:func:`~lossgeom.linalg.lanczos` and :func:`~lossgeom.linalg.power_iteration` both
return an :class:`EigenResult`, take ``which`` from :data:`Which` and check their
arguments the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from torch import Tensor

from lossgeom._results import Result
from lossgeom.linalg._operator import SymmetricOperator

__all__ = ["EIGEN_DEFINITION", "EigenResult", "Which"]

EIGEN_DEFINITION = (
    "eigenpairs (lambda_i, u_i) of a symmetric operator A at the requested end of "
    "its spectrum, by Krylov iteration; residual r_i = ||A u_i - lambda_i u_i|| "
    "(a pair is converged when r_i <= tol * spectral_scale, and then some "
    "eigenvalue of A lies within r_i of lambda_i)"
)

Which = Literal["largest", "smallest", "both", "magnitude"]
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
        converged: ``residuals <= tol * spectral_scale`` per pair.
        method: ``"lanczos"``, ``"power"`` or ``"lobpcg"``.
        which: which end of the spectrum.
        tol: the relative residual tolerance.
        spectral_scale: the largest absolute Ritz value seen (an estimate of
            ``||A||``); residuals are judged relative to it.
        n_restarts: thick restarts (Lanczos) or total iterations (power).
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
