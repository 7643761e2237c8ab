"""The weights of a curve's control points: Bernstein polynomials or hat functions.

A curve is ``phi(t) = sum_k w_k(t) c_k``; :func:`curve_weights` gives the ``w_k``
of both kinds that :func:`~lossgeom.geometry.connect` trains.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = ["CURVES", "CurveKind", "_check_int", "_check_kind", "curve_weights"]

CurveKind = Literal["bezier", "polychain"]
CURVES: tuple[str, ...] = ("bezier", "polychain")


def curve_weights(kind: str, t: Tensor, n_ctrl: int) -> Tensor:
    """Weights of the control points at parameters ``t``: ``phi(t) = W @ C``.

    Args:
        kind: ``"bezier"`` (Bernstein polynomials of degree ``n_ctrl - 1``) or
            ``"polychain"`` (hat functions with knots at ``i / (n_ctrl - 1)``).
        t: curve parameters in ``[0, 1]``, shape ``(m,)``.
        n_ctrl: number of control points, the two ends included (``>= 2``).

    Returns:
        ``W`` of shape ``(m, n_ctrl)``; every row sums to one.

    Example:
        >>> t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
        >>> curve_weights("bezier", t, 3).tolist()
        [[1.0, 0.0, 0.0], [0.25, 0.5, 0.25], [0.0, 0.0, 1.0]]
        >>> curve_weights("polychain", t, 3).tolist()
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    _check_kind(kind)
    _check_int("n_ctrl", n_ctrl, 2, "control points, the two ends included")
    n = n_ctrl - 1
    t = t.reshape(-1, 1)
    k = torch.arange(n_ctrl, device=t.device, dtype=t.dtype)
    if kind == "bezier":
        binom = t.new_tensor([math.comb(n, i) for i in range(n_ctrl)])
        return binom * t**k * (1 - t) ** (n - k)
    return (1 - (t * n - k).abs()).clamp_min(0)


def _check_kind(kind: object) -> None:
    if kind not in CURVES:
        raise ValueError(
            f"unknown curve kind {kind!r}; expected one of {CURVES}: 'bezier' "
            "(Bernstein polynomial of degree bends+1) or 'polychain' (polygonal "
            "chain through the bends)."
        )


def _check_int(name: str, value: object, low: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low} ({what}); got {value!r}.")
