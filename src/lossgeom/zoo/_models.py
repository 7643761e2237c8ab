"""The model registry: build a zoo network by name, list names and options.

Options are read with :func:`inspect.signature` from the factory functions, so
``models()`` always agrees with what :func:`model` accepts.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn

from lossgeom.zoo._cnn import cnn
from lossgeom.zoo._mlp import mlp
from lossgeom.zoo._resnet import cifar_resnet, resnet
from lossgeom.zoo._transformer import transformer
from lossgeom.zoo._vit import vit

__all__ = ["model", "models"]


@dataclass(frozen=True)
class _Entry:
    """A registered name: its factory, the arguments the name fixes, renames.

    Attributes:
        factory: builds the network from keyword arguments.
        fixed: factory arguments the name fixes (``depth=20`` for ``resnet20``);
            they are not options.
        rename: registry option name -> factory argument name, where they differ.
    """

    factory: Callable[..., nn.Module]
    fixed: Mapping[str, object] = field(default_factory=dict)
    rename: Mapping[str, str] = field(default_factory=dict)

    def options(self) -> dict[str, object]:
        """The options of this name with their defaults, in the factory's order."""
        option_of = {arg: opt for opt, arg in self.rename.items()}
        return {
            option_of.get(p.name, p.name): p.default
            for p in inspect.signature(self.factory).parameters.values()
            if p.name not in self.fixed
        }


_REGISTRY: dict[str, _Entry] = {
    "mlp": _Entry(mlp, fixed={"flatten": True}, rename={"num_classes": "out_features"}),
    "cnn": _Entry(cnn),
    **{
        f"resnet{depth}": _Entry(cifar_resnet, fixed={"depth": depth})
        for depth in (20, 32, 44, 56, 110)
    },
    "resnet18": _Entry(resnet, fixed={"depth": 18}),
    "resnet34": _Entry(resnet, fixed={"depth": 34}),
    "vit": _Entry(vit),
    "transformer": _Entry(transformer),
}


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _format_options(options: Mapping[str, object]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def models() -> dict[str, dict[str, object]]:
    """Every registered model name with its options and their defaults.

    Returns:
        ``{name: {option: default}}``, names sorted; a fresh copy on every call.

    Example:
        >>> sorted(models())[:4]
        ['cnn', 'mlp', 'resnet110', 'resnet18']
        >>> models()["resnet20"]["width"]
        16
    """
    return {name: _REGISTRY[name].options() for name in sorted(_REGISTRY)}


def model(name: str, /, **options: object) -> nn.Module:
    """Build the zoo network ``name`` with keyword ``options``.

    Names and options (defaults in ``models()``):

    - ``mlp``: in_features, num_classes, width, depth, activation
      (tanh/relu/gelu/sigmoid), norm (none/batch/layer). Inputs of any shape are
      flattened.
    - ``cnn``: VGG-like, in_channels, num_classes, width, depth (conv layers), norm
      (BatchNorm); global average pooling, so any image size works.
    - ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``, ``resnet110``: the
      CIFAR ResNets of He et al. (2016); width, num_classes, in_channels, skip
      (``False``: the "noshort" plain net), norm.
    - ``resnet18``, ``resnet34``: BasicBlock ResNets with a 3x3 stride-1 stem and no
      max-pool (the usual CIFAR adaptation); same options.
    - ``vit``: image_size, patch_size, in_channels, num_classes, dim, depth, heads,
      mlp_dim, layer_norm, skip, pool (``"cls"`` token or ``"mean"``).
    - ``transformer``: for sequences ``(n, L)`` or ``(n, C, L)`` such as MNIST-1D;
      seq_len, in_channels, patch_size and the options of ``vit``.

    Every name also takes ``init_scale`` (a factor on the default initialisation of
    every parameter outside normalisation layers) and ``seed`` (construct under
    ``torch.manual_seed(seed)`` without touching the global RNG; ``None`` draws
    from the global RNG, so ``torch.manual_seed`` before the call fixes the model).

    Args:
        name: a key of :func:`models`.
        **options: options of that model; missing ones take their defaults.

    Returns:
        The network, in training mode, with float32 parameters on the CPU.

    Raises:
        ValueError: for an unknown name or option, or an invalid option value.

    Example:
        >>> import torch
        >>> net = model("resnet20", width=4, seed=0)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> sum(p.numel() for p in model("resnet20").parameters())
        272474
        >>> model("vit", image_size=8, patch_size=4, in_channels=1, dim=8, heads=2)(
        ...     torch.randn(5, 1, 8, 8)
        ... ).shape
        torch.Size([5, 10])
    """
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        names = sorted(_REGISTRY)
        raise ValueError(
            f"unknown model {name!r}"
            + (_suggest(name, names) if isinstance(name, str) else "")
            + f"; valid names: {', '.join(names)}."
        )
    valid = entry.options()
    for option in options:
        if option in valid:
            continue
        if option in entry.fixed:
            raise ValueError(
                f"model {name!r} has {option}={entry.fixed[option]!r} fixed by its "
                f"name; it is not an option. Valid options (with defaults): "
                f"{_format_options(valid)}."
            )
        raise ValueError(
            f"model {name!r} has no option {option!r}"
            + _suggest(option, list(valid))
            + f"; valid options (with defaults): {_format_options(valid)}."
        )
    kwargs = dict(entry.fixed)
    kwargs.update((entry.rename.get(k, k), v) for k, v in options.items())
    return entry.factory(**kwargs)
