"""Extreme eigenvalues of a symmetric operator: restarted block Lanczos, certified.

The method builds an orthonormal basis ``Q`` of a block Krylov space with full
reorthogonalisation (every new block is projected against all of ``Q`` twice), so
the projected matrix ``T = Q^T A Q`` is formed explicitly and no "ghost" copies of
converged eigenvalues appear. When the basis reaches its maximum size it is
restarted thickly: the wanted Ritz vectors (and a few more on the same side) are
kept and the Krylov expansion goes on from the last residual block, as in the
thick-restart Lanczos of Wu & Simon (2000) and the Krylov-Schur method of
Stewart (2001). A block of ``b`` start vectors finds eigenvalues of multiplicity up
to ``b``; a single vector finds one copy of a repeated eigenvalue only.

Stopping uses the Ritz residual ``||A u - theta u||``, known without extra
products from the relation ``A Q = Q T + Q_next B E^T``, or (``criterion="value"``)
the eigenvalue error bound ``min(r, r^2 / gap)`` it implies. The returned residuals
are recomputed explicitly at the end from the products themselves: ``A u = (A Q) s``
with ``A Q`` kept as multiplied when that fits in a few hundred megabytes, else by
``k`` more products; so they certify the result rather than the algorithm's belief
about it.

Written here rather than taken from ``scipy.sparse.linalg.eigsh`` because we need
blocks of vectors per product (one batched pass over the data), warm starts from
previous eigenvectors, tensors on the operator's device, and explicit residuals.

Modules: :mod:`lossgeom.linalg._krylov` (one run), :mod:`lossgeom.linalg._verify`
(the search for missed eigenvalues), :mod:`lossgeom.linalg.power` (power
iteration, for comparison) and :mod:`lossgeom.linalg._eigen` (the shared result).
"""

from __future__ import annotations

import dataclasses
import time

import torch  # noqa: F401 - the example in lanczos' docstring runs with it
from torch import Tensor

from lossgeom.linalg._eigen import EIGEN_DEFINITION, Criterion, EigenResult, Which
from lossgeom.linalg._krylov import _lanczos_core
from lossgeom.linalg._operator import SymmetricOperator, working
from lossgeom.linalg._verify import verify as _verify
from lossgeom.linalg.power import power_iteration

__all__ = ["EIGEN_DEFINITION", "EigenResult", "Which", "lanczos", "power_iteration"]


def lanczos(
    op: SymmetricOperator,
    k: int = 5,
    *,
    verify: bool = True,
    which: Which = "largest",
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    seed: int = 0,
    block_size: int | None = None,
    ncv: int | None = None,
    v0: Tensor | None = None,
    check_symmetry: bool = True,
    explicit_residuals: bool = True,
    criterion: Criterion = "residual",
) -> EigenResult:
    """Extreme eigenpairs by restarted block Lanczos with full reorthogonalisation.

    Args:
        op: symmetric operator (``op @ V`` for ``V`` of shape ``(d, b)``).
        k: eigenpairs wanted (from each end for ``which="both"``).
        which: ``"largest"``, ``"smallest"``, ``"both"`` or ``"magnitude"``.
        tol: stop when every wanted Ritz residual (criterion ``"residual"``) or
            eigenvalue error bound (``"value"``) is at most ``tol`` times the
            spectral scale (the largest absolute Ritz value).
        max_matvecs: budget of products (default ``max(600, 40 * k * b)``, at
            most enough to span the whole space a few times).
        seed: seed of the random start block.
        block_size: vectors per product; eigenvalues of multiplicity up to
            ``block_size`` are certain to be found (a single vector finds repeats
            through rounding only; reliably in our tests). Default 1.
        ncv: largest basis size before a restart (default ``max(2 k + 4 b, 40)``
            rounded to a multiple of ``b``, at most ``d``).
        v0: warm start, e.g. the ``vectors`` of a previous result, shape
            ``(d, j)``; random columns fill the block.
        check_symmetry: compare ``u . A v`` with ``v . A u`` on the first Krylov
            vectors (no extra products) and refuse a non-symmetric operator.
        verify: after convergence, search the operator deflated of the found
            eigenvectors from a fresh random start; an eigenvalue that belongs
            among the wanted ones (a missed copy of a repeated eigenvalue, which
            a Krylov space of block size ``b`` cannot see beyond multiplicity
            ``b``) is added and the search repeats. Costs one more short run.
        explicit_residuals: recompute ``||A u - lambda u||`` from the products
            (the certificate): from ``A Q`` as multiplied when it is kept, else
            with ``k`` more products. ``False`` reports the residuals the
            Lanczos relation gives, exact in exact arithmetic and reliable with
            full reorthogonalisation; for cheap tracking during training.
        criterion: what ``tol`` bounds. ``"residual"``: the residual, which
            bounds the eigenvalue's error and (divided by the gap) the
            eigenvector's angle. ``"value"``: the eigenvalue's error bound
            ``min(r, r^2 / gap)`` (``EigenResult.error_bounds``), which is met at a
            residual near ``sqrt(tol * gap)`` and so in far fewer products when
            only the eigenvalues are wanted; the vectors are then accurate to
            about ``r / gap`` only.

    Returns:
        An :class:`EigenResult`.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> from lossgeom.linalg import DenseOperator
        >>> res = lanczos(DenseOperator(A), k=3, tol=1e-10)
        >>> [round(v, 8) for v in res.values.tolist()], res.all_converged
        ([100.0, 99.0, 98.0], True)
    """
    start = time.perf_counter()
    dtype, op = op.dtype, working(op)
    if v0 is not None and isinstance(v0, Tensor):
        v0 = v0.to(op.dtype)
    res = _lanczos_core(
        op,
        k,
        which=which,
        tol=tol,
        max_matvecs=max_matvecs,
        seed=seed,
        block_size=block_size,
        ncv=ncv,
        v0=v0,
        check_symmetry=check_symmetry,
        explicit=explicit_residuals,
        criterion=criterion,
    )
    if verify and which != "both":
        res = _verify(op, res, k, which=which, tol=tol, seed=seed, start=start)
    if res.values.dtype == dtype:
        return res
    # computed in a working precision: hand back the operator's dtype
    return dataclasses.replace(
        res,
        values=res.values.to(dtype),
        vectors=res.vectors.to(dtype),
        residuals=res.residuals.to(dtype),
        error_bounds=None if res.error_bounds is None else res.error_bounds.to(dtype),
    )
