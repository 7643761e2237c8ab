"""Construction helpers shared by the zoo's model factories.

Seeded construction, the ``init_scale`` knob, and the checks of option values
that every factory runs before it builds anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = [
    "build",
    "check_bool",
    "check_choice",
    "check_int",
    "check_scale",
    "check_seed",
    "scale_init",
    "seeded",
]

M = TypeVar("M", bound=nn.Module)

# Normalisation layers keep their default affine parameters (weight 1, bias 0).
# _NormBase covers BatchNorm{1,2,3}d, SyncBatchNorm and InstanceNorm{1,2,3}d.
_NORMS: tuple[type[nn.Module], ...] = (
    _NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Draw from torch's RNG seeded with ``seed``, restoring its state after.

    With ``seed=None`` nothing is forked: construction consumes the global RNG as
    plain PyTorch code would, so ``torch.manual_seed`` before the call fixes the
    result. With an integer the generator that construction draws from is forked
    and seeded, and restored on exit, so the caller's random stream is left
    untouched: the CPU generator, and also the current device's generator when the
    default device (``torch.set_default_device``) is an accelerator. Construction
    then draws what it would after ``torch.manual_seed(seed)``.
    """
    if seed is None:
        yield
        return
    device = torch.get_default_device()
    if device.type in ("cpu", "meta"):
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    module = torch.get_device_module(device.type)
    index = module.current_device() if device.index is None else device.index
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.random.default_generator.manual_seed(seed)
        generators = getattr(module, "default_generators", None)
        if generators is not None:
            generators[index].manual_seed(seed)
        else:  # pragma: no cover - accelerators without per-device generators
            module.manual_seed(seed)
        yield


def scale_init(module: M, scale: float) -> M:
    """Multiply every parameter outside normalisation layers by ``scale``, in place.

    Scaled: weights and biases of ``Linear`` and ``Conv`` layers (attention q/k/v
    and output projections are ``Linear`` layers), and embeddings that are plain
    parameters (class tokens, positional embeddings). Not scaled: the affine
    parameters of BatchNorm, InstanceNorm, LayerNorm, GroupNorm and RMSNorm, which
    keep their defaults (weight 1, bias 0). Buffers (running statistics) are not
    parameters and are not touched.

    Args:
        module: a freshly initialised module.
        scale: the factor; ``1`` leaves the module bit-identical.

    Returns:
        ``module`` itself.
    """
    if scale == 1:
        return module
    keep = {
        id(p)
        for m in module.modules()
        if isinstance(m, _NORMS)
        for p in m.parameters(recurse=False)
    }
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in keep:
                p.mul_(scale)
    return module


def build(
    name: str,
    factory: Callable[[], M],
    *,
    init_scale: float = 1.0,
    seed: int | None = None,
) -> M:
    """Check ``init_scale`` and ``seed``, build ``factory()`` under :func:`seeded`, scale.

    Args:
        name: the model's name, for error messages.
        factory: builds the module with PyTorch's default initialisation.
        init_scale: passed to :func:`scale_init`.
        seed: passed to :func:`seeded`.

    Returns:
        The module.
    """
    init_scale = check_scale(name, init_scale)
    seed = check_seed(name, seed)
    with seeded(seed):
        module = factory()
    return scale_init(module, init_scale)


def _where(model: str) -> str:
    return f"{model}: " if model else ""


def check_int(model: str, name: str, value: object, minimum: int) -> int:
    """``value`` as an int ``>= minimum``, or a ``ValueError`` saying so."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"{_where(model)}{name} must be an integer >= {minimum}; got {value!r} "
            f"({type(value).__name__}). Pass a whole number such as {name}={max(minimum, 1)}."
        )
    if value < minimum:
        raise ValueError(
            f"{_where(model)}{name} must be an integer >= {minimum}; got {value}. "
            f"Pass {name} >= {minimum}."
        )
    return value


def check_bool(model: str, name: str, value: object) -> bool:
    """``value`` as a bool, or a ``ValueError`` saying so."""
    if not isinstance(value, bool):
        raise ValueError(
            f"{_where(model)}{name} must be True or False; got {value!r} "
            f"({type(value).__name__})."
        )
    return value


def check_choice(model: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, or a ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{_where(model)}{name} must be one of {', '.join(map(repr, choices))}; "
            f"got {value!r}."
        )
    return value


def check_scale(model: str, value: object) -> float:
    """``init_scale`` as a finite float ``> 0``, or a ``ValueError`` saying so."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"{_where(model)}init_scale must be a finite number > 0 (the factor on "
            f"PyTorch's default initialisation; 1 keeps it); got {value!r}."
        )
    return float(value)


def check_seed(model: str, value: object) -> int | None:
    """``seed`` as ``None`` or a non-negative int, or a ``ValueError`` saying so."""
    if value is None:
        return None
    return check_int(model, "seed", value, 0)


def keyword_options(fn: Callable) -> dict[str, object]:
    """A factory's public keyword-only options with their defaults."""
    import inspect

    return {
        k: p.default
        for k, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not k.startswith("_")
    }
