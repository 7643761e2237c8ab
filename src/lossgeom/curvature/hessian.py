"""The Hessian of the loss over the data set as a matrix-free operator."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks

from lossgeom.curvature._base import ObjectiveOperator
from lossgeom.objective import Objective, hvp_from_graph

__all__ = ["HessianOperator", "hessian"]

# Default memory budget for keeping the gradient's graph between products.
_DEFAULT_CACHE_BYTES = 1 << 30


class _Box:
    """A tensor saved by a kept graph, held where the operator can let go of it.

    A tensor that the graph saves for backward is often an output of the very node
    that saves it; held directly by a saved-tensor hook it would hold its own
    ``grad_fn``, a reference cycle through C++ that Python's garbage collector
    cannot see. Saved in a box, the cycle is broken by emptying the box.
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor):
        self.tensor: Tensor | None = tensor

    def unpack(self) -> Tensor:
        if self.tensor is None:
            raise RuntimeError(
                "the Hessian operator's kept graph was released; build a new "
                "operator with lg.hessian(obj)."
            )
        return self.tensor


def _empty(boxes: list[_Box]) -> None:
    """Let go of every saved tensor (frees the kept graphs)."""
    for box in boxes:
        box.tensor = None
    boxes.clear()


class HessianOperator(ObjectiveOperator):
    r"""The Hessian :math:`\nabla^2 L(\theta)` of an objective at fixed parameters.

    Products go through :meth:`Objective.hvp`, which redoes the forward and
    backward pass every time. Because the operator's parameters are fixed, it can
    instead keep the graph of the gradient :math:`g(\theta)` of every batch
    (built once, with ``create_graph=True``) and answer each product with a
    single backward pass through it: in ``benchmarks/hvp.py`` on CPU this makes a
    product cost about 2x a gradient instead of about 3.5x. The graphs are kept
    when the data is held in memory (tensors or a Dataset, so batches come in a
    fixed order), the objective's backend is not ``"forward-over-reverse"``, and
    the tensors the graphs save, counted while building them, fit in
    ``cache_bytes``; otherwise every product recomputes.

    Attributes:
        cached: whether products use kept graphs (``None`` until the first product).
    """

    def __init__(
        self,
        objective: Objective,
        theta: Tensor | None = None,
        *,
        cache_bytes: int | None = _DEFAULT_CACHE_BYTES,
    ):
        super().__init__(objective, theta)
        self.cache_bytes = cache_bytes
        self.cached: bool | None = None
        self.cache_nbytes = 0
        self._graphs: list[tuple[Tensor, Tensor]] | None = None
        self._boxes: list[_Box] = []
        # the kept graphs are freed when the operator is released or collected
        self._finalizer = weakref.finalize(self, _empty, self._boxes)
        if (
            cache_bytes is None
            or objective.data_kind == "iterable"
            or objective.hvp_backend == "forward-over-reverse"
        ):
            self.cached = False

    def _build_cache(self) -> None:
        obj = self.objective
        obj.loss_totals()  # the terms' normalizer, before the graphs are built
        graphs: list[tuple[Tensor, Tensor]] = []
        nbytes = 0

        boxes = self._boxes

        def pack(t: Tensor) -> _Box:
            nonlocal nbytes
            nbytes += t.numel() * t.element_size()
            box = _Box(t)
            boxes.append(box)
            return box

        try:
            with (
                obj.probe_mode(),
                torch.enable_grad(),
                saved_tensors_hooks(pack, _Box.unpack),
            ):
                for x, y in obj.batches():
                    t = self.theta.clone().requires_grad_(True)
                    (g,) = torch.autograd.grad(
                        obj.batch_term(t, x, y), t, create_graph=True
                    )
                    graphs.append((t, g))
                    if nbytes > self.cache_bytes:
                        break
            obj.counters.passes += 1
        except (RuntimeError, NotImplementedError):
            graphs, nbytes = [], self.cache_bytes + 1  # no double backward: recompute
        if nbytes > self.cache_bytes:
            _empty(boxes)
            self.cached = False
            return
        self._graphs, self.cache_nbytes, self.cached = graphs, nbytes, True

    @property
    def backend_used(self) -> str | None:
        """How products are computed: kept graphs, or the objective's HVP backend."""
        if self.cached:
            return "double-backward (kept graph)"
        return self.objective.hvp_backend_used

    def _matmat(self, V: Tensor) -> Tensor:
        obj = self.objective
        if self.cached is None:
            if obj.hvp_backend_used == "forward-over-reverse":  # double backward failed
                self.cached = False
            else:
                self._build_cache()
        if not self.cached:
            return obj.hvp(V, self.theta)
        graphs = iter(self._graphs)

        def from_graph(x: Tensor, y: Tensor) -> Tensor:
            t, g = next(graphs)
            return hvp_from_graph(g, t, V)

        try:
            out = obj.accumulate(
                from_graph, what="Hessian-vector product", count_pass=False
            )
        except (RuntimeError, NotImplementedError):
            # an operation without a double backward: recompute, with the
            # objective's own fallback
            self.release()
            return obj.hvp(V, self.theta)
        obj.counters.hvp += V.shape[1]
        return out

    def gradient(self) -> Tensor:
        """The gradient at the operator's parameters.

        Read from the kept graphs when products use them (no extra data pass: the
        graphs hold each batch's gradient), otherwise computed by the objective.
        """
        if self.cached is None and self.objective.hvp_backend_used != (
            "forward-over-reverse"
        ):
            self._build_cache()
        if not self.cached:
            return self.objective.grad(self.theta)
        graphs = iter(self._graphs)
        return self.objective.accumulate(
            lambda x, y: next(graphs)[1].detach(), what="gradient", count_pass=False
        )

    def release(self) -> None:
        """Drop the kept graphs (products then recompute)."""
        _empty(self._boxes)
        self._graphs = None
        self.cached = False
        self.cache_nbytes = 0


def hessian(
    obj: Objective,
    theta: Tensor | None = None,
    *,
    cache_bytes: int | None = _DEFAULT_CACHE_BYTES,
) -> HessianOperator:
    """The Hessian of ``obj`` at ``theta`` (default: the model's parameters).

    Args:
        obj: the objective.
        theta: parameters; copied, so later training does not change the operator.
        cache_bytes: memory budget for keeping the gradient's graph between
            products (``None``: never keep it; every product recomputes).

    Returns:
        A symmetric operator: ``H @ v`` for ``(d,)`` or ``(d, m)``, ``to_dense()``.

    Example:
        >>> import torch
        >>> from lossgeom import Objective
        >>> X = torch.randn(30, 2, dtype=torch.float64); y = X.sum(1, keepdim=True)
        >>> obj = Objective(torch.nn.Linear(2, 1, bias=False).double(), torch.nn.MSELoss(), (X, y))
        >>> torch.allclose(hessian(obj).to_dense(), 2 * X.T @ X / 30)
        True
    """
    return HessianOperator(obj, theta, cache_bytes=cache_bytes)
