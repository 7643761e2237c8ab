"""Many points of a plane at once, with the first layer's work done once per batch.

On the points ``theta0 + sum_j c_j d_j`` of a slice, a first layer that is affine
in its parameters (``Linear``, ``Conv1d/2d/3d``: the output is linear in weight
and bias together) maps a data batch ``X`` to ``Z_0 + sum_j c_j Z_j``, where
``Z_0`` is the layer at ``theta0`` and ``Z_j`` the layer with direction ``d_j``'s
weight and bias, on the same ``X``. So ``k + 1`` passes of the first layer per
batch replace one per point, and only the rest of the model (the *tail*) runs
per point. Exact up to float rounding.

Which layer comes first is read from a ``torch.fx`` trace of a private copy of
the model (a model that is itself one such layer needs none). The split applies only when the inputs reach the model through that
one layer and nothing else (shape-only operations such as ``nn.Flatten`` may come
before it); the trace must reproduce the model's output on real data; and there
must be no hooks the split would skip, no weight shared between the first layer
and the tail, and eval mode (train-mode BatchNorm or dropout, and code that
branches on ``self.training``, stay on the plain path). Anything else returns
``None`` with the reason, and the caller evaluates point by point.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call, vmap
from torch.nn.utils import parametrize

from lossgeom.objective import Objective
from lossgeom.objective._fold_norm import FoldOnce, global_hooks, hooked

__all__ = ["SharedFirstLayer", "evaluate_shared", "split_first_layer"]

_FIRST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SHAPE_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)
_SHAPE_METHODS = frozenset({"flatten", "view", "reshape", "contiguous"})
_SHAPE_FUNCTIONS = frozenset({torch.flatten, torch.reshape})
_CLASS_INDEX_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)


@dataclass
class SharedFirstLayer:
    """A model split into shape operations, an affine first layer, and the rest.

    All three run on ``runner``, a private eval-mode copy of the model with the
    objective's buffers, so loading points into the tail never touches the
    user's model.

    Attributes:
        runner: the private copy (keeps the modules of ``head``/``tail`` alive).
        head: the shape operations between the inputs and the first layer, or
            ``None`` when the inputs go straight in.
        first: the first layer (a module of ``runner``).
        first_names: ``(name in first, name in the model)`` of its parameters.
        tail: the first layer's output to the model's output.
        tail_names: trainable parameters the tail uses, in ``theta`` order.
        fan_in: inputs per output element of the first layer (its cost per
            output element, to weigh against ``k + 1`` for the combination).
    """

    runner: nn.Module
    head: fx.GraphModule | None
    first: nn.Module
    first_names: list[tuple[str, str]]
    tail: fx.GraphModule
    tail_names: list[str]
    fan_in: int


def split_first_layer(obj: Objective) -> tuple[SharedFirstLayer | None, str]:
    """Split ``obj``'s model at its first layer, or say why it cannot be.

    Returns:
        ``(split, "")``, or ``(None, reason)``.
    """
    if obj.mode != "eval":
        return None, "train mode: batch statistics and dropout stay per point"
    if global_hooks() or hooked(obj.model):
        return None, "forward hooks on the model or on every module"
    try:
        runner = copy.deepcopy(obj.model)
    except Exception:  # noqa: BLE001 - any failure means: not this path
        return None, "the model cannot be copied"
    _prepare(runner, obj)
    if type(runner) in _FIRST_LAYERS:  # a trace would go inside the layer
        parts, why = _whole_model(runner), ""
    else:
        parts, why = _traced_parts(runner)
    if parts is None:
        return None, why
    head, first, first_names, tail = parts
    split = SharedFirstLayer(
        runner=runner,
        head=head,
        first=first,
        first_names=first_names,
        tail=tail,
        tail_names=[n for n in obj.names if n in dict(tail.named_parameters())],
        fan_in=_fan_in(first),
    )
    if parametrize.is_parametrized(first):
        return None, "the first layer has parametrizations"
    if not _reproduces(split, obj):
        return None, "the trace does not reproduce the model's output"
    return split, ""


_Parts = tuple[fx.GraphModule | None, nn.Module, list[tuple[str, str]], fx.GraphModule]


def _whole_model(layer: nn.Module) -> _Parts:
    """A model that is one affine layer: no head, and a tail that passes through."""
    graph = fx.Graph()
    graph.output(graph.placeholder("first_layer_output"))
    names = [(n, n) for n, _ in layer.named_parameters(recurse=False)]
    return None, layer, names, fx.GraphModule(nn.Module(), graph)


def _traced_parts(runner: nn.Module) -> tuple[_Parts | None, str]:
    """Head, first layer, its parameter names and tail, from a trace of ``runner``."""
    try:
        traced = fx.symbolic_trace(runner)
    except Exception as err:  # noqa: BLE001 - untraceable models go per point
        return None, f"the model cannot be traced ({type(err).__name__})"
    graph = traced.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None, f"the model's forward takes {len(inputs)} arguments, not 1"
    chain, node = [], inputs[0]
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None, "the inputs are used by more than one operation"
        user = users[0]
        if user.op == "call_module" and type(traced.get_submodule(user.target)) in (
            _FIRST_LAYERS
        ):
            break
        if not _is_shape_op(user, node, traced):
            return None, f"the inputs first reach {user.format_node()}"
        chain.append(user)
        node = user
    first_node = user
    first = traced.get_submodule(first_node.target)
    if first_node.args != (node,) or first_node.kwargs:
        return None, "the first layer takes more than the inputs"
    if hooked(first):
        return None, "the first layer has hooks"
    owner = {id(p): n for n, p in runner.named_parameters()}
    first_names = []
    for local, p in first.named_parameters(recurse=False):
        name = f"{first_node.target}.{local}"
        if owner.get(id(p)) != name:
            return None, f"{name} is shared with another module"
        first_names.append((local, name))
    head = _head(traced, inputs[0], chain)
    with graph.inserting_before(inputs[0]):
        out = graph.placeholder("first_layer_output")
    first_node.replace_all_uses_with(out)
    for n in [first_node, *reversed(chain), inputs[0]]:
        graph.erase_node(n)
    tail = fx.GraphModule(traced, graph)
    first_ids = {id(p) for p in first.parameters()}
    for n, p in tail.named_parameters(remove_duplicate=False):
        if id(p) in first_ids or owner.get(id(p)) != n:
            return None, f"{n} is shared with the first layer or another module"
    return (head, first, first_names, tail), ""


def evaluate_shared(
    obj: Objective,
    split: SharedFirstLayer,
    center: Tensor,
    coefs: Tensor,
    dirs: Tensor,
    chunk_size: int | None,
) -> dict[str, Tensor]:
    """Loss (and accuracy) at ``center + coefs @ dirs``, the first layer shared.

    Per data batch: the first layer at the centre and along each direction
    (``k + 1`` passes), then for each chunk of points their combination and the
    tail, with ``vmap`` over the points of a chunk, or with ``chunk_size=1``
    one point after another loaded into the private copy (as
    :meth:`Objective.evaluate` does, for convolutions on the CPU). Counts as
    :meth:`Objective.evaluate_metrics` does: one data pass, ``m`` losses.

    Returns:
        ``{"loss": (m,), "accuracy": (m,)?}`` on the objective's device.
    """
    m = coefs.shape[0]
    accuracy = obj.knows_accuracy
    aug = torch.cat([coefs.new_ones(m, 1), coefs], 1)
    first_sets = _first_layer_parameters(obj, split, center, dirs)
    index = _index(obj, split.tail_names)
    tail = _TailPoints(center[index], dirs[:, index], obj, split.tail_names)
    stats = _batch_stats(obj, accuracy)
    step = m if chunk_size is None else chunk_size
    run = FoldOnce(split.tail)  # folding decided at the first point, kept

    def per_batch(x: Tensor, y: Tensor) -> Tensor:
        inputs = x if split.head is None else split.head(x)
        Z = torch.stack(
            [functional_call(split.first, p, (inputs,)) for p in first_sets]
        )
        if step == 1:
            return _one_by_one(split, Z, aug, tail, y, stats, run)
        rows = []
        for start in range(0, m, step):
            c = aug[start : start + step]
            out = vmap(lambda h, p: functional_call(split.tail, p, (h,)))(
                _combine(c, Z), tail.batched(c[:, 1:])
            )
            rows.append(stats(out, y))
        return torch.cat(rows)

    with torch.no_grad():
        out = _over_batches(obj, per_batch)
    obj.counters.loss += m
    if not accuracy:
        return {"loss": out[:, 0]}
    return {"loss": out[:, 0], "accuracy": out[:, 1] / obj.loss_totals().n_samples}


def _over_batches(obj: Objective, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """The sum of the batch terms ``fn(x, y)`` over batches and ranks.

    :meth:`Objective.accumulate` for terms, without its probe mode: the
    private copy is in eval mode already, and that mode's BatchNorm override
    (an affine map, for cheap derivatives) only costs a forward pass an extra
    pass over memory and a Python call per operation. Counts one data pass;
    a batch whose labels the model cannot take is explained as there.
    """
    obj.loss_totals()
    total: Tensor | None = None
    for index, (x, y) in enumerate(obj.batches()):
        try:
            value = fn(x, y)
        except (IndexError, RuntimeError) as err:
            obj.explain_failed_batch(index, x, y, err)
            raise
        total = value if total is None else total + value
    obj.counters.passes += 1
    if total is None:
        raise ValueError("the data yielded no batches while computing the loss.")
    return obj.all_reduce(total)


# ------------------------------------------------------------------ splitting
def _prepare(runner: nn.Module, obj: Objective) -> None:
    """Eval mode, no gradients, and the buffers ``obj`` evaluates with."""
    runner.eval()
    buffers = obj.probe_buffers()
    with torch.no_grad():
        for p in runner.parameters():
            p.requires_grad_(False)
        for n, b in runner.named_buffers():
            if buffers.get(n) is not None:
                b.copy_(buffers[n])


def _is_shape_op(node: fx.Node, source: fx.Node, root: nn.Module) -> bool:
    """Whether ``node`` only reshapes ``source`` (its other arguments constants)."""
    if not node.args or node.args[0] is not source:
        return False
    found: list[fx.Node] = []
    fx.node.map_arg((node.args[1:], node.kwargs), found.append)
    if found:
        return False
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        return type(module) in _SHAPE_MODULES and not hooked(module)
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return node.op == "call_function" and node.target in _SHAPE_FUNCTIONS


def _head(
    traced: fx.GraphModule, inputs: fx.Node, chain: list[fx.Node]
) -> fx.GraphModule | None:
    """The shape operations from the inputs to the first layer, as a module."""
    if not chain:
        return None
    graph = fx.Graph()
    env = {inputs: graph.placeholder("inputs")}
    for n in chain:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[chain[-1]])
    return fx.GraphModule(traced, graph)


def _fan_in(first: nn.Module) -> int:
    if isinstance(first, nn.Linear):
        return first.in_features
    return first.in_channels // first.groups * math.prod(first.kernel_size)


def _reproduces(split: SharedFirstLayer, obj: Objective) -> bool:
    """Whether head, first layer and tail give the model's output on real data.

    A trace follows one path through Python code: a model that branches on
    ``isinstance(x, Tensor)`` or on a value would be traced along a path it does
    not take. Checked once per evaluation on two samples of the first batch.
    """
    x = next(iter(obj.batches()))[0][:2]
    with torch.no_grad():
        inputs = x if split.head is None else split.head(x)
        mine = split.tail(split.first(inputs))
        theirs = split.runner(x)
    return (
        isinstance(mine, Tensor)
        and isinstance(theirs, Tensor)
        and mine.shape == theirs.shape
        and bool(torch.allclose(mine, theirs, equal_nan=True))
    )


# ----------------------------------------------------------------- evaluating
def _first_layer_parameters(
    obj: Objective, split: SharedFirstLayer, center: Tensor, dirs: Tensor
) -> list[dict[str, Tensor]]:
    """The first layer's parameters at the centre, then along each direction.

    A frozen parameter keeps its value at the centre and is zero along every
    direction (the layer is linear in weight and bias together, so the pieces
    add up to the layer at any point).
    """
    params = dict(split.first.named_parameters(recurse=False))
    trainable = set(obj.names)
    sets = []
    for j, v in enumerate([center, *dirs]):
        pieces = obj.unflatten(v)
        sets.append(
            {
                local: (
                    pieces[name]
                    if name in trainable
                    else params[local]
                    if j == 0
                    else torch.zeros_like(params[local])
                )
                for local, name in split.first_names
            }
        )
    return sets


def _index(obj: Objective, names: list[str]) -> Tensor:
    """Positions in ``theta`` of the parameters ``names``."""
    ranges, pos = {}, 0
    for n, piece in obj.unflatten(obj.theta).items():
        ranges[n] = torch.arange(pos, pos + piece.numel(), device=obj.device)
        pos += piece.numel()
    return torch.cat([ranges[n] for n in names] or [ranges[obj.names[0]][:0]])


class _TailPoints:
    """The tail's trainable parameters at ``center + c @ dirs``, built on demand.

    Only a chunk's worth at a time: ``m`` points of all tail parameters could
    be far more memory than the data pass itself.
    """

    def __init__(self, center: Tensor, dirs: Tensor, obj: Objective, names: list[str]):
        self.center, self.dirs, self.names = center, dirs, names
        pieces = obj.unflatten(obj.theta)
        self.shapes = [pieces[n].shape for n in names]
        self.numels = [pieces[n].numel() for n in names]

    def batched(self, c: Tensor) -> dict[str, Tensor]:
        """``{name: (mc, *shape)}`` at the points of coefficients ``c`` ``(mc, k)``."""
        flat = torch.addmm(self.center.expand(c.shape[0], -1), c, self.dirs)
        return {
            n: t.view(c.shape[0], *s)
            for n, t, s in zip(
                self.names, flat.split(self.numels, 1), self.shapes, strict=True
            )
        }

    def load(self, c: Tensor, targets: list[Tensor]) -> None:
        """Copy the point of coefficients ``c`` ``(k,)`` into ``targets``."""
        flat = torch.addmv(self.center, self.dirs.T, c)
        for t, piece in zip(targets, flat.split(self.numels), strict=True):
            t.copy_(piece.view_as(t))


def _combine(c: Tensor, Z: Tensor) -> Tensor:
    """``Z[0] + sum_j c[:, j] Z[j]`` for each row of ``c`` ``(mc, k + 1)``.

    Elementwise for one or two directions (one pass over memory per direction,
    faster than a matrix product with an inner dimension of 2 or 3), a matrix
    product beyond.
    """
    flat = Z.reshape(Z.shape[0], -1)
    if Z.shape[0] <= 3:
        out = torch.addcmul(flat[0], c[:, 1:2], flat[1])
        for j in range(2, Z.shape[0]):
            out.addcmul_(c[:, j : j + 1], flat[j])
    else:
        out = c @ flat
    return out.view(c.shape[0], *Z.shape[1:])


def _one_by_one(
    split: SharedFirstLayer,
    Z: Tensor,
    aug: Tensor,
    tail: _TailPoints,
    y: Tensor,
    stats: Callable[[Tensor, Tensor], Tensor],
    run: FoldOnce,
) -> Tensor:
    """Each point's tail in turn, its parameters copied into the private copy.

    The combination goes into one reused buffer with scalar coefficients (the
    tail does not keep its input), a plain vectorised loop. ``run`` is the tail
    with its BatchNorms folded into the convolutions before them where it
    allows (:mod:`lossgeom.objective._fold_norm`), decided once across batches.
    """
    targets = [split.tail.get_parameter(n) for n in split.tail_names]
    h = torch.empty_like(Z[0])
    rows = []
    for c, floats in zip(aug, aug.tolist(), strict=True):
        torch.add(Z[0], Z[1], alpha=floats[1], out=h)
        for j in range(2, Z.shape[0]):
            h.add_(Z[j], alpha=floats[j])
        tail.load(c[1:], targets)
        rows.append(stats(run(h)[None], y))
    return torch.cat(rows)


def _batch_stats(obj: Objective, accuracy: bool) -> Callable[[Tensor, Tensor], Tensor]:
    """``stats(outputs, targets)``: a row per point for outputs ``(mc, n, ...)``.

    The row is what :meth:`Objective.evaluate_metrics` sums over batches: the
    objective's term of the batch, and with ``accuracy`` the count of samples
    whose argmax is the target (NaN where the loss is not finite).

    A class-index cross-entropy or NLL loss over ``(n, C)`` outputs is computed
    on the outputs laid out as ``(mc, C, n)``, the K-dimensional form both
    losses accept, with ``reduction="none"`` summed over samples: the same
    per-sample terms as the loss's own ``"sum"``. On the CPU ``log_softmax``
    over a last dimension of a few classes is 3-10x slower than over classes
    with the samples contiguous behind them, and it is most of the cost of a
    small model's loss. Any other loss goes through ``vmap`` over points.
    """
    loss_fn = obj.loss_fn
    each = None
    if obj.loss_reduction.kind == "torch" and type(loss_fn) in _CLASS_INDEX_LOSSES:
        each = copy.copy(loss_fn)
        each.reduction = "none"

    def one(out: Tensor, y: Tensor) -> Tensor:
        loss = obj.loss_term(out, y)
        if not accuracy:
            return loss.reshape(1)
        acc = (out.argmax(-1) == y).to(loss.dtype).sum()
        acc = torch.where(torch.isfinite(loss), acc, torch.full_like(acc, math.nan))
        return torch.stack([loss, acc])

    def stats(out: Tensor, y: Tensor) -> Tensor:
        if each is None or out.ndim != 3 or y.ndim != 1 or y.is_floating_point():
            if out.shape[0] == 1:  # one point at a time: no vmap to pay for
                return one(out[0], y)[None]
            return vmap(one, in_dims=(0, None))(out, y)
        mc, n = out.shape[:2]
        targets = y.expand(mc, n)
        sums = each(out.transpose(1, 2).contiguous(), targets).sum(1)
        loss = sums * (1.0 / obj.loss_totals().normalizer)
        if not accuracy:
            return loss[:, None]
        acc = (out.argmax(-1) == targets).to(loss.dtype).sum(1)
        acc = torch.where(torch.isfinite(loss), acc, torch.full_like(acc, math.nan))
        return torch.stack([loss, acc], 1)

    return stats
