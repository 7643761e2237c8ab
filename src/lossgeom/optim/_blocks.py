"""The damped Kronecker-factored blocks: eigendecompositions and their powers.

A layer's block ``A (x) G`` (in the column-stacking ``vec`` of ``[W, b]``) is
applied through the eigendecompositions ``A = Q_A L_A Q_A^T`` and
``G = Q_G L_G Q_G^T``: ``(A (x) G) vec(V) = vec(Q_G (D o (Q_G^T V Q_A)) Q_A^T)``
with ``D = L_G L_A^T`` (outer product of the eigenvalues, ``o`` elementwise).
Damping changes ``D`` only, so any power of the damped block costs two pairs of
matrix products: ``D^p`` in place of ``D``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["apply_power", "decompose"]


def decompose(st: dict) -> None:
    """Eigendecompose the layer's running ``A`` and ``G`` (eigenvalues >= 0)."""
    for key in ("A", "G"):
        vals, vecs = _eigh((st[key] + st[key].mT) / 2)
        # contiguous as a checkpoint restores them: a matmul's rounding depends
        # on the layout, and a resumed run must repeat the same bits
        st[f"{key}_eigvals"] = vals.clamp(min=0)
        st[f"{key}_eigvecs"] = vecs.contiguous()


def _eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh``, again in float64 where it fails or returns nan.

    A factor with many zero rows (inputs that are always zero, e.g. the padding
    of a 1x1 feature map) can make float32 LAPACK fail or return nan.
    """
    try:
        vals, vecs = torch.linalg.eigh(m)
        if bool(torch.isfinite(vals).all() and torch.isfinite(vecs).all()):
            return vals, vecs
    except torch.linalg.LinAlgError:
        pass
    if not bool(torch.isfinite(m).all()):
        raise FloatingPointError(
            "K-FAC: a Kronecker factor holds nan or inf; the training has diverged."
        )
    vals, vecs = torch.linalg.eigh(m.double())
    return vals.to(m.dtype), vecs.to(m.dtype)


def apply_power(st: dict, mat: Tensor, power: float, group: dict) -> Tensor:
    """``P^power`` of the layer's damped block on ``[W, b]``-shaped ``mat``.

    With ``A = Q_A L_A Q_A^T`` and ``G = Q_G L_G Q_G^T``, ``(A (x) G)`` acts on
    ``vec(V)`` as ``Q_G (L_G L_A^T o (Q_G^T V Q_A)) Q_A^T``; damping changes the
    eigenvalue products ``D`` and ``P^power`` scales by ``D^power``.
    """
    la, qa = st["A_eigvals"], st["A_eigvecs"]
    lg, qg = st["G_eigvals"], st["G_eigvecs"]
    lam = group["damping"]
    if group["damping_rule"] == "exact":
        denom = lg[:, None] * la[None, :] + lam
    else:
        # pi = sqrt((tr A / dim A) / (tr G / dim G)), as tensors (no device sync)
        ta, tg = la.mean(), lg.mean()
        pi = torch.where((ta > 0) & (tg > 0), (ta / tg).sqrt(), torch.ones_like(ta))
        root = math.sqrt(lam)
        denom = (lg[:, None] + root / pi) * (la[None, :] + root * pi)
    mat = mat.to(qa.dtype)
    return qg @ ((qg.mT @ mat @ qa) * denom.pow(power)) @ qa.mT
