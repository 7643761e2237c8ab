"""The grid of :func:`~lossgeom.theory.basin_occupancy`: cells, basins, Gibbs mass.

Cells tile a box; each is given to a basin by discrete steepest descent (every
cell points to the neighbour, of its eight, with the most negative slope;
pointers are followed, by pointer jumping, to a cell with none, which goes to
the nearest given minimum) or by a user's partition.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "Grid",
    "basin_labels",
    "check_bounds",
    "check_minima",
    "descent_labels",
    "gibbs_mass",
    "nearest",
]


class Grid:
    """Cells over a box, their losses and basin labels."""

    def __init__(
        self,
        bounds: object,
        grid: object,
        like: Tensor,
    ):
        self.lo, self.hi = check_bounds(bounds, like)
        n = (grid, grid) if isinstance(grid, int) else grid
        if (
            not isinstance(n, Sequence)
            or len(n) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in n)
            or min(n) < 4
        ):
            raise ValueError(
                f"grid must be an integer >= 4 (cells per axis) or two of them; got "
                f"{grid!r}."
            )
        self.n = (int(n[0]), int(n[1]))
        self.h = (self.hi - self.lo) / like.new_tensor(self.n)
        axes = [
            self.lo[j]
            + (torch.arange(self.n[j], dtype=like.dtype, device=like.device) + 0.5)
            * self.h[j]
            for j in range(2)
        ]
        gx, gy = torch.meshgrid(*axes, indexing="ij")
        self.points = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)

    def index(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Flat cell index of each point (clamped) and whether it is inside."""
        rel = (theta - self.lo) / self.h
        inside = ((theta >= self.lo) & (theta <= self.hi)).all(1)
        ij = rel.floor().long()
        i = ij[:, 0].clamp(0, self.n[0] - 1)
        j = ij[:, 1].clamp(0, self.n[1] - 1)
        return i * self.n[1] + j, inside


def check_bounds(bounds: object, like: Tensor) -> tuple[Tensor, Tensor]:
    try:
        b = torch.as_tensor(bounds, dtype=like.dtype).to(like.device)
    except (TypeError, ValueError):
        b = None
    if b is None or b.shape != (2, 2) or not bool(torch.isfinite(b).all()):
        raise ValueError(
            "bounds must be ((low_1, high_1), (low_2, high_2)), finite; got "
            f"{bounds!r}."
        )
    if not bool((b[:, 1] > b[:, 0]).all()):
        raise ValueError(f"bounds must have low < high on both axes; got {bounds!r}.")
    return b[:, 0], b[:, 1]


def descent_labels(values: Tensor, n: tuple[int, int], h: Tensor) -> Tensor:
    """For every cell, the flat index of the cell that steepest descent ends in."""
    V = values.reshape(n)
    big = torch.full((n[0] + 2, n[1] + 2), math.inf, dtype=V.dtype, device=V.device)
    big[1:-1, 1:-1] = V
    offsets = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]
    slopes = [torch.zeros_like(V)]  # staying put: slope 0
    for a, b in offsets:
        dist = math.sqrt((a * float(h[0])) ** 2 + (b * float(h[1])) ** 2)
        shifted = big[1 + a : 1 + a + n[0], 1 + b : 1 + b + n[1]]
        slopes.append((shifted - V) / dist)
    best = torch.stack(slopes).argmin(0)  # ties keep the cell itself (first)
    da = torch.tensor([0] + [a for a, _ in offsets], device=V.device)[best]
    db = torch.tensor([0] + [b for _, b in offsets], device=V.device)[best]
    rows = torch.arange(n[0], device=V.device).unsqueeze(1) + da
    cols = torch.arange(n[1], device=V.device).unsqueeze(0) + db
    pointer = (rows * n[1] + cols).reshape(-1)
    while True:  # pointer jumping: ~log2 of the longest descent path
        nxt = pointer[pointer]
        if torch.equal(nxt, pointer):
            return pointer
        pointer = nxt


def nearest(points: Tensor, minima: Tensor) -> Tensor:
    return torch.cdist(points, minima).argmin(1)


def gibbs_mass(weights: Tensor, labels: Tensor, k: int) -> Tensor:
    mass = torch.zeros(k, dtype=weights.dtype, device=weights.device)
    mass.index_add_(0, labels, weights)
    return mass / mass.sum()


def check_minima(minima: object) -> Tensor:
    if isinstance(minima, Tensor):
        mins = minima.detach()
    else:
        try:
            mins = torch.as_tensor(minima, dtype=torch.float64)
        except (TypeError, ValueError):
            mins = None
    if (
        mins is None
        or not mins.is_floating_point()
        or mins.ndim != 2
        or mins.shape[1] != 2
        or mins.shape[0] < 2
    ):
        got = tuple(mins.shape) if isinstance(mins, Tensor) else minima
        raise ValueError(
            "minima must be a floating tensor of shape (k, 2) with k >= 2 (one "
            f"row per basin of a two-parameter surface); got {got}."
        )
    if not bool(torch.isfinite(mins).all()):
        raise ValueError("minima must be finite.")
    return mins


def basin_labels(
    box: Grid,
    values: Tensor,
    mins: Tensor,
    partition: Callable[[Tensor], Tensor] | None,
    k: int,
) -> Tensor:
    if partition is not None:
        labels = partition(box.points)
        if (
            not isinstance(labels, Tensor)
            or labels.shape != values.shape
            or labels.is_floating_point()
            or int(labels.min()) < 0
            or int(labels.max()) >= k
        ):
            raise ValueError(
                "partition must map points (n, 2) to integer basin indices in "
                f"[0, {k}) of shape (n,)."
            )
        return labels.long()
    ends = descent_labels(values, box.n, box.h)
    return nearest(box.points[ends], mins)
