"""Directions in the flat parameter layout: checks, filter blocks, normalization.

A direction is a flat vector like ``obj.theta``. Filter normalization (Li et al.
2018, "Visualizing the Loss Landscape of Neural Nets") rescales every output
filter / neuron of every weight tensor (the slices along its first dimension) to
the norm of the matching filter of the weights, so that a step ``alpha`` moves
each filter by the same fraction of its size and scale-invariant networks look
the same at every scale. Slices, sharpness and every other user of directions
share these helpers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

from lossgeom.objective._objective import Objective

__all__ = [
    "Normalization",
    "OneDim",
    "check_direction",
    "check_normalization",
    "filter_blocks",
    "filter_view",
    "normalize_direction",
]

Normalization = Literal["filter", "layer", "none"]
OneDim = Literal["zero", "filter", "layer"]
_NORMALIZATIONS = ("filter", "layer", "none")
_ONE_DIM = ("zero", "filter", "layer")


def check_normalization(normalization: str, one_dim: str | None = None) -> None:
    """Refuse an unknown ``normalization`` (or ``one_dim``) rule, naming the choices."""
    if normalization not in _NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {_NORMALIZATIONS}; got {normalization!r}."
        )
    if one_dim is not None and one_dim not in _ONE_DIM:
        raise ValueError(f"one_dim must be one of {_ONE_DIM}; got {one_dim!r}.")


def check_direction(obj: Objective, v: object, name: str) -> Tensor:
    """Validate a flat direction or parameter vector for ``obj``.

    Args:
        obj: the objective whose parameter count, device and dtype apply.
        v: the vector, shape ``(d,)``, floating point and finite.
        name: what ``v`` is, for error messages (``"direction"``, ``"theta"``).

    Returns:
        ``v`` detached, on the objective's device and in its dtype.
    """
    if not isinstance(v, Tensor) or v.ndim != 1 or v.shape[0] != obj.dim:
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(
            f"expected {name} to be a flat vector of shape ({obj.dim},) like "
            f"obj.theta; got {got}. Build directions with lg.random_direction(obj) "
            "and parameter vectors with obj.flatten(...) or lg.Objective(...).theta."
        )
    if not v.is_floating_point():
        raise ValueError(f"{name} must be floating point; got {v.dtype}.")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} contains NaN or inf values.")
    return v.detach().to(device=obj.device, dtype=obj.dtype)


def filter_blocks(
    obj: Objective, v: Tensor, normalization: str, one_dim: str
) -> Iterator[tuple[str, Tensor, str]]:
    """Yield ``(name, view of v, rule)`` for each parameter tensor of ``v``.

    The rule says how the tensor is normalized: per filter (row along its first
    dimension, see :func:`filter_view`) for ``"filter"``, as a whole for
    ``"layer"``, left alone for ``"none"``; 1-D tensors (biases, norm-layer
    scales) follow ``one_dim`` instead (``"zero"``: set to zero). The views
    share memory with ``v``.
    """
    for name, piece in obj.unflatten(v).items():
        yield name, piece, (one_dim if piece.ndim <= 1 else normalization)


def filter_view(t: Tensor) -> Tensor:
    """``t`` as a matrix with one filter (slice along the first dimension) per row."""
    return t.reshape(t.shape[0], -1) if t.ndim >= 1 else t.reshape(1, 1)


def normalize_direction(
    obj: Objective,
    direction: Tensor,
    normalization: Normalization = "filter",
    *,
    one_dim: OneDim = "zero",
    theta: Tensor | None = None,
) -> Tensor:
    """Rescale a direction filter by filter (or layer by layer) to the weights' norms.

    Args:
        obj: the objective whose parameter layout (names and shapes) is used.
        direction: a flat vector ``(d,)``.
        normalization: ``"filter"`` (each output filter / neuron of each weight
            tensor to the norm of the weights' filter; Li et al. 2018),
            ``"layer"`` (each tensor to the weights' tensor norm) or ``"none"``.
        one_dim: what happens to 1-D parameters (biases, BatchNorm/LayerNorm
            scales and shifts): ``"zero"`` (default, as Li et al. do: they stay
            fixed), ``"filter"`` (each entry its own filter: ``|d_i| = |w_i|``)
            or ``"layer"`` (the vector rescaled to the weights' norm). Ignored for
            ``normalization="none"``.
        theta: the weights to take norms from (default ``obj.theta``).

    Returns:
        A new flat vector; ``direction`` is not changed.

    Example:
        >>> import torch, lossgeom as lg
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> obj = lg.Objective(model, torch.nn.CrossEntropyLoss(), (X, y))
        >>> d = normalize_direction(obj, torch.ones(obj.dim, dtype=torch.float64),
        ...                         "layer", one_dim="layer")
        >>> parts = obj.unflatten(d)
        >>> bool(torch.isclose(parts["weight"].norm(), model.weight.norm()))
        True
        >>> bool(torch.isclose(parts["bias"].norm(), model.bias.norm()))
        True
    """
    check_normalization(normalization, one_dim)
    d = check_direction(obj, direction, "direction").clone()
    if normalization == "none":
        return d
    w = obj.theta if theta is None else check_direction(obj, theta, "theta")
    weights = obj.unflatten(w)
    eps = torch.finfo(d.dtype).tiny
    for name, piece, rule in filter_blocks(obj, d, normalization, one_dim):
        ref = weights[name]
        if rule == "zero":
            piece.zero_()
        elif rule == "layer":
            piece.mul_(ref.norm() / piece.norm().clamp_min(eps))
        else:  # filter
            pv, rv = filter_view(piece), filter_view(ref)
            scale = rv.norm(dim=1, keepdim=True) / pv.norm(
                dim=1, keepdim=True
            ).clamp_min(eps)
            pv.mul_(scale)
    return d
