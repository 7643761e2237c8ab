"""The permutation groups of a traced module graph: unit spaces and union-find.

One walk over the graph of :func:`torch.fx.symbolic_trace` (with shapes from one
forward pass) gives every value's permuted axes a unit space; parameters and
buffers claim the spaces of their axes, and spaces that must move together are
joined. The rules are those of :mod:`lossgeom.geometry._permutations`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import TensorMetadata
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from lossgeom.geometry._permutation_ops import (
    _ELEMENTWISE_FUNCTIONS,
    _ELEMENTWISE_METHODS,
    _ELEMENTWISE_MODULES,
    _POOL_FUNCTIONS,
    _POOL_MODULES,
    _REDUCE_FUNCTIONS,
    _REDUCE_METHODS,
    _RESHAPE_FUNCTIONS,
    _RESHAPE_METHODS,
    _SHAPE_METHODS,
)

__all__ = ["PermutationGroup"]

# A member of a permutation group: (tensor name, axis, outer, inner). The axis of
# that parameter or buffer has ``outer * size * inner`` entries laid out as
# ``(outer, size, inner)`` (row-major); the group permutes the middle factor.
Member = tuple[str, int, int, int]

_FIXED = 0  # union-find id of the spaces that are never permuted


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
