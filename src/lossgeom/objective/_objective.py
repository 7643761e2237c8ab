"""The Objective: model + loss + data as a function of one flat parameter vector.

The class is assembled from one part per concern: the functional core every
quantity is built on (``_core``: layout, one batch, the average over data),
curvature products (``_products``), evaluation at many points (``_evaluate``),
BatchNorm statistics (``_norm``) and the sum over ranks (``_distributed``);
construction checks live in ``_validation``. This module holds construction,
loss and gradient.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from lossgeom.linalg._operator import NonFiniteError
from lossgeom.objective._core import Counters, HvpBackend, LossFn, Mode
from lossgeom.objective._data import DataSource, make_source
from lossgeom.objective._evaluate import EvaluationMixin
from lossgeom.objective._norm import NormStatisticsMixin
from lossgeom.objective._products import ProductsMixin
from lossgeom.objective._reduction import resolve_reduction
from lossgeom.objective._validation import (
    check_arguments,
    check_first_batch,
    model_placement,
)

__all__ = ["Counters", "NonFiniteError", "Objective"]


class Objective(ProductsMixin, EvaluationMixin, NormStatisticsMixin):
    r"""A model, a loss and data, seen as a function of a flat parameter vector.

    The objective is the loss function's own reduction applied to the whole data
    set at once, whatever the batching:
    :math:`L(\theta) = \frac{1}{Z}\sum_b S_b(\theta)`, where :math:`S_b` is
    batch ``b``'s loss with ``reduction="sum"`` and :math:`Z` the data-set
    normalizer of the loss's reduction (1 for ``"sum"``, the number of loss
    elements for a ``"mean"``, the total weight of the kept targets for a
    class-weighted or ``ignore_index`` cross-entropy, the number of samples for
    ``"batchmean"``). Uneven last batches, class weights and ignored targets
    are therefore weighted exactly. A custom loss declares its reduction with an
    attribute ``reduction`` (and optionally ``lossgeom_normalizer(targets)``);
    one that declares nothing is taken to be a mean over samples, checked on
    the first batch when the data has more than one (see ``docs/objective.md``).

    The objective never changes the model: it evaluates with
    :func:`torch.func.functional_call` on the parameters it is given, in the mode
    ``mode`` (``"eval"`` by default, so BatchNorm uses its running statistics and
    dropout is off), and restores every module's train/eval flag afterwards.
    Buffers are passed as copies, so even ``mode="train"`` leaves BatchNorm running
    statistics bit-identical.

    Args:
        model: any ``nn.Module``; its trainable parameters (``requires_grad``) are
            the coordinates of :math:`\theta`, in ``named_parameters()`` order.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, e.g.
            ``nn.CrossEntropyLoss()`` (``reduction`` ``"mean"`` or ``"sum"``;
            ``"none"`` is refused), or a custom loss (see above).
        data: ``(inputs, targets)`` tensors, a map-style ``Dataset`` of pairs, or a
            re-iterable of ``(inputs, targets)`` batches (a ``DataLoader``).
        max_samples: use a fixed subset of this many samples (seeded by ``seed``
            for tensors and Datasets; the first ones of a pass for iterables).
        batch_size: evaluate at most this many samples at once (bounds memory).
        device: evaluate on this device; the model is copied there if it is not.
        dtype: evaluate in this floating dtype; ``torch.float64`` gives a float64
            copy of the model for validation.
        mode: ``"eval"`` (default) or ``"train"`` (batch statistics in BatchNorm).
        hvp_backend: ``"auto"`` (forward-over-reverse, falling back to double
            backward where an operation lacks forward-mode AD),
            ``"forward-over-reverse"`` or ``"double-backward"``.
        seed: seed of the ``max_samples`` subset.
        data_parallel: sum over ``torch.distributed`` ranks. ``None`` means "when a
            process group with more than one rank is initialised". Tensor and
            Dataset data are split into contiguous shards, one per rank; an
            iterable is taken to be this rank's shard already (e.g. a DataLoader
            with a ``DistributedSampler``).

    Attributes:
        model: the module evaluated (the user's, or a copy if device/dtype differ).
        names: names of the trainable parameters, in the order of ``theta``.
        counters: :class:`Counters` of the work done.
        hvp_backend: the backend asked for; ``hvp_backend_used`` is the one that ran.
        unused_parameters: trainable parameters that did not reach the loss on the
            first batch; their gradient and curvature are zero.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Linear(3, 1).double()
        >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
        >>> obj = Objective(model, nn.MSELoss(), (X, y))
        >>> obj.dim
        4
        >>> H = obj.hvp(torch.eye(4, dtype=torch.float64))  # 4 vectors in one pass
        >>> Z = torch.cat([X, torch.ones(20, 1, dtype=torch.float64)], 1)
        >>> torch.allclose(H, 2 * Z.T @ Z / 20)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: object,
        *,
        max_samples: int | None = None,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        mode: Mode = "eval",
        hvp_backend: HvpBackend = "auto",
        seed: int = 0,
        data_parallel: bool | None = None,
    ):
        check_arguments(model, loss_fn, mode, hvp_backend, dtype)
        model_device, model_dtype = model_placement(model)
        target_device = model_device if device is None else torch.device(device)
        target_dtype = model_dtype if dtype is None else dtype
        self.copied = target_device != model_device or target_dtype != model_dtype
        if self.copied:
            model = copy.deepcopy(model).to(device=target_device, dtype=target_dtype)
            if isinstance(loss_fn, nn.Module):
                loss_fn = copy.deepcopy(loss_fn).to(
                    device=target_device, dtype=target_dtype
                )
        self.model = model
        self.loss_fn = loss_fn
        self._reduction = resolve_reduction(loss_fn)
        self._totals = None
        self.mode: Mode = mode
        self.hvp_backend: HvpBackend = hvp_backend
        self.hvp_backend_used: str | None = (
            None if hvp_backend == "auto" else hvp_backend
        )
        self.hvp_fallback_reason: str | None = None
        self.counters = Counters()
        self._buffer_override: dict[str, Tensor] | None = None
        self._knows_accuracy: bool | None = None
        self._device = target_device
        self._dtype = target_dtype
        self._set_layout(model)
        self._source: DataSource = make_source(
            data,
            max_samples=max_samples,
            batch_size=batch_size,
            seed=seed,
            device=target_device,
            dtype=target_dtype,
        )
        self._setup_data_parallel(data_parallel)
        self.unused_parameters: list[str] = check_first_batch(self)
        if self.data_parallel:
            self._check_same_theta(self.theta)

    def _set_layout(self, model: nn.Module) -> None:
        """Record the trainable parameters (the coordinates of theta) and buffers."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                f"the model ({type(model).__name__}) has no trainable parameters "
                "(none with requires_grad=True); there is nothing to differentiate."
            )
        self.names: list[str] = [n for n, _ in named]
        self._params: list[nn.Parameter] = [p for _, p in named]
        self._shapes = [p.shape for p in self._params]
        self._numels = [p.numel() for p in self._params]
        self._dim = sum(self._numels)
        self._running_stat_names = [
            f"{prefix}.{b}" if prefix else b
            for prefix, module in model.named_modules()
            if isinstance(module, _NormBase)
            for b in ("running_mean", "running_var", "num_batches_tracked")
            if getattr(module, b, None) is not None
        ]
        self._trainable = set(self.names)
        self._frozen = [
            (n, p) for n, p in model.named_parameters() if n not in self._trainable
        ]

    def info(self) -> dict[str, object]:
        """What this objective is, for results: mode, backend, dtype, data, size."""
        return {
            "dim": self._dim,
            "n_samples": self.n_samples,
            "mode": self.mode,
            "dtype": str(self._dtype).removeprefix("torch."),
            "device": str(self._device),
            "hvp_backend": self.hvp_backend_used or self.hvp_backend,
            "data": self.data_description,
            "world_size": self.world_size,
            "unused_parameters": list(self.unused_parameters),
        }

    # --------------------------------------------------------------- quantities
    def loss(self, theta: Tensor | None = None) -> float:
        """The loss over the data set at ``theta`` (default: the model's)."""
        theta = self.check_theta(theta)
        with torch.no_grad():
            value = self.accumulate(
                lambda x, y: self.batch_term(theta, x, y),
                what="loss",
                higher_order=False,
            )
        self.counters.loss += 1
        return float(value)

    def grad(self, theta: Tensor | None = None) -> Tensor:
        """The gradient of the loss over the data set at ``theta``, shape ``(d,)``."""
        return self.loss_and_grad(theta)[1]

    def loss_and_grad(self, theta: Tensor | None = None) -> tuple[float, Tensor]:
        """The loss over the data set and its gradient in one pass (reverse mode)."""
        theta = self.check_theta(theta)

        def fn(x: Tensor, y: Tensor) -> Tensor:
            with torch.enable_grad():
                t = theta.detach().requires_grad_(True)
                value = self.batch_term(t, x, y)
                (g,) = torch.autograd.grad(value, t, allow_unused=True)
            g = torch.zeros_like(theta) if g is None else g
            return torch.cat([g, value.detach().reshape(1)])

        out = self.accumulate(fn, what="loss and gradient", higher_order=False)
        self.counters.grad += 1
        self.counters.loss += 1
        return float(out[-1]), out[:-1]

    def __repr__(self) -> str:
        return (
            f"Objective(model={type(self.model).__name__}, dim={self._dim}, "
            f"data={self.data_description!r}, mode={self.mode!r}, "
            f"dtype={self._dtype}, device='{self._device}')"
        )
