"""Eval-mode BatchNorm folded into the convolution before it, to evaluate many points.

In eval mode ``BatchNorm(conv(x))`` is the convolution ``conv'(x)`` with weights
``W' = W s`` and bias ``b' = (b - mean) s + beta``, ``s = gamma / sqrt(var + eps)``
per output channel: the normalisation's pass over every activation becomes a
few operations on the weights. :meth:`Objective.evaluate` with ``chunk_size=1``
loads point after point into a private copy of the model; there the weights
are folded afresh for each point (a cost of the order of the parameters) and
the normalisation's pass is skipped (6% of a point's cost on the small
BatchNorm CNN of ``benchmarks/slices.py``, on a CPU). It is the
inference fusion of ``torch.fx.experimental.optimization.fuse``, which folds
once and would have to be rebuilt for every point; the numbers are the same up
to float rounding.

Which convolution feeds which BatchNorm is read from a ``torch.fx`` trace of the
private copy. A pair is folded only when the convolution's output goes nowhere
else, the BatchNorm normalises with running statistics, its features are the
convolution's channels, and neither module has hooks or parametrizations. A model that cannot be
traced, has no such pair, or whose folded trace does not reproduce its outputs
on real data is evaluated unfolded.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import Tensor, fx, nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize

__all__ = ["FOLDED", "FoldOnce", "FoldedNorms", "fold_norms", "global_hooks", "hooked"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks")

# How many evaluations ran folded and unfolded (models with BatchNorm only), for
# tests and benchmarks that must know which path ran.
FOLDED: Counter[str] = Counter()


class FoldedNorms:
    """A traced copy of a model whose BatchNorms are folded into convolutions.

    The traced module shares every module but the folded convolutions with the
    model it was traced from, so a point loaded into that model's parameters
    reaches it; :meth:`refresh` then folds the point's weights.
    """

    def __init__(self, module: fx.GraphModule, pairs: list[tuple[nn.Module, ...]]):
        self.module, self.pairs = module, pairs

    def refresh(self) -> None:
        """Fold the current weights and statistics into the folded convolutions."""
        with torch.no_grad():
            for conv, norm, folded in self.pairs:
                scale = torch.rsqrt(norm.running_var + norm.eps)
                if norm.weight is not None:
                    scale = scale * norm.weight
                shape = (-1,) + (1,) * (conv.weight.ndim - 1)
                torch.mul(conv.weight, scale.reshape(shape), out=folded.weight)
                shift = -norm.running_mean * scale
                if conv.bias is not None:
                    shift = torch.addcmul(shift, conv.bias, scale)
                if norm.bias is not None:
                    shift = shift + norm.bias
                folded.bias.copy_(shift)

    def __call__(self, x: Tensor) -> Tensor:
        return self.module(x)


def fold_norms(runner: nn.Module, x: Tensor) -> FoldedNorms | None:
    """``runner`` (eval mode, its current point loaded) folded, or ``None``.

    ``x``: a few samples of real inputs, on which the folded copy must give
    ``runner``'s outputs (to float rounding) or is not used.
    """
    if runner.training or not any(isinstance(m, _NORMS) for m in runner.modules()):
        return None
    if global_hooks():
        FOLDED["unfolded"] += 1
        return None
    try:
        traced = fx.symbolic_trace(runner)
    except Exception:  # noqa: BLE001 - untraceable models run unfolded
        FOLDED["unfolded"] += 1
        return None
    pairs = _fold_pairs(traced)
    folded = FoldedNorms(traced, pairs) if pairs else None
    if folded is not None and not _reproduces(folded, runner, x):
        folded = None
    FOLDED["folded" if folded is not None else "unfolded"] += 1
    return folded


class FoldOnce:
    """``module(x)``, folded where it can be: decided at the first call.

    Call it after each point is loaded into ``module``'s parameters: the first
    call decides with :func:`fold_norms` (on a few samples of ``x``), and every
    call refolds the point's weights before running the folded copy.
    """

    def __init__(self, module: nn.Module):
        self.module, self.folded, self.decided = module, None, False

    def __call__(self, x: Tensor) -> Tensor:
        if not self.decided:
            self.folded, self.decided = fold_norms(self.module, x[:4]), True
        if self.folded is None:
            return self.module(x)
        self.folded.refresh()
        return self.folded(x)


def global_hooks() -> bool:
    """Whether forward hooks are registered for every module."""
    return any(getattr(_module, n, None) for n in _GLOBAL_HOOKS)


def hooked(module: nn.Module) -> bool:
    """Whether ``module`` itself has forward (pre-)hooks."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _fold_pairs(traced: fx.GraphModule) -> list[tuple[nn.Module, ...]]:
    """Rewrite ``traced``: each convolution -> BatchNorm pair becomes one module."""
    graph, pairs = traced.graph, []
    for node in list(graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        norm, prev = traced.get_submodule(node.target), node.args[0]
        if (
            type(norm) not in _NORMS
            or not isinstance(prev, fx.Node)
            or prev.op != "call_module"
            or len(prev.users) != 1
        ):
            continue
        conv = traced.get_submodule(prev.target)
        if (
            type(conv) not in _CONVS
            or hooked(conv)
            or hooked(norm)
            or parametrize.is_parametrized(conv)
            or parametrize.is_parametrized(norm)
            or norm.running_mean is None
            or norm.running_var is None
            or norm.num_features != conv.out_channels
        ):
            continue
        folded = copy.deepcopy(conv)
        folded.bias = nn.Parameter(
            conv.weight.new_empty(conv.out_channels), requires_grad=False
        )
        name = f"_folded_norm_{len(pairs)}"
        traced.add_submodule(name, folded)
        with graph.inserting_after(node):
            new = graph.call_module(name, prev.args, prev.kwargs)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(prev)
        pairs.append((conv, norm, folded))
    if pairs:
        graph.lint()
        traced.recompile()
    return pairs


def _reproduces(folded: FoldedNorms, runner: nn.Module, x: Tensor) -> bool:
    """Whether the folded copy gives ``runner``'s outputs on ``x``.

    A trace follows one path through Python code, so a model that branches on
    its inputs could be traced along a path it does not take; folding changes
    the outputs only by rounding, far below the tolerance here.
    """
    folded.refresh()
    with torch.no_grad():
        mine, theirs = folded(x), runner(x)
    if not (
        isinstance(mine, Tensor)
        and isinstance(theirs, Tensor)
        and mine.shape == theirs.shape
        and bool(torch.isfinite(theirs).all())
    ):
        return False
    size = float(theirs.abs().max())
    return float((mine - theirs).abs().max()) <= 1e-3 * size + 1e-30
