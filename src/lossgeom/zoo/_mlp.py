"""A fully connected network with configurable width, depth and activation."""

from __future__ import annotations

from torch import nn

__all__ = ["mlp"]

_ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}


def mlp(
    in_features: int,
    out_features: int,
    *,
    width: int = 32,
    depth: int = 1,
    activation: str = "tanh",
) -> nn.Sequential:
    """An MLP with ``depth`` hidden layers of ``width`` units.

    Args:
        in_features: input size.
        out_features: output size (classes).
        width: hidden units per layer.
        depth: number of hidden layers (0 gives a linear model).
        activation: one of ``tanh``, ``relu``, ``gelu``, ``sigmoid``.

    Returns:
        An ``nn.Sequential`` with PyTorch's default initialisation.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(_ACTIVATIONS)}; got {activation!r}."
        )
    if depth < 0 or width < 1:
        raise ValueError(
            f"need depth >= 0 and width >= 1; got depth={depth}, width={width}."
        )
    layers: list[nn.Module] = []
    size = in_features
    for _ in range(depth):
        layers += [nn.Linear(size, width), _ACTIVATIONS[activation]()]
        size = width
    layers.append(nn.Linear(size, out_features))
    return nn.Sequential(*layers)
