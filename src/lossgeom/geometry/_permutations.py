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
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node, symbolic_trace
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["PermutationGroup", "permutation_groups", "permute_model"]

LossFn = Callable[[Tensor, Tensor], Tensor]
# A member of a permutation group: (tensor name, axis, outer, inner). The axis of
# that parameter or buffer has ``outer * size * inner`` entries laid out as
# ``(outer, size, inner)`` (row-major); the group permutes the middle factor.
Member = tuple[str, int, int, int]

_FIXED = 0  # union-find id of the spaces that are never permuted

# --------------------------------------------------------------------- op tables
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    # softmax along an axis is equivariant to permutations of that axis
    nn.Softmax,
    nn.LogSoftmax,
)
_POOL_MODULES: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
    nn.LPPool1d: 1,
    nn.LPPool2d: 2,
}
_ELEMENTWISE_FUNCTIONS: set[Any] = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.neg,
    torch.maximum,
    torch.minimum,
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    torch.exp,
    torch.abs,
    torch.clamp,
    torch.softmax,
    torch.log_softmax,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.celu,
    F.selu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    F.softplus,
    F.tanh,
    F.sigmoid,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.softmax,
    F.log_softmax,
}
_ELEMENTWISE_METHODS = {
    "add",
    "add_",
    "sub",
    "sub_",
    "mul",
    "mul_",
    "div",
    "div_",
    "neg",
    "relu",
    "relu_",
    "tanh",
    "sigmoid",
    "exp",
    "abs",
    "clamp",
    "clamp_min",
    "clamp_max",
    "pow",
    "contiguous",
    "clone",
    "detach",
    "float",
    "double",
    "half",
    "to",
    "type_as",
    "softmax",
    "log_softmax",
}
_POOL_FUNCTIONS: dict[Any, int] = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    F.avg_pool1d: 1,
    F.avg_pool2d: 2,
    F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}
# Reductions that are invariant to permutations of the reduced axes.
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.logsumexp}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "logsumexp"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {
    "flatten",
    "view",
    "reshape",
    "squeeze",
    "unsqueeze",
    "unflatten",
    "view_as",
    "reshape_as",
}
_SHAPE_METHODS = {"size", "dim"}


