"""Extreme eigenvalues by LOBPCG: a block of vectors improved by local Rayleigh-Ritz.

Knyazev's (2001, SIAM J. Sci. Comput. 23(2)) locally optimal block preconditioned
conjugate gradient, here without a preconditioner. Each iteration does
Rayleigh-Ritz on the span of ``[X, R, P]``: the current block ``X`` of ``m``
approximate eigenvectors, their residuals ``R = A X - X Theta`` and the previous
search directions ``P``; the best ``m`` Ritz vectors become the new ``X``. Only
``R`` costs products (one per active column), ``A X`` and ``A P`` are updated
implicitly from the same Ritz coefficients.

Robustness, the reason this is written here rather than calling ``torch.lobpcg``
(which needs ``d >= 3 k`` and fails with a Cholesky error as soon as its basis is
ill-conditioned, typically near convergence):

- the basis is orthonormal by construction. ``R`` is projected against
  ``[X, P]`` twice and orthonormalised by Cholesky-QR (done twice) before it is
  multiplied, so ``A R`` is exact; when the Cholesky factorisation fails or is
  ill-conditioned, a Householder QR marks the (numerically) dependent columns,
  they are dropped, and Cholesky-QR orthonormalises the rest. ``P`` is made
  orthonormal and orthogonal to the new ``X`` in the small space of Ritz
  coefficients (Duersch et al. 2018 do the same), so ``A P`` never goes through
  an ill-conditioned triangular solve. A small space (``3 m > d``) or a converged
  block only shrinks the basis;
- soft locking: columns whose residual is below the tolerance stay in ``X`` (and
  in the Rayleigh-Ritz) but get no residual direction, so they cost no products;
- the implicitly updated ``A X`` is checked: when it says the wanted pairs have
  converged, their residuals are recomputed with explicit products, and the
  iteration goes on from the explicit ones when they disagree.

The returned residuals are explicit and judged as Lanczos judges them
(``r_i <= tol * spectral_scale``), and the same verification search (Lanczos on
the operator deflated of the found vectors, :mod:`lossgeom.linalg._verify`) looks
for a missed wanted eigenvalue. A block of ``m`` vectors finds eigenvalues of
multiplicity up to ``m``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import torch
from torch import Tensor

from lossgeom._results import Cost
from lossgeom.linalg._eigen import (
    EIGEN_DEFINITION,
    EigenResult,
    _check_args,
    gap_bounds,
)
from lossgeom.linalg._krylov import _check_symmetric, _start_block
from lossgeom.linalg._operator import (
    SymmetricOperator,
    apply_checked,
    product_eps,
    working,
)
from lossgeom.linalg._verify import verify as _verify

__all__ = ["EIGEN_DEFINITION", "lobpcg"]


def _project(V: Tensor, B: Tensor) -> Tensor:
    """Remove from ``V`` its part in the orthonormal ``B`` (twice, for accuracy)."""
    if B.shape[1] == 0:
        return V
    for _ in range(2):
        V = V - B @ (B.T @ V)
    return V


def _cholqr(V: Tensor) -> Tensor | None:
    """``T`` upper-triangular inverse with ``V T`` orthonormal, or ``None`` if unsafe."""
    G = V.T @ V
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:
        return None
    diag = L.diagonal()
    if float(diag.min()) <= 1e-6 * float(diag.max()):  # cond(V) above 1e6
        return None
    eye = torch.eye(V.shape[1], dtype=V.dtype, device=V.device)
    return torch.linalg.solve_triangular(L.T, eye, upper=True)


def _orthonormalize(V: Tensor, drop_tol: float) -> Tensor:
    """Orthonormal columns spanning ``V``, numerically dependent columns dropped.

    Columns are first scaled to unit norm (a tiny residual is as useful a
    direction as a large one). Cholesky-QR, twice; when it fails or ``V`` is
    ill-conditioned, Householder QR marks the columns that lie (numerically) in
    the span of the earlier ones; they are dropped and Cholesky-QR tried again.
    """
    norms = V.norm(dim=0)
    V = V[:, norms > 0] / norms[norms > 0]
    for _ in range(2):
        T = _cholqr(V) if V.shape[1] else None
        for cut in (drop_tol, 1e-2):
            if T is not None or V.shape[1] == 0:
                break
            _, Rq = torch.linalg.qr(V)
            V = V[:, Rq.diagonal().abs() > cut]
            T = _cholqr(V) if V.shape[1] else None
        if T is None:
            return V[:, :0]
        V = V @ T
    return V


def _directions(C: Tensor, nx: int, drop_tol: float) -> Tensor:
    """Coefficients of the new search directions ``P = S Cp`` in the basis ``S``.

    ``C`` holds the new Ritz vectors' coefficients; their parts outside the old
    ``X`` (the first ``nx`` rows) span, with the new ``X``, the same space as the
    textbook ``P``. Made orthonormal and orthogonal to ``C`` here, in the small
    coefficient space, so that ``P`` and ``A P = (A S) Cp`` stay orthonormal and
    exact without an ill-conditioned triangular solve on ``A P``.
    """
    Z = C.clone()
    Z[:nx] = 0
    norms = Z.norm(dim=0)
    Z = Z[:, norms > 0] / norms[norms > 0]
    Z = _project(Z, C)
    if Z.shape[1] == 0:
        return Z
    U, sv, _ = torch.linalg.svd(Z, full_matrices=False)
    U = _project(U[:, sv > drop_tol * max(float(sv[0]), 1.0)], C)
    Q, Rq = torch.linalg.qr(U)
    return Q[:, Rq.diagonal().abs() > 0.5]


def _ritz(S: Tensor, AS: Tensor, m: int, which: str) -> tuple[Tensor, Tensor, float]:
    """Rayleigh-Ritz on the orthonormal basis ``S`` (with ``AS = A S``).

    Returns the ``m`` wanted Ritz values (most wanted first), their coefficients
    in ``S``, and the largest absolute Ritz value (the spectral scale).
    """
    G = S.T @ AS
    G = (G + G.T) / 2
    theta, C = torch.linalg.eigh(G.double())
    if which == "largest":
        theta, C = theta.flip(0), C.flip(1)
    return theta[:m], C[:, :m].to(S.dtype), float(theta.abs().max())


def _sizes(
    op: SymmetricOperator,
    k: int,
    which: str,
    tol: float,
    block_size: int | None,
    max_matvecs: int | None,
) -> tuple[int, int]:
    """Checked ``(block size, budget)``."""
    if which not in ("largest", "smallest"):
        raise ValueError(
            f"which must be 'largest' or 'smallest' for LOBPCG; got {which!r}. "
            "Use method='lanczos' for which='both' or 'magnitude'."
        )
    _check_args(op, k, which, tol)
    d = op.shape[0]
    m = k if block_size is None else block_size
    if not isinstance(m, int) or m < k or m > d:
        raise ValueError(
            f"block_size must be an integer with k = {k} <= block_size <= d = {d}; "
            f"got {block_size!r}."
        )
    budget = max(1000, 100 * m) if max_matvecs is None else max_matvecs
    if not isinstance(budget, int) or budget < m:
        raise ValueError(
            f"max_matvecs must be an integer at least block_size = {m} (one "
            f"product per column of the start block); got {max_matvecs!r}."
        )
    return m, budget


def lobpcg(
    op: SymmetricOperator,
    k: int = 5,
    *,
    which: Literal["largest", "smallest"] = "largest",
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    seed: int = 0,
    block_size: int | None = None,
    v0: Tensor | None = None,
    verify: bool = True,
) -> EigenResult:
    """Extreme eigenpairs by LOBPCG (Knyazev 2001) without preconditioner.

    Args:
        op: symmetric operator (``op @ V`` for ``V`` of shape ``(d, m)``).
        k: eigenpairs wanted.
        which: ``"largest"`` or ``"smallest"``.
        tol: stop when the ``k`` wanted residuals are at most ``tol`` times the
            spectral scale (the largest absolute Ritz value seen, of all the
            Rayleigh-Ritz bases, as for Lanczos).
        max_matvecs: budget of products (default ``max(1000, 100 m)``); the
            final explicit residuals of the ``k`` pairs may add ``k`` more.
        seed: seed of the random start block.
        block_size: ``m``, vectors iterated at once, ``k <= m <= d`` (default
            ``k``). Finds multiplicities up to ``m``; ``m > k`` adds guard vectors,
            which help when the ``k``-th eigenvalue is close to the next one but
            cost ``m - k`` products more per iteration. ``3 m > d`` is allowed.
        v0: warm start, shape ``(d, j)`` (e.g. a previous result's ``vectors``).
        verify: search the deflated operator once more for a missed wanted
            eigenvalue, as :func:`~lossgeom.linalg.lanczos` does.

    Returns:
        An :class:`~lossgeom.linalg.lanczos.EigenResult` with ``method="lobpcg"``;
        ``details`` has the block size, budget and iterations.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> from lossgeom.linalg import DenseOperator
        >>> res = lobpcg(DenseOperator(A), k=3, tol=1e-10)
        >>> [round(v, 8) for v in res.values.tolist()], res.all_converged
        ([100.0, 99.0, 98.0], True)
    """
    start = time.perf_counter()
    m, budget = _sizes(op, k, which, tol, block_size, max_matvecs)
    dtype, op = op.dtype, working(op)
    d, eps = op.shape[0], torch.finfo(op.dtype).eps
    gen = torch.Generator(device=op.device).manual_seed(seed)
    if v0 is not None and isinstance(v0, Tensor):
        v0 = v0.to(op.dtype)
    X0 = _start_block(op, m, v0, gen) if v0 is not None else None
    if X0 is None:
        X0 = torch.randn(d, m, generator=gen, dtype=op.dtype, device=op.device)
    drop = 1e3 * eps
    X = _orthonormalize(X0, drop)
    AX = apply_checked(op, X)
    n_mv = X.shape[1]
    theta, C, scale = _ritz(X, AX, m, which)
    X, AX = X @ C, AX @ C
    P, AP = X[:, :0], AX[:, :0]
    iterations, explicit = 0, False

    while True:
        thr = tol * max(scale, 1e-300)
        res = (AX - X * theta.to(op.dtype)).norm(dim=0)
        if bool((res[:k] <= thr).all()):
            # the implicit A X says converged: check with explicit products
            AX = torch.cat([apply_checked(op, X[:, :k]), AX[:, k:]], 1)
            n_mv += k
            res = (AX - X * theta.to(op.dtype)).norm(dim=0)
            explicit = True
            if bool((res[:k] <= thr).all()):
                break
        # soft locking: converged columns stay in X but get no new residual
        active = torch.nonzero(res > thr).flatten()[: budget - n_mv]
        if active.numel() == 0:
            break  # budget spent
        B, AB = torch.cat([X, P], 1), torch.cat([AX, AP], 1)
        R = _project((AX - X * theta.to(op.dtype))[:, active], B)
        R = _orthonormalize(R, drop)
        if R.shape[1] == 0:
            break  # the residuals lie in span(X, P): nothing new to find
        AR = apply_checked(op, R)
        n_mv += R.shape[1]
        S, AS = torch.cat([B, R], 1), torch.cat([AB, AR], 1)
        if iterations == 0:  # u.(A v) = v.(A u) on the first basis, or refuse
            G = (S.T @ AS).double()
            size = float(AS.norm(dim=0).max())
            _check_symmetric(G, G, size, d, op.dtype, product_eps(op))
        theta, C, seen = _ritz(S, AS, m, which)
        scale = max(scale, seen)
        Cp = _directions(C, X.shape[1], drop)
        X, AX, P, AP = S @ C, AS @ C, S @ Cp, AS @ Cp
        iterations, explicit = iterations + 1, False
        B = torch.cat([X, P], 1)
        eye = torch.eye(B.shape[1], dtype=B.dtype, device=B.device)
        if float((B.T @ B - eye).abs().max()) > 1e-10:  # drift: re-orthonormalise
            T = _cholqr(B)
            if T is None:  # P has become useless: restart the directions
                P, AP = P[:, :0], AP[:, :0]
                T = _cholqr(X)
                if T is not None:
                    X, AX = X @ T, AX @ T
            else:
                nx = X.shape[1]
                X, P = (B @ T[:, :nx]), (B @ T[:, nx:])
                AB = torch.cat([AX, AP], 1)
                AX, AP = AB @ T[:, :nx], AB @ T[:, nx:]

    values = theta[:k].to(op.dtype)
    norms = X[:, :k].norm(dim=0)
    vectors = X[:, :k] / norms
    if explicit:  # A X[:, :k] was just computed with explicit products
        AXk = AX[:, :k] / norms
    else:
        AXk = apply_checked(op, vectors)
        n_mv += k
    residuals = (AXk - vectors * values).norm(dim=0)
    # the block's further Ritz pairs give the gaps of the error bounds; without
    # any, nothing is known below the k-th value: a copy of it (radius 0) makes
    # its own bound the residual and leaves the others' gaps as they are
    others = theta[k : X.shape[1]].double()
    rest = X[:, k : others.numel() + k]
    other_res = (
        (AX[:, k : others.numel() + k] - rest * others.to(rest.dtype)).norm(dim=0)
        / rest.norm(dim=0).clamp_min(torch.finfo(rest.dtype).tiny)
    ).double()
    if others.numel() == 0:
        others, other_res = theta[k - 1 : k].double(), theta.new_zeros(1).double()
    result = EigenResult(
        values=values,
        vectors=vectors,
        residuals=residuals,
        error_bounds=gap_bounds(
            values, residuals, others, other_res, 2 * product_eps(op) * scale
        ).to(values.dtype),
        converged=residuals <= tol * max(scale, 1e-300),
        cost=Cost(matvecs=n_mv, seconds=time.perf_counter() - start),
        method="lobpcg",
        which=which,
        tol=float(tol),
        spectral_scale=scale,
        n_restarts=0,
        details={
            "block_size": m,
            "budget": budget,
            "iterations": iterations,
            "residuals": "explicit",
            "other_ritz_values": others.tolist(),
            "other_ritz_residuals": other_res.tolist(),
        },
    )
    if verify:
        result = _verify(op, result, k, which=which, tol=tol, seed=seed, start=start)
        result = dataclasses.replace(result, method="lobpcg")
    if result.values.dtype == dtype:
        return result
    return dataclasses.replace(
        result,
        values=result.values.to(dtype),
        vectors=result.vectors.to(dtype),
        residuals=result.residuals.to(dtype),
        error_bounds=result.error_bounds.to(dtype),
    )
