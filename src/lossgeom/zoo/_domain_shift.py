"""Domain-shifted copies of a data set, to compare train and test geometry under shift."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SHIFTS", "shift"]

SHIFTS = ("rotate", "noise", "rebalance")


def _rotate(X: Tensor, degrees: float) -> Tensor:
    if X.ndim != 4:
        raise ValueError(
            f"rotate needs images of shape (n, C, H, W); got {tuple(X.shape)}."
        )
    if degrees == 0:
        return X.clone()
    a = math.radians(degrees)
    theta = X.new_tensor(
        [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]
    )
    grid = torch.nn.functional.affine_grid(
        theta.expand(X.shape[0], 2, 3), list(X.shape), align_corners=False
    )
    return torch.nn.functional.grid_sample(
        X, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )


def _rebalance(y: Tensor, ratio: float, gen: torch.Generator) -> Tensor:
    """Indices of a subsample whose class counts fall geometrically by ``ratio``."""
    if ratio < 1:
        raise ValueError(f"rebalance severity is an imbalance ratio >= 1; got {ratio}.")
    classes = torch.unique(y)
    counts = torch.stack([(y == c).sum() for c in classes])
    k = len(classes)
    keep_frac = torch.tensor(
        [ratio ** (-i / max(k - 1, 1)) for i in range(k)], dtype=torch.float64
    )
    n_head = int(
        counts.min()
    )  # every class can supply the head count times its fraction
    parts = []
    for i, c in enumerate(classes):
        idx = torch.nonzero(y == c).squeeze(1)
        n = max(1, int(round(n_head * float(keep_frac[i]))))
        parts.append(idx[torch.randperm(idx.numel(), generator=gen)[:n]])
    return torch.cat(parts).sort().values


def shift(
    X: Tensor, y: Tensor, kind: str, severity: float, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """A shifted copy of ``(X, y)``.

    Args:
        X: inputs (images ``(n, C, H, W)`` for ``rotate``).
        y: labels.
        kind: ``rotate`` (every image by ``severity`` degrees counter-clockwise,
            bilinear, zero fill), ``noise`` (additive Gaussian noise of standard
            deviation ``severity``), or ``rebalance`` (a class-imbalanced subsample:
            class ``i`` of ``k`` (in label order) keeps ``ratio^(-i/(k-1))`` of the
            smallest class's count, ``ratio = severity >= 1``).
        severity: the amount, in the units above; 0 (1 for ``rebalance``) changes
            nothing but the ``rebalance`` equalisation.
        seed: seed of the noise or the subsample.

    Returns:
        ``(X_shifted, y_shifted)``.

    Example:
        >>> X, y = torch.zeros(4, 1, 3, 3), torch.tensor([0, 0, 1, 1])
        >>> Xs, ys = shift(X, y, "noise", 0.0)
        >>> bool(torch.equal(Xs, X)), ys.tolist()
        (True, [0, 0, 1, 1])
    """
    if kind not in SHIFTS:
        raise ValueError(f"kind must be one of {SHIFTS}; got {kind!r}.")
    if not math.isfinite(severity) or severity < 0:
        raise ValueError(f"severity must be a finite number >= 0; got {severity!r}.")
    gen = torch.Generator().manual_seed(seed)
    if kind == "rotate":
        return _rotate(X, float(severity)), y.clone()
    if kind == "noise":
        noise = torch.randn(X.shape, generator=gen, dtype=X.dtype).to(X.device)
        return X + severity * noise, y.clone()
    idx = _rebalance(y.cpu(), float(severity), gen).to(X.device)
    return X[idx], y[idx]
