"""Stochastic estimates of the diagonal of a symmetric operator, with per-entry errors.

* Hutchinson (Bekas, Kokiopoulou & Saad 2007): ``diag(A) ~ mean_i z_i * (A z_i)``
  for Rademacher ``z_i``; entry ``j`` has variance ``sum_{k != j} A_jk^2`` per probe.
* XDiag (Epperly, Tropp & Webber 2024): half the budget sketches ``Y = A W``, half
  computes ``A Q``; probe ``w_i`` gets ``diag(Q_i Q_i^T A) + w_i * ((I - Q_i Q_i^T) A
  w_i)``, with ``Q_i`` an orthonormal basis of the other probes' sketch, and the
  estimates are averaged. Much more exact when the spectrum decays.

The per-entry standard error is the sample standard deviation over probes
divided by the square root of their number (for XDiag the estimates share
probes, so it is an approximation; see the tests for its measured coverage).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lossgeom._results import Cost, Result
from lossgeom.linalg._operator import SymmetricOperator, apply_checked, working
from lossgeom.linalg.trace import leave_one_out_bases

__all__ = ["DiagonalResult", "diagonal_estimate"]


@dataclass(frozen=True)
class DiagonalResult(Result):
    """A diagonal estimate with per-entry standard errors.

    Attributes:
        values: the estimated diagonal, shape ``(d,)``.
        stderr: per-entry standard errors, shape ``(d,)``.
        method: ``"hutchinson"`` or ``"xdiag"``.
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`.
    """

    values: Tensor
    stderr: Tensor
    method: str
    definition: str = field(
        default="diag(A) of a symmetric operator from products with random sign "
        "vectors: Hutchinson (Bekas, Kokiopoulou and Saad 2007) or XDiag (Epperly, "
        "Tropp and Webber 2024)",
        kw_only=True,
    )

    def scalars(self) -> dict[str, float]:
        """The sum of the diagonal (``value``) with its standard error."""
        return {
            "value": float(self.values.sum()),
            "stderr": float(self.stderr.double().pow(2).sum().sqrt()),
        }


def diagonal_estimate(
    op: SymmetricOperator,
    max_matvecs: int = 100,
    *,
    method: Literal["hutchinson", "xdiag"] = "hutchinson",
    seed: int = 0,
    round_size: int = 10,
) -> DiagonalResult:
    """Estimate ``diag(A)`` with per-entry standard errors.

    Args:
        op: symmetric operator.
        max_matvecs: budget of products.
        method: ``"hutchinson"`` or ``"xdiag"``.
        seed: seed of the probes.
        round_size: probes per product call (Hutchinson).

    Returns:
        A :class:`DiagonalResult`.

    Example:
        >>> from lossgeom.linalg import DenseOperator
        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> diagonal_estimate(DenseOperator(A), 4).values.tolist()  # exact for a diagonal A
        [1.0, 2.0, 3.0, 4.0, 5.0]
    """
    start = time.perf_counter()
    if method not in ("hutchinson", "xdiag"):
        raise ValueError(f"method must be 'hutchinson' or 'xdiag'; got {method!r}.")
    if not isinstance(max_matvecs, int) or max_matvecs < 2:
        raise ValueError(f"max_matvecs must be an integer >= 2; got {max_matvecs!r}.")
    dtype, op = op.dtype, working(op)  # sketches orthogonalised in float32 at least
    d = op.shape[0]
    gen = torch.Generator(device=op.device).manual_seed(seed)

    def probes(m: int) -> Tensor:
        bits = torch.randint(0, 2, (d, m), generator=gen, device=op.device)
        return (2 * bits - 1).to(op.dtype)

    if method == "hutchinson":
        total = torch.zeros(d, dtype=torch.float64, device=op.device)
        total_sq = torch.zeros_like(total)
        used = 0
        while used < max_matvecs:
            m = min(round_size, max_matvecs - used)
            Z = probes(m)
            S = (Z * apply_checked(op, Z)).double()
            total += S.sum(1)
            total_sq += (S * S).sum(1)
            used += m
        mean = total / used
        var = (total_sq - used * mean * mean).clamp_min(0) / max(used - 1, 1)
        stderr = (var / used).sqrt()
        return DiagonalResult(
            mean.to(dtype),
            stderr.to(dtype),
            "hutchinson",
            details={"n_probes": used},
            cost=Cost(matvecs=used, seconds=time.perf_counter() - start),
        )

    k = max(2, min(max_matvecs // 2, d))
    W = probes(k)
    Y = apply_checked(op, W)
    Q, R = torch.linalg.qr(Y)
    Z = apply_checked(op, Q)
    ests = []
    for i, U in enumerate(leave_one_out_bases(R)):
        Qi = Q @ U
        low_rank = (Qi * (Z @ U)).sum(1)  # diag(Q_i Q_i^T A), A symmetric
        resid = Y[:, i] - Qi @ (Qi.T @ Y[:, i])
        ests.append(low_rank + W[:, i] * resid)
    E = torch.stack(ests, 1).double()
    stderr = E.std(1) / math.sqrt(k)
    return DiagonalResult(
        E.mean(1).to(dtype),
        stderr.to(dtype),
        "xdiag",
        details={"sketch_size": k},
        cost=Cost(matvecs=2 * k, seconds=time.perf_counter() - start),
    )
