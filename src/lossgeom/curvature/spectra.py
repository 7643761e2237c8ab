"""Spectral summaries of curvature operators (an Objective means its Hessian)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lossgeom.curvature.hessian import hessian
from lossgeom.linalg import SymmetricOperator
from lossgeom.linalg.lanczos import EigenResult, Which, lanczos, power_iteration
from lossgeom.linalg.trace import TraceResult, trace_estimate
from lossgeom.objective import Objective

__all__ = ["as_operator", "eigenvalues", "trace"]


def as_operator(op: SymmetricOperator | Objective) -> SymmetricOperator:
    """An operator as given, or the Hessian of an :class:`Objective`."""
    if isinstance(op, Objective):
        return hessian(op)
    if isinstance(op, SymmetricOperator):
        return op
    raise TypeError(
        "expected a lossgeom operator (lg.hessian(obj), lg.ggn(obj), "
        "lg.DenseOperator(A), ...) or an Objective (meaning its Hessian); got "
        f"{type(op).__name__}."
    )


def eigenvalues(
    op: SymmetricOperator | Objective,
    k: int = 5,
    *,
    which: Which = "largest",
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    seed: int = 0,
    method: Literal["lanczos", "power"] = "lanczos",
    block_size: int | None = None,
    v0: Tensor | None = None,
    verify: bool = True,
) -> EigenResult:
    """Extreme eigenvalues with residual certificates.

    ``method="lanczos"`` (default) is restarted block Lanczos with full
    reorthogonalisation (:func:`lossgeom.linalg.lanczos`); ``method="power"`` is
    deflated power iteration by magnitude, kept to compare with the literature.
    Pass ``v0=previous.vectors`` to warm-start when tracking during training.

    Args:
        op: an operator, or an Objective (its Hessian).
        k: eigenpairs (from each end for ``which="both"``).
        which: ``"largest"``, ``"smallest"``, ``"both"`` or ``"magnitude"``.
        tol: relative residual tolerance.
        max_matvecs: budget of products.
        seed: seed of the start vectors.
        method: ``"lanczos"`` or ``"power"``.
        block_size: Lanczos block size (finds multiplicities up to it).
        v0: warm-start vectors ``(d, j)``.
        verify: search the deflated operator once more for a missed eigenvalue
            (a further copy of a repeated one); turn off for cheap tracking.

    Returns:
        :class:`~lossgeom.linalg.lanczos.EigenResult` with ``values``,
        ``vectors``, ``residuals``, ``converged``, ``n_matvecs``, ``seconds``.
    """
    operator = as_operator(op)
    if method == "lanczos":
        return lanczos(
            operator,
            k,
            which=which,
            tol=tol,
            max_matvecs=max_matvecs,
            seed=seed,
            block_size=block_size,
            v0=v0,
            verify=verify,
        )
    if method == "power":
        if which != "magnitude":
            raise ValueError(
                "method='power' finds eigenvalues of largest magnitude; pass "
                "which='magnitude' (or use method='lanczos')."
            )
        return power_iteration(operator, k, tol=tol, max_matvecs=max_matvecs, seed=seed)
    raise ValueError(f"method must be 'lanczos' or 'power'; got {method!r}.")


def trace(
    op: SymmetricOperator | Objective,
    n_matvecs: int = 100,
    *,
    method: Literal["auto", "hutchinson", "hutch++"] = "auto",
    seed: int = 0,
    rel_tol: float | None = None,
) -> TraceResult:
    """The trace with a standard error (Hutchinson or Hutch++).

    See :func:`lossgeom.linalg.trace.trace_estimate`; ``"auto"`` sketches first
    and finishes with whichever of the two the sketch predicts to be more exact.

    Args:
        op: an operator, or an Objective (its Hessian).
        n_matvecs: budget of products.
        method: ``"auto"``, ``"hutchinson"`` or ``"hutch++"``.
        seed: seed of the probes.
        rel_tol: stop early once ``stderr <= rel_tol * |value|``.

    Returns:
        :class:`~lossgeom.linalg.trace.TraceResult` with ``value``, ``stderr``,
        ``n_matvecs``, ``method``.
    """
    return trace_estimate(
        as_operator(op), n_matvecs, method=method, seed=seed, rel_tol=rel_tol
    )