# ------------------------------------------------------------------- the groups
@dataclass(frozen=True)
class PermutationGroup:
    """One set of hidden units that must be permuted together.

    Attributes:
        name: the module that first produces the units (in graph order), e.g.
            ``"blocks.0.conv1"``; a group tied by residual additions takes the name
            of its earliest producer (``"stem"``).
        size: number of units (features or channels).
        members: ``(tensor name, axis, outer, inner)`` for every parameter and
            buffer axis the group permutes. The axis holds ``outer * size * inner``
            entries laid out as ``(outer, size, inner)``; ``inner > 1`` after a
            flatten of a channel space with spatial size ``inner``.
    """

    name: str
    size: int
    members: tuple[Member, ...]

    def to_dict(self) -> dict:
        """Plain values for JSON."""
        return {
            "name": self.name,
            "size": self.size,
            "members": [list(m) for m in self.members],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PermutationGroup:
        """Rebuild a group from :meth:`to_dict`."""
        return cls(
            name=str(d["name"]),
            size=int(d["size"]),
            members=tuple(
                (str(m[0]), int(m[1]), int(m[2]), int(m[3])) for m in d["members"]
            ),
        )


@dataclass(frozen=True)
class _Tag:
    """A permuted axis of a traced value: unit space ``var`` as ``(outer, n, inner)``."""

    var: int
    outer: int
    inner: int


Tags = dict[int, _Tag]


class _Spaces:
    """Union-find over unit spaces; id ``_FIXED`` is the never-permuted space."""

    def __init__(self) -> None:
        self.parent = [_FIXED]
        self.size = [0]
        self.creator = ["<fixed>"]

    def new(self, size: int, creator: str) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.creator.append(creator)
        return len(self.parent) - 1

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra == _FIXED or rb == _FIXED:
            self.parent[rb if ra == _FIXED else ra] = _FIXED
            return
        if self.size[ra] != self.size[rb]:  # cannot be one permutation: fix both
            self.parent[ra] = _FIXED
            self.parent[rb] = _FIXED
            return
        lo, hi = min(ra, rb), max(ra, rb)  # the earliest producer names the group
        self.parent[hi] = lo

    def tie(self, tags: list[_Tag]) -> None:
        """One group for all ``tags``; tags of different layouts fix each other."""
        if any((t.outer, t.inner) != (tags[0].outer, tags[0].inner) for t in tags):
            for t in tags:
                self.union(t.var, _FIXED)
            return
        for t in tags[1:]:
            self.union(tags[0].var, t.var)


class _Analysis:
    """Walk a traced graph once, assigning unit spaces to values and tensors."""

    def __init__(self, gm: GraphModule, names: dict[int, str]):
        self.gm = gm
        self.names = names  # id(parameter or buffer) -> canonical name
        self.spaces = _Spaces()
        self.claims: dict[tuple[str, int], list[_Tag]] = {}
        self.values: dict[Node, Tags | None] = {}
        self.counts: dict[str, int] = {}

    # ------------------------------------------------------------------ helpers
    def shape(self, node: Any) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, Node) else None
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None

    def where(self, node: Node) -> str:
        if node.op == "call_module":
            return f"module {node.target!r} ({type(self.gm.get_submodule(node.target)).__name__})"
        stack = node.meta.get("nn_module_stack") or {}
        inside = f" inside module {list(stack)[-1]!r}" if stack else ""
        what = getattr(node.target, "__name__", str(node.target))
        return f"{node.op} {what!r} (graph node {node.name}){inside}"

    def unsupported(self, node: Node, why: str) -> NotImplementedError:
        return NotImplementedError(
            f"permutation alignment cannot handle {self.where(node)}: {why}. "
            "Weight matching supports Linear/Conv layers, elementwise operations "
            "and activations, BatchNorm/LayerNorm, pooling, flatten and residual "
            "additions; a model with other operations on hidden units (attention, "
            "matmul, cat, indexing, grouped convolutions) cannot be aligned here."
        )

    def new_space(self, size: int, creator: str) -> int:
        k = self.counts.get(creator, 0)
        self.counts[creator] = k + 1
        return self.spaces.new(size, creator if k == 0 else f"{creator}#{k + 1}")

    def claim(self, tensor: Tensor | None, axis: int, tag: _Tag | None) -> None:
        """Record that ``tensor``'s ``axis`` follows ``tag`` (``None``: stays fixed)."""
        if tensor is None:
            return
        if tag is None:
            tag = _Tag(_FIXED, 1, 1)
        name = self.names[id(tensor)]
        self.claims.setdefault((name, axis), []).append(tag)

    def inputs(self, node: Node) -> list[tuple[Node, Tags]]:
        out = []
        for n in node.all_input_nodes:
            tags = self.values.get(n)
            if tags:
                out.append((n, tags))
        return out

    # --------------------------------------------------------------------- walk
    def run(self) -> list[PermutationGroup]:
        for node in self.gm.graph.nodes:
            self.values[node] = self.visit(node)
        for (_, _), tags in self.claims.items():
            self.spaces.tie(tags)
        return self.groups()

    def visit(self, node: Node) -> Tags | None:
        if node.op in ("placeholder", "get_attr"):
            return {} if self.shape(node) is not None else None
        if node.op == "output":
            for _, tags in self.inputs(node):
                for tag in tags.values():
                    self.spaces.union(tag.var, _FIXED)
            return None
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            created = self.producer(node, module)
            if created is not None:
                return created
        tagged = self.inputs(node)
        out_shape = self.shape(node)
        if not tagged:  # nothing permuted goes in: nothing permuted comes out
            return {} if out_shape is not None else None
        if out_shape is None:
            if (node.op == "call_method" and node.target in _SHAPE_METHODS) or (
                node.op == "call_function" and node.target is getattr
            ):
                return None
            raise self.unsupported(node, "it does not return a single tensor")
        if node.op == "call_module":
            return self.module(node, module, tagged, out_shape)
        if node.op == "call_function":
            return self.function(node, node.target, tagged, out_shape)
        return self.method(node, str(node.target), tagged, out_shape)

    # ----------------------------------------------------------------- modules
    def producer(self, node: Node, module: nn.Module) -> Tags | None:
        """Linear and ungrouped Conv layers open a new unit space on their output."""
        is_conv = (
            isinstance(module, _ConvNd) and not module.transposed and module.groups == 1
        )
        if not (isinstance(module, nn.Linear) or is_conv):
            return None
        x = node.args[0] if node.args else None
        in_shape = self.shape(x)
        tags = dict(self.values.get(x) or {}) if isinstance(x, Node) else {}
        out_shape = self.shape(node)
        if in_shape is None or out_shape is None:
            raise self.unsupported(node, "its input or output is not a tensor")
        channel = len(in_shape) - 1 if isinstance(module, nn.Linear) else 1
        if is_conv and len(in_shape) != module.weight.ndim:
            raise self.unsupported(node, "an unbatched convolution input")
        in_tag = tags.pop(channel, None)
        if is_conv and tags:
            raise self.unsupported(node, "a permuted spatial or batch axis")
        self.claim(module.weight, 1, in_tag)
        var = self.new_space(int(module.weight.shape[0]), str(node.target))
        out_tag = _Tag(var, 1, 1)
        self.claim(module.weight, 0, out_tag)
        self.claim(module.bias, 0, out_tag)
        tags[len(out_shape) - 1 if isinstance(module, nn.Linear) else 1] = out_tag
        return tags

    def module(
        self, node: Node, module: nn.Module, tagged: list, out_shape: tuple
    ) -> Tags:
        tags = tagged[0][1]
        rank = len(out_shape)
        if isinstance(module, _ELEMENTWISE_MODULES):
            return self.elementwise(node, out_shape)
        if isinstance(module, nn.PReLU):
            self.claim(
                module.weight, 0, tags.get(1) if module.num_parameters > 1 else None
            )
            return dict(tags)
        if isinstance(module, (_BatchNorm, _InstanceNorm)):
            tag = tags.get(1)
            for t in (
                module.weight,
                module.bias,
                module.running_mean,
                module.running_var,
            ):
                self.claim(t, 0, tag)
            return dict(tags)
        if isinstance(module, nn.GroupNorm):
            tag = tags.get(1)
            if tag is not None and module.num_groups not in (1, module.num_channels):
                raise self.unsupported(
                    node, "GroupNorm with 1 < num_groups < num_channels mixes units"
                )
            self.claim(module.weight, 0, tag)
            self.claim(module.bias, 0, tag)
            return dict(tags)
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            k = len(module.normalized_shape)
            for axis, tag in tags.items():
                if axis >= rank - k:
                    self.claim(module.weight, axis - (rank - k), tag)
                    self.claim(getattr(module, "bias", None), axis - (rank - k), tag)
            return dict(tags)
        if type(module) in _POOL_MODULES:
            if getattr(module, "return_indices", False):
                raise self.unsupported(node, "pooling that returns indices")
            return self.pool(node, tags, _POOL_MODULES[type(module)], out_shape)
        if isinstance(module, (nn.Flatten, nn.Unflatten)):
            return self.reshape(node, tagged, out_shape)
        raise self.unsupported(node, "this module type is not known to act per unit")

    # --------------------------------------------------------- functions, methods
    def function(self, node: Node, fn: Any, tagged: list, out_shape: tuple) -> Tags:
        if fn in _ELEMENTWISE_FUNCTIONS:
            return self.elementwise(node, out_shape)
        if fn in _POOL_FUNCTIONS:
            if node.kwargs.get("return_indices"):
                raise self.unsupported(node, "pooling that returns indices")
            return self.pool(node, tagged[0][1], _POOL_FUNCTIONS[fn], out_shape)
        if fn in _REDUCE_FUNCTIONS:
            return self.reduce(node, tagged, out_shape)
        if fn in _RESHAPE_FUNCTIONS:
            return self.reshape(node, tagged, out_shape)
        if fn in (torch.transpose, torch.permute):
            return self.transpose(node, tagged, out_shape)
        raise self.unsupported(node, "this function is not known to act per unit")

    def method(self, node: Node, name: str, tagged: list, out_shape: tuple) -> Tags:
        if name in _ELEMENTWISE_METHODS:
            return self.elementwise(node, out_shape)
        if name in _REDUCE_METHODS:
            return self.reduce(node, tagged, out_shape)
        if name in _RESHAPE_METHODS:
            return self.reshape(node, tagged, out_shape)
        if name in ("transpose", "permute"):
            return self.transpose(node, tagged, out_shape)
        raise self.unsupported(node, "this method is not known to act per unit")

    # ----------------------------------------------------------------- handlers
    def elementwise(self, node: Node, out_shape: tuple) -> Tags:
        """Broadcasting elementwise op: equal-sized axes of all operands are tied."""
        rank = len(out_shape)
        operands = [
            (self.shape(n), self.values.get(n) or {})
            for n in node.all_input_nodes
            if self.shape(n) is not None
        ]
        out: Tags = {}
        for axis in range(rank):
            found: list[_Tag] = []
            fixed = False
            for shape, tags in operands:
                a = axis - (rank - len(shape))
                if a < 0 or (shape[a] == 1 and out_shape[axis] != 1):
                    continue  # broadcast along this axis: no constraint
                if a in tags:
                    found.append(tags[a])
                else:
                    fixed = True
            if not found:
                continue
            self.spaces.tie(found)
            if fixed:
                self.spaces.union(found[0].var, _FIXED)
            out[axis] = found[0]
        return out

    def pool(self, node: Node, tags: Tags, k: int, out_shape: tuple) -> Tags:
        rank = len(out_shape)
        if any(axis >= rank - k for axis in tags):
            raise self.unsupported(node, "pooling over a permuted axis")
        return dict(tags)

    def reduce(self, node: Node, tagged: list, out_shape: tuple) -> Tags:
        """Sum/mean/max over axes: permuted reduced axes drop out (invariance)."""
        x, tags = tagged[0]
        if x is not node.args[0]:
            raise self.unsupported(node, "a permuted argument other than the input")
        rank = len(self.shape(x))
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = node.kwargs.get(
            "keepdim", node.args[2] if len(node.args) > 2 else False
        )
        if dim is None:
            return {}
        dims = {d % rank for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
        out: Tags = {}
        for axis, tag in tags.items():
            if axis in dims:
                continue
            out[axis if keepdim else axis - sum(d < axis for d in dims)] = tag
        if len(out_shape) != (rank if keepdim else rank - len(dims)):
            raise self.unsupported(node, "a reduction whose output shape is unexpected")
        return out

    def transpose(self, node: Node, tagged: list, out_shape: tuple) -> Tags:
        x, tags = tagged[0]
        rank = len(self.shape(x))
        args = [a for a in node.args[1:]]
        if node.target in ("transpose", torch.transpose):
            d0 = node.kwargs.get("dim0", args[0] if args else None)
            d1 = node.kwargs.get("dim1", args[1] if len(args) > 1 else None)
            order = list(range(rank))
            order[d0 % rank], order[d1 % rank] = order[d1 % rank], order[d0 % rank]
        else:
            dims = node.kwargs.get("dims", args[0] if len(args) == 1 else args)
            order = [d % rank for d in dims]
        return {new: tags[old] for new, old in enumerate(order) if old in tags}

    def reshape(self, node: Node, tagged: list, out_shape: tuple) -> Tags:
        """A reshape that merges axes (flatten) turns a unit axis into blocks."""
        x, tags = tagged[0]
        if len(tagged) > 1 or x is not node.args[0]:
            raise self.unsupported(node, "a reshape to the shape of a permuted tensor")
        in_shape = self.shape(x)
        out: Tags = {}
        for ins, outs in _axis_groups(in_shape, out_shape):
            inside = [a for a in ins if a in tags and in_shape[a] > 1]
            if not inside:
                continue
            if len(outs) != 1 or len(inside) > 1:
                raise self.unsupported(
                    node,
                    f"a reshape from {in_shape} to {out_shape} that splits a "
                    "permuted axis or merges two of them",
                )
            a = inside[0]
            tag = tags[a]
            before = math.prod(in_shape[i] for i in ins if i < a)
            after = math.prod(in_shape[i] for i in ins if i > a)
            out[outs[0]] = _Tag(tag.var, tag.outer * before, tag.inner * after)
        return out

    # ------------------------------------------------------------------ result
    def groups(self) -> list[PermutationGroup]:
        find = self.spaces.find
        members: dict[int, dict[tuple[str, int], Member]] = {}
        for (name, axis), tags in self.claims.items():
            root = find(tags[0].var)
            if root == _FIXED:
                continue
            t = tags[0]
            members.setdefault(root, {})[(name, axis)] = (name, axis, t.outer, t.inner)
        return [
            PermutationGroup(
                name=self.spaces.creator[root],
                size=self.spaces.size[root],
                members=tuple(members[root].values()),
            )
            for root in sorted(members)
        ]


def _axis_groups(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input axes with runs of output axes of equal size (row-major)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        ins: list[int] = []
        outs: list[int] = []
        pi = pj = 1
        if i < len(in_shape):
            ins.append(i)
            pi *= in_shape[i]
            i += 1
        if j < len(out_shape):
            outs.append(j)
            pj *= out_shape[j]
            j += 1
        while pi != pj:
            if pi < pj and i < len(in_shape):
                ins.append(i)
                pi *= in_shape[i]
                i += 1
            elif pj < pi and j < len(out_shape):
                outs.append(j)
                pj *= out_shape[j]
                j += 1
            else:
                raise ValueError(f"cannot reshape {in_shape} into {out_shape}")
        groups.append((ins, outs))
    return groups


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
