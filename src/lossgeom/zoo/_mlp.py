"""A fully connected network with configurable width, depth, activation and norm."""

from __future__ import annotations

from torch import nn

from lossgeom.zoo._init import build, check_bool, check_choice, check_int

__all__ = ["mlp"]

_ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}
_NORMS = ("none", "batch", "layer")


def mlp(
    in_features: int = 64,
    out_features: int = 10,
    *,
    width: int = 32,
    depth: int = 1,
    activation: str = "tanh",
    norm: str = "none",
    flatten: bool = False,
    init_scale: float = 1.0,
    seed: int | None = None,
) -> nn.Sequential:
    """An MLP with ``depth`` hidden layers of ``width`` units.

    Each hidden layer is ``Linear -> [norm] -> activation``; the output layer is a
    plain ``Linear``. With ``norm="batch"`` the hidden ``Linear`` layers have no
    bias (BatchNorm's shift makes it redundant, and a redundant bias would add
    exactly flat directions to the loss).

    Args:
        in_features: input size (the product of the input's non-batch dimensions
            when ``flatten=True``).
        out_features: output size (classes); the zoo registry calls it
            ``num_classes``.
        width: hidden units per layer.
        depth: number of hidden layers (0 gives a linear model).
        activation: one of ``tanh``, ``relu``, ``gelu``, ``sigmoid``.
        norm: ``"none"``, ``"batch"`` (``BatchNorm1d``) or ``"layer"``
            (``LayerNorm``) after each hidden ``Linear``.
        flatten: start with ``nn.Flatten()`` so that inputs of any shape
            ``(n, ...)`` are accepted (module indices then start at 1).
        init_scale: factor on PyTorch's default initialisation of every ``Linear``
            weight and bias (see :func:`~lossgeom.zoo._init.scale_init`).
        seed: seed construction locally (``None``: use torch's global RNG).

    Returns:
        An ``nn.Sequential``.
    """
    name = "mlp"
    check_int(name, "in_features", in_features, 1)
    check_int(name, "out_features (num_classes)", out_features, 1)
    check_int(name, "width", width, 1)
    check_int(name, "depth", depth, 0)
    check_choice(name, "activation", activation, tuple(_ACTIVATIONS))
    check_choice(name, "norm", norm, _NORMS)
    check_bool(name, "flatten", flatten)

    def make() -> nn.Sequential:
        layers: list[nn.Module] = [nn.Flatten()] if flatten else []
        size = in_features
        for _ in range(depth):
            layers.append(nn.Linear(size, width, bias=norm != "batch"))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(width))
            elif norm == "layer":
                layers.append(nn.LayerNorm(width))
            layers.append(_ACTIVATIONS[activation]())
            size = width
        layers.append(nn.Linear(size, out_features))
        return nn.Sequential(*layers)

    return build(name, make, init_scale=init_scale, seed=seed)
