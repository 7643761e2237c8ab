"""What the sharpness kinds share: the outcome of one kind and the adaptive scale T.

Adaptive sharpness measures in scaled coordinates ``delta = T z``; ``T`` is
elementwise (ASAM) or filter-wise (Li et al. 2018), see
:func:`~lossgeom.measures.sharpness`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lossgeom.objective import Objective, normalize_direction

__all__ = ["_Outcome", "_filter_scale", "_scale"]


@dataclass
class _Outcome:
    """What one kind measured: value, standard error, by-products, perturbation."""

    value: float
    stderr: float | None
    details: dict[str, Any]
    delta: Tensor | None = None


def _filter_scale(obj: Objective, theta: Tensor) -> Tensor:
    """Per-entry filter scale: each filter's root-mean-square, ``|theta_i|`` for 1-D.

    The all-ones direction normalized filter by filter (Li et al. 2018, as
    :func:`lossgeom.normalize_direction` does it, 1-D parameters entry by entry).
    """
    ones = torch.ones_like(theta)
    return normalize_direction(obj, ones, "filter", one_dim="filter", theta=theta)


def _scale(
    obj: Objective, theta: Tensor, normalization: str | None, eta: float
) -> Tensor | None:
    if normalization is None:
        return None
    base = theta.abs() if normalization == "elementwise" else _filter_scale(obj, theta)
    return base + eta
