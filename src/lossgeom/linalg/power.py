"""Deflated power iteration: the top eigenvalues by magnitude, one at a time.

Kept to compare with the literature (PyHessian's method); restarted block Lanczos
(:func:`~lossgeom.linalg.lanczos`) is the method to use.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from lossgeom._results import Cost
from lossgeom.linalg._eigen import EigenResult, _check_args
from lossgeom.linalg._operator import SymmetricOperator, working

__all__ = ["power_iteration"]


def power_iteration(
    op: SymmetricOperator,
    k: int = 5,
    *,
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    seed: int = 0,
    max_iter: int = 100,
) -> EigenResult:
    """Top-``k`` eigenvalues by magnitude with deflated power iteration.

    Kept to compare with the literature (PyHessian's method): each eigenvector is
    iterated against the previous ones (Gram-Schmidt deflation) until the Rayleigh
    quotient changes by less than ``tol`` relatively, or ``max_iter`` products.
    It converges slowly when eigenvalues are close and finds eigenvalues of
    largest magnitude, not largest value. The returned residuals are explicit.

    Args:
        op: symmetric operator.
        k: eigenpairs.
        tol: relative change of the Rayleigh quotient that stops an eigenvector.
        max_matvecs: overall budget (default ``k * max_iter``).
        seed: seed of the start vectors.
        max_iter: products per eigenvector at most.

    Returns:
        An :class:`EigenResult` with values sorted by magnitude (descending).
    """
    start = time.perf_counter()
    _check_args(op, k, "magnitude", tol)
    dtype, op = op.dtype, working(op)  # accumulate in float32 at least
    d = op.shape[0]
    gen = torch.Generator(device=op.device).manual_seed(seed)
    budget = max_matvecs if max_matvecs is not None else k * max_iter
    vecs: list[Tensor] = []
    vals: list[float] = []
    n_mv = 0
    for _ in range(k):
        v = torch.randn(d, generator=gen, dtype=op.dtype, device=op.device)
        lam = None
        for _ in range(max_iter):
            for u in vecs:
                v = v - torch.dot(u, v) * u
            v = v / v.norm()
            if n_mv >= budget:
                break
            w = op @ v
            n_mv += 1
            new = float(torch.dot(v, w))
            v = w
            if lam is not None and abs(new - lam) <= tol * (abs(lam) + 1e-300):
                lam = new
                break
            lam = new
        for u in vecs:
            v = v - torch.dot(u, v) * u
        v = v / v.norm()
        vecs.append(v)
        vals.append(lam if lam is not None else float("nan"))
    V = torch.stack(vecs, 1)
    values = torch.tensor(vals, dtype=op.dtype, device=op.device)
    AV = op @ V
    n_mv += k
    residuals = (AV - V * values).norm(dim=0)
    scale = float(values.abs().max())
    order = torch.argsort(values.abs(), descending=True)
    return EigenResult(
        values=values[order].to(dtype),
        vectors=V[:, order].to(dtype),
        residuals=residuals[order].to(dtype),
        converged=residuals[order] <= tol * scale,
        cost=Cost(matvecs=n_mv, seconds=time.perf_counter() - start),
        method="power",
        which="magnitude",
        tol=float(tol),
        spectral_scale=scale,
        n_restarts=0,
    )
