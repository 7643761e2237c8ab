"""The permutation symmetry of a network, derived from its module graph.

Hidden units of a network can be reordered without changing its function. This
module finds which parameter and buffer axes must be permuted together, from the
traced module graph (:func:`torch.fx.symbolic_trace` plus one shape-propagating
forward pass), never written per model:

* every ``Linear`` and (ungrouped) ``Conv1d/2d/3d`` opens a new unit space on its
  output features or channels;
* elementwise operations, activations, dropout, softmax, BatchNorm/InstanceNorm
  (per channel), LayerNorm/RMSNorm (per feature), pooling over spatial axes,
  reductions, and reshapes that merge axes (``flatten``: a channel space becomes
  contiguous blocks of features) carry the spaces through;
* an elementwise operation on two spaces (a residual ``add``) ties them into
  one permutation group (union-find);
* the network input and output are never permuted: a space that reaches the
  output, or meets an unpermuted tensor elementwise, stays fixed;
* anything else that sees a permuted space (attention, ``matmul``, ``cat``,
  grouped convolutions, indexing, ...) raises :class:`NotImplementedError` naming
  the module, so a permutation is never silently wrong.

:func:`permute_model` applies permutations; :func:`lossgeom.align` finds them.

The graph analysis lives in :mod:`lossgeom.geometry._permutation_graph` (with the
tables of operations in :mod:`lossgeom.geometry._permutation_ops`); this module
derives the groups of a model and applies permutations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import symbolic_trace
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.conv import _ConvNd

from lossgeom.geometry._permutation_graph import PermutationGroup, _Analysis

__all__ = ["PermutationGroup", "permutation_groups", "permute_model"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def permutation_groups(
    model: nn.Module, example_input: Tensor | None = None
) -> list[PermutationGroup]:
    """Derive the permutation groups of ``model`` from its module graph.

    The model is traced with :func:`torch.fx.symbolic_trace` and run once (a deep
    copy in eval mode, without gradients) on ``example_input`` to learn every
    intermediate shape; the model itself is not changed.

    Args:
        model: a traceable ``nn.Module``.
        example_input: one input batch (a few samples suffice). ``None`` builds a
            random one from the first ``Linear`` (``(2, in_features)``) or
            ``Conv`` layer (``(2, in_channels, 32, ...)``); pass one when that
            guess does not fit the model.

    Returns:
        The groups in graph order of their first producer; groups of size 1 are
        included (their only permutation is the identity).

    Raises:
        NotImplementedError: an operation on permuted units that the analysis
            does not understand (the message names the module).
        ValueError: the model cannot be traced or run on the example input.

    Example:
        >>> from lossgeom.zoo import mlp
        >>> [(g.name, g.size) for g in permutation_groups(mlp(5, 3, width=4, depth=2))]
        [('0', 4), ('2', 4)]
    """
    return _derive(model, example_input)[0]


def permute_model(
    model: nn.Module,
    permutations: Mapping[str, Tensor],
    groups: Iterable[PermutationGroup | Mapping[str, Any]] | None = None,
) -> nn.Module:
    """A deep copy of ``model`` with its hidden units permuted.

    Unit ``i`` of group ``g`` in the copy is unit ``permutations[g][i]`` of
    ``model``. Parameters and buffers (BatchNorm running statistics) are permuted
    alike, so the copy computes the same function. ``model`` is not changed.

    Args:
        model: the network.
        permutations: ``{group name: int64 index tensor}``; groups left out keep
            their order.
        groups: the groups (``PermutationGroup`` or their ``to_dict()``); ``None``
            derives them with :func:`permutation_groups`.

    Returns:
        The permuted copy (same modes, ``requires_grad`` flags, device, dtype).
    """
    if groups is None:
        group_list = permutation_groups(model)
    else:
        group_list = [
            g if isinstance(g, PermutationGroup) else PermutationGroup.from_dict(g)
            for g in groups
        ]
    known = {g.name: g for g in group_list}
    unknown = sorted(set(permutations) - set(known))
    if unknown:
        raise ValueError(
            f"permutations name groups {unknown[:3]} that the model does not have; "
            f"its groups are {sorted(known)[:5]}{' ...' if len(known) > 5 else ''}."
        )
    for name, perm in permutations.items():
        _check_permutation(name, perm, known[name].size)
    out = copy.deepcopy(model)
    plan = _plan(group_list)
    tensors = dict(out.named_parameters())
    tensors.update(out.named_buffers())
    missing = sorted(set(plan) - set(tensors))
    if missing:
        raise ValueError(
            f"the groups refer to tensors {missing[:3]} that the model does not "
            "have; were they derived from a model of another architecture?"
        )
    with torch.no_grad():
        for name, axes in plan.items():
            t = tensors[name]
            perms = {
                axis: permutations[g].to(t.device)
                for axis, (g, _, _) in axes.items()
                if g in permutations
            }
            if perms:
                t.copy_(_permute_tensor(t, axes, perms))
    return out


def _derive(
    model: nn.Module, example_input: Tensor | None
) -> tuple[list[PermutationGroup], Tensor]:
    """Groups of ``model`` and the example input used to trace its shapes."""
    work = copy.deepcopy(model).eval()
    names: dict[int, str] = {}
    for name, t in work.named_parameters():
        names[id(t)] = name
    for name, t in work.named_buffers():
        names[id(t)] = name
    try:
        gm = symbolic_trace(work)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"could not trace {type(model).__name__} with torch.fx.symbolic_trace "
            f"({type(err).__name__}: {err}). Permutation alignment derives the "
            "permutation groups from the module graph, which needs a forward "
            "without data-dependent control flow."
        ) from err
    if example_input is None:
        example_input = _guess_input(work)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"could not run {type(model).__name__} on an example input of shape "
            f"{tuple(example_input.shape)} ({type(err).__name__}: {err}). Pass "
            "example_input= (a batch of a few inputs the model accepts) or data=."
        ) from err
    return _Analysis(gm, names).run(), example_input


def _guess_input(model: nn.Module) -> Tensor:
    dtype, device = _placement(model)
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            shape: tuple[int, ...] = (2, m.in_features)
        elif isinstance(m, _ConvNd):
            shape = (2, m.in_channels) + (32,) * (m.weight.ndim - 2)
        else:
            continue
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
    raise ValueError(
        f"cannot guess an input for {type(model).__name__} (no Linear or Conv "
        "layer); pass example_input=."
    )


def _placement(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is None:
        raise ValueError(f"{type(model).__name__} has no floating-point parameters.")
    return p.dtype, p.device


def _plan(groups: list[PermutationGroup]) -> dict[str, dict[int, tuple[str, int, int]]]:
    """``{tensor: {axis: (group, outer, inner)}}`` from the groups' members."""
    plan: dict[str, dict[int, tuple[str, int, int]]] = {}
    for g in groups:
        for name, axis, outer, inner in g.members:
            plan.setdefault(name, {})[axis] = (g.name, outer, inner)
    return plan


def _permute_axis(t: Tensor, axis: int, outer: int, inner: int, perm: Tensor) -> Tensor:
    shape = t.shape
    blocks = t.reshape(*shape[:axis], outer, perm.numel(), inner, *shape[axis + 1 :])
    return blocks.index_select(axis + 1, perm).reshape(shape)


def _permute_tensor(
    t: Tensor, axes: Mapping[int, tuple[str, int, int]], perms: Mapping[int, Tensor]
) -> Tensor:
    for axis, perm in perms.items():
        _, outer, inner = axes[axis]
        t = _permute_axis(t, axis, outer, inner, perm)
    return t


def _check_permutation(name: str, perm: object, size: int) -> None:
    if (
        not isinstance(perm, Tensor)
        or perm.dtype != torch.int64
        or perm.shape != (size,)
    ):
        raise ValueError(
            f"permutation of group {name!r} must be an int64 tensor of shape "
            f"({size},); got {_describe(perm)}."
        )
    if not torch.equal(perm.sort().values.cpu(), torch.arange(size)):
        raise ValueError(
            f"permutation of group {name!r} is not a permutation of 0..{size - 1} "
            "(repeated or missing indices)."
        )


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
