"""The Objective: model + loss + data as a function of one flat parameter vector."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from lossgeom.linalg import check_block
from lossgeom.linalg._operator import NonFiniteError
from lossgeom.objective._data import Batch, DataSource, make_source

__all__ = ["Counters", "NonFiniteError", "Objective"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Mode = Literal["eval", "train"]
HvpBackend = Literal["auto", "forward-over-reverse", "double-backward"]

_BACKENDS = ("auto", "forward-over-reverse", "double-backward")
_VALIDATION_SAMPLES = 32


@dataclass
class Counters:
    """Work done by an :class:`Objective` since construction or :meth:`reset`.

    Attributes:
        loss: loss evaluations over the full data (``evaluate`` counts one per point).
        grad: full-data gradients.
        hvp: Hessian-vector products, counted per vector.
        ggn: Gauss-Newton-vector products, counted per vector.
        per_sample_grad: passes that computed per-sample gradients.
        passes: passes over the data (on this rank).
    """

    loss: int = 0
    grad: int = 0
    hvp: int = 0
    ggn: int = 0
    per_sample_grad: int = 0
    passes: int = 0

    def reset(self) -> None:
        """Set every counter to zero."""
        for name in asdict(self):
            setattr(self, name, 0)

    def to_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


class Objective:
    r"""A model, a loss and data, seen as a function of a flat parameter vector.

    The objective is the mean loss over all samples,
    :math:`L(\theta) = \frac{1}{N}\sum_b n_b\, \ell_b(\theta)`, where
    ``loss_fn`` returns the batch mean :math:`\ell_b` of batch ``b`` with
    :math:`n_b` samples, so uneven last batches are weighted exactly.

    The objective never changes the model: it evaluates with
    :func:`torch.func.functional_call` on the parameters it is given, in the mode
    ``mode`` (``"eval"`` by default, so BatchNorm uses its running statistics and
    dropout is off), and restores every module's train/eval flag afterwards.
    Buffers are passed as copies, so even ``mode="train"`` leaves BatchNorm running
    statistics bit-identical.

    Args:
        model: any ``nn.Module``; its trainable parameters (``requires_grad``) are
            the coordinates of :math:`\theta`, in ``named_parameters()`` order.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` batch mean, e.g.
            ``nn.CrossEntropyLoss()``.
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
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"expected model to be a torch.nn.Module; got {type(model).__name__}."
            )
        if not callable(loss_fn):
            raise TypeError(
                "expected loss_fn to be callable as loss_fn(outputs, targets) -> "
                f"scalar tensor; got {type(loss_fn).__name__}."
            )
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train'; got {mode!r}.")
        if hvp_backend not in _BACKENDS:
            raise ValueError(
                f"hvp_backend must be one of {_BACKENDS}; got {hvp_backend!r}."
            )
        if dtype is not None and not (
            isinstance(dtype, torch.dtype) and dtype.is_floating_point
        ):
            raise ValueError(
                f"dtype must be a floating torch.dtype such as torch.float64; got {dtype!r}."
            )

        model_device, model_dtype = _model_placement(model)
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
        trainable = set(self.names)
        self._trainable = trainable
        self._frozen = [
            (n, p) for n, p in model.named_parameters() if n not in trainable
        ]

        self._source: DataSource = make_source(
            data,
            max_samples=max_samples,
            batch_size=batch_size,
            seed=seed,
            device=target_device,
            dtype=target_dtype,
        )
        self.world_size = 1
        self.rank = 0
        if data_parallel is None:
            data_parallel = (
                dist.is_available()
                and dist.is_initialized()
                and (dist.get_world_size() > 1)
            )
        if data_parallel:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(
                    "data_parallel=True needs an initialised torch.distributed process "
                    "group; call torch.distributed.init_process_group first (torchrun "
                    "sets up the environment)."
                )
            self.world_size = dist.get_world_size()
            self.rank = dist.get_rank()
            self._source.shard(self.rank, self.world_size)
        self.data_parallel = bool(data_parallel)
        self.unused_parameters: list[str] = []
        self._validate()
        if self.data_parallel:
            self._check_same_theta()

    # ------------------------------------------------------------------ basics
    @property
    def dim(self) -> int:
        """Number of trainable parameters ``d``."""
        return self._dim

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of parameters, vectors and results."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of the model, parameters, vectors and results."""
        return self._device

    @property
    def theta(self) -> Tensor:
        """A flat 1-D copy of the model's current trainable parameters."""
        return torch.cat([p.detach().reshape(-1) for p in self._params]).clone()

    @property
    def n_samples(self) -> int:
        """Samples in one pass over the data (all ranks together)."""
        n = torch.tensor([float(self._source.n_samples)], dtype=torch.float64)
        return int(self._reduce_cpu(n).item())

    @property
    def local_n_samples(self) -> int:
        """Samples in one pass over this rank's data."""
        return self._source.n_samples

    @property
    def data_kind(self) -> str:
        """``"tensors"``, ``"dataset"`` (both held in memory, fixed batch order) or ``"iterable"``."""
        return self._source.kind

    @property
    def data_description(self) -> str:
        """A short description of the data, for reports."""
        return self._source.description

    def batches(self) -> Iterator[Batch]:
        """The ``(inputs, targets)`` batches of one pass on this rank."""
        return self._source.batches()

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Split a flat vector into a ``{name: tensor}`` dict of parameter shapes."""
        pieces = theta.split(self._numels)
        return {
            n: t.view(s)
            for n, t, s in zip(self.names, pieces, self._shapes, strict=True)
        }

    def flatten(self, tensors: dict[str, Tensor] | list[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors into a flat vector in ``theta`` order."""
        if isinstance(tensors, dict):
            tensors = [tensors[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

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

    # ----------------------------------------------------------- functional core
    def model_fn(self, theta: Tensor, x: Tensor) -> Tensor:
        """Model outputs at parameters ``theta`` on inputs ``x`` (differentiable)."""
        params = self.unflatten(theta)
        params.update((n, p.detach()) for n, p in self._frozen)
        return functional_call(self.model, (params, self.probe_buffers()), (x,))

    def probe_buffers(self) -> dict[str, Tensor | None]:
        """Buffers to evaluate with: copies, and in train mode no running statistics.

        In train mode normalisation layers use batch statistics; their running
        statistics are passed as ``None`` so that nothing is updated in place (which
        would also break ``vmap`` over parameters or tangents).
        """
        override = self._buffer_override or {}
        buffers: dict[str, Tensor | None] = {
            n: override.get(n, b).clone() for n, b in self.model.named_buffers()
        }
        if self.mode == "train":
            for name in self._running_stat_names:
                buffers[name] = None
        return buffers

    def batch_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """The batch-mean loss at ``theta`` on one batch (differentiable)."""
        loss = self.loss_fn(self.model_fn(theta, x), y)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            raise ValueError(
                "loss_fn must return a scalar tensor (the mean over the batch); got "
                + (
                    f"shape {tuple(loss.shape)}"
                    if isinstance(loss, Tensor)
                    else type(loss).__name__
                )
                + ". Use reduction='mean' (the default of torch.nn losses)."
            )
        return loss

    @contextmanager
    def probe_mode(self, *, higher_order: bool = True) -> Iterator[None]:
        """Put the model in this objective's mode, restoring every flag after.

        With ``higher_order=True``, scaled-dot-product attention is restricted to
        its composite "math" kernel: the fused flash and memory-efficient kernels
        have neither forward-mode AD nor a double backward, so second derivatives
        through them fail. The math kernel computes the same function.
        """
        flags = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.mode == "train")
        try:
            with sdpa_kernel(SDPBackend.MATH) if higher_order else nullcontext():
                yield
        finally:
            for module, flag in flags:
                module.training = flag

    def accumulate(
        self,
        fn: Callable[[Tensor, Tensor], Tensor],
        *,
        what: str,
        per: Literal["mean", "sum"] = "mean",
        higher_order: bool = True,
        check_finite: bool = True,
        count_pass: bool = True,
    ) -> Tensor:
        r"""Average a per-batch quantity over all samples and ranks.

        Returns :math:`\frac1N\sum_b n_b\, f(x_b, y_b)` when ``fn`` returns a batch
        mean (``per="mean"``), or :math:`\frac1N\sum_b f(x_b, y_b)` when it returns
        a batch sum (``per="sum"``). Counts one data pass. Non-finite results raise
        :class:`NonFiniteError` naming the first offending batch.

        Args:
            fn: ``fn(inputs, targets) -> Tensor`` of a fixed shape.
            what: what is computed, for error messages ("loss", "gradient", ...).
            per: whether ``fn`` returns a batch mean or a batch sum.
            higher_order: whether ``fn`` takes second derivatives (see
                :meth:`probe_mode`).
            check_finite: raise on non-finite values (``False`` returns them).
            count_pass: count a data pass (``False`` when ``fn`` ignores the batch
                contents, e.g. products through graphs kept from an earlier pass).

        Returns:
            The average, a tensor of ``fn``'s shape.
        """
        total: Tensor | None = None
        count = 0
        finite: list[Tensor] = []
        with self.probe_mode(higher_order=higher_order):
            for x, y in self.batches():
                n = int(x.shape[0])
                value = fn(x, y)
                if check_finite:
                    finite.append(torch.isfinite(value).all())
                weighted = value * n if per == "mean" else value
                total = weighted if total is None else total + weighted
                count += n
        if count_pass:
            self.counters.passes += 1
        if total is None:
            raise ValueError(f"the data yielded no batches while computing the {what}.")
        flat = torch.cat([total.reshape(-1), total.new_tensor([count])])
        flat = self.all_reduce(flat)
        result = (flat[:-1] / flat[-1]).view(total.shape)
        if check_finite:
            flags = torch.stack(finite)
            if not bool(flags.all()) or not bool(torch.isfinite(result).all()):
                self.raise_non_finite(what, flags)
        return result

    def raise_non_finite(self, what: str, flags: Tensor) -> None:
        """Raise :class:`NonFiniteError` for the first batch whose flag is False."""
        bad = (~flags).nonzero().flatten().tolist()
        where = (
            f"batch {bad[0]} (of {flags.numel()}"
            + (f", on rank {self.rank}" if self.data_parallel else "")
            + ")"
            if bad
            else "another rank's data"
        )
        raise NonFiniteError(
            f"non-finite {what} in {where}. Check that batch's inputs and targets "
            "for NaN/inf, and the parameters for overflow (a diverged model); a "
            "lower learning rate or float64 may help."
        )

    # --------------------------------------------------------------- quantities
    def loss(self, theta: Tensor | None = None) -> float:
        """The mean loss over all samples at ``theta`` (default: the model's)."""
        theta = self.check_theta(theta)
        with torch.no_grad():
            value = self.accumulate(
                lambda x, y: self.batch_loss(theta, x, y),
                what="loss",
                higher_order=False,
            )
        self.counters.loss += 1
        return float(value)

    def grad(self, theta: Tensor | None = None) -> Tensor:
        """The gradient of the mean loss at ``theta``, shape ``(d,)``."""
        return self.loss_and_grad(theta)[1]

    def loss_and_grad(self, theta: Tensor | None = None) -> tuple[float, Tensor]:
        """The mean loss and its gradient in one pass (reverse-mode autograd)."""
        theta = self.check_theta(theta)

        def fn(x: Tensor, y: Tensor) -> Tensor:
            with torch.enable_grad():
                t = theta.detach().requires_grad_(True)
                value = self.batch_loss(t, x, y)
                (g,) = torch.autograd.grad(value, t, allow_unused=True)
            g = torch.zeros_like(theta) if g is None else g
            return torch.cat([g, value.detach().reshape(1)])

        out = self.accumulate(fn, what="loss and gradient", higher_order=False)
        self.counters.grad += 1
        self.counters.loss += 1
        return float(out[-1]), out[:-1]

    def hvp(self, V: Tensor, theta: Tensor | None = None) -> Tensor:
        """Hessian-vector products ``H @ V`` for ``V`` of shape ``(d,)`` or ``(d, m)``.

        All ``m`` vectors go through one pass over the data (``vmap`` over the
        tangents, so the forward and backward pass of the model is shared).

        Args:
            V: one vector ``(d,)`` or a block ``(d, m)``, on the model's device and
                dtype.
            theta: where to take the Hessian (default: the model's parameters).

        Returns:
            ``H @ V`` with the shape of ``V``.
        """
        check_block(V, self._dim, self._dtype, self._device)
        theta = self.check_theta(theta)
        single = V.ndim == 1
        block = V.unsqueeze(1) if single else V
        m = block.shape[1]
        if m == 0:
            return torch.empty_like(V)
        backend = self.hvp_backend_used
        if backend is None:  # "auto", not resolved yet
            first, second = _auto_backends(self._device)
            try:
                out = self._hvp_with(first, block, theta)
                self.hvp_backend_used = first
            except NonFiniteError:
                raise
            except (RuntimeError, NotImplementedError) as err:
                self.hvp_fallback_reason = (
                    f"{type(err).__name__}: {str(err).splitlines()[0]}"
                )
                out = self._hvp_with(second, block, theta)
                self.hvp_backend_used = second
                warnings.warn(
                    f"{first} HVP failed, using {second} instead "
                    f"({self.hvp_fallback_reason}).",
                    RuntimeWarning,
                    stacklevel=2,
                )
        else:
            out = self._hvp_with(backend, block, theta)
        self.counters.hvp += m
        return out.squeeze(1) if single else out

    def _hvp_with(self, backend: str, V: Tensor, theta: Tensor) -> Tensor:
        if backend == "forward-over-reverse":
            return self.accumulate(
                lambda x, y: _hvp_forward_over_reverse(self.batch_loss, theta, V, x, y),
                what="Hessian-vector product",
            )
        return self.accumulate(
            lambda x, y: _hvp_double_backward(self.batch_loss, theta, V, x, y),
            what="Hessian-vector product",
        )

    def per_sample_grad(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample gradients on one batch, shape ``(n, d)``, via ``vmap``.

        Sample ``i``'s loss is ``loss_fn`` on a batch of that one sample, so a loss
        whose batch mean is not the plain mean of per-sample losses (e.g.
        class-weighted cross-entropy) gives per-sample gradients that do not
        average to the batch gradient. Needs ``mode="eval"``: batch statistics of a
        single sample are meaningless.
        """
        if self.mode != "eval":
            raise ValueError(
                "per-sample gradients need mode='eval' (BatchNorm in train mode "
                "normalises each sample by statistics of the whole batch); build the "
                "Objective with mode='eval'."
            )

        def one(t: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
            return self.batch_loss(t, xi.unsqueeze(0), yi.unsqueeze(0))

        return vmap(grad(one), in_dims=(None, 0, 0))(theta, x, y)

    def evaluate(self, points: Tensor, *, chunk_size: int | None = 16) -> Tensor:
        """The mean loss at many parameter points in one pass over the data.

        Points are evaluated ``chunk_size`` at a time with ``vmap`` (bounding
        memory to about ``chunk_size`` forward passes of one batch);
        ``chunk_size=1`` evaluates them one after another without ``vmap``, which
        is faster for convolutions on the CPU (a batch of convolution weights
        becomes a grouped convolution there). In eval mode that path loads each
        point into one private copy of the model, made once per objective, which
        costs less per point than swapping tensors into the model. Unlike
        :meth:`loss`, non-finite values are returned, not raised: far from a
        minimum the loss may legitimately overflow.

        Args:
            points: parameter vectors, shape ``(m, d)``.
            chunk_size: points per vectorised call; ``None`` for all at once; 1
                for one point after another.

        Returns:
            The loss at each point, shape ``(m,)``.
        """
        return self._evaluate(points, chunk_size, accuracy=False)["loss"]

    def evaluate_metrics(
        self, points: Tensor, *, chunk_size: int | None = 16
    ) -> dict[str, Tensor]:
        """Loss, and accuracy when :attr:`knows_accuracy`, at many points in one pass.

        Like :meth:`evaluate` (one forward pass per point and batch), but the
        outputs also give the fraction of samples whose argmax equals the integer
        class target.

        Returns:
            ``{"loss": (m,)}``, plus ``"accuracy": (m,)`` for classification.
        """
        return self._evaluate(points, chunk_size, accuracy=self.knows_accuracy)

    def _evaluate(
        self, points: Tensor, chunk_size: int | None, *, accuracy: bool
    ) -> dict[str, Tensor]:
        if (
            not isinstance(points, Tensor)
            or points.ndim != 2
            or points.shape[1] != self._dim
        ):
            raise ValueError(
                f"expected points of shape (m, {self._dim}) (one parameter vector per "
                f"row); got {_shape_or_type(points)}. A single point is "
                "points.unsqueeze(0)."
            )
        check_block(points.T, self._dim, self._dtype, self._device)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None; got {chunk_size}.")
        names = ["loss", "accuracy"] if accuracy else ["loss"]
        if points.shape[0] == 0:
            return {n: points.new_empty(0) for n in names}

        def stats(out: Tensor, y: Tensor) -> Tensor:
            loss = self.loss_fn(out, y)
            if not accuracy:
                return loss.reshape(1)
            acc = (out.argmax(-1) == y).to(loss.dtype).mean()
            # argmax of a NaN row is an index like any other: no accuracy there.
            acc = torch.where(torch.isfinite(loss), acc, torch.full_like(acc, math.nan))
            return torch.stack([loss, acc])

        runner = (
            self._point_runner() if chunk_size == 1 and points.shape[0] > 1 else None
        )
        if runner is not None:
            targets = [p for n, p in runner.named_parameters() if n in self._trainable]

            def batched(P: Tensor, x: Tensor, y: Tensor) -> Tensor:
                rows = []
                for point in P:
                    for t, piece in zip(
                        targets, self.unflatten(point).values(), strict=True
                    ):
                        t.copy_(piece)
                    rows.append(stats(runner(x), y))
                return torch.stack(rows)
        else:
            batched = _over_points(
                lambda t, x, y: stats(self.model_fn(t, x), y), chunk_size
            )
        with torch.no_grad():
            out = self.accumulate(
                lambda x, y: batched(points, x, y),
                what="loss",
                higher_order=False,
                check_finite=False,
            )
        self.counters.loss += points.shape[0]
        return {n: out[:, i] for i, n in enumerate(names)}

    def _point_runner(self) -> nn.Module | None:
        """A private eval-mode copy of the model to load points into, or None.

        Made afresh for each evaluation (so attributes, hooks and replaced
        parameters of the model are always current; one copy per call, never per
        point), with the buffers of :meth:`using_buffers` and the frozen
        parameters :meth:`model_fn` uses. ``None`` in train mode or when the model
        cannot be deep-copied (then points go through ``functional_call``).
        """
        if self.mode != "eval":
            return None
        try:
            runner = copy.deepcopy(self.model)
        except Exception:  # noqa: BLE001 - fall back to functional_call
            return None
        runner.eval()
        override = self._buffer_override or {}
        frozen = dict(self._frozen)
        with torch.no_grad():
            for p in runner.parameters():
                p.requires_grad_(False)
            for n, mine in runner.named_buffers():
                if n in override:
                    mine.copy_(override[n])
            for n, mine in runner.named_parameters():
                if n in frozen:
                    mine.copy_(frozen[n])
        return runner

    @property
    def knows_accuracy(self) -> bool:
        """Whether accuracy is defined: outputs ``(n, C>1)`` and integer targets ``(n,)``."""
        if self._knows_accuracy is None:
            x, y = next(iter(self.batches()))
            x, y = x[:2], y[:2]
            with torch.no_grad(), self.probe_mode(higher_order=False):
                out = self.model_fn(self.theta, x)
            self._knows_accuracy = bool(
                out.ndim == 2
                and out.shape[1] > 1
                and y.ndim == 1
                and not y.is_floating_point()
                and not y.is_complex()
            )
        return self._knows_accuracy

    @property
    def has_norm_statistics(self) -> bool:
        """Whether the model has BatchNorm layers with running statistics.

        These are what :meth:`norm_statistics` recomputes. (InstanceNorm with
        ``track_running_stats`` is left alone: its forward pass ignores a
        cumulative momentum, and its statistics are rarely used in eval mode.)
        """
        return any(
            isinstance(m, _BatchNorm) and m.track_running_stats
            for m in self.model.modules()
        )

    def norm_statistics(self, theta: Tensor | None = None) -> dict[str, Tensor]:
        """Running statistics of every BatchNorm layer recomputed at ``theta``.

        One pass over this objective's data in train mode, starting from zero mean
        and unit variance, with the cumulative average over batches (each batch
        weighs the same; one full batch gives the exact data statistics, with the
        unbiased variance BatchNorm keeps). This is what a point between two
        networks needs before it is evaluated in eval mode: the end points'
        statistics do not describe the interpolated network. The whole model is
        in train mode for that pass (as ``torch.optim.swa_utils.update_bn`` does),
        so dropout is active while the statistics are gathered. Neither the model
        nor this objective is changed; use the result with :meth:`using_buffers`.

        Returns:
            ``{buffer name: tensor}`` for every running statistic (empty when
            there is none).
        """
        theta = self.check_theta(theta)
        if not self.has_norm_statistics:
            return {}
        stats: dict[str, Tensor] = {}
        for prefix, module in self.model.named_modules():
            if isinstance(module, _BatchNorm) and module.track_running_stats:
                name = f"{prefix}." if prefix else ""
                if module.running_mean is not None:
                    stats[name + "running_mean"] = torch.zeros_like(module.running_mean)
                    stats[name + "running_var"] = torch.ones_like(module.running_var)
                if module.num_batches_tracked is not None:
                    stats[name + "num_batches_tracked"] = torch.zeros_like(
                        module.num_batches_tracked
                    )
        norms = [m for m in self.model.modules() if isinstance(m, _BatchNorm)]
        momenta = [m.momentum for m in norms]
        flags = [(m, m.training) for m in self.model.modules()]
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        buffers.update(stats)  # updated in place by the train-mode forward passes
        params = self.unflatten(theta)
        params.update((n, p.detach()) for n, p in self._frozen)
        try:
            for m in norms:
                m.momentum = None  # cumulative average over batches
            self.model.train(True)
            with torch.no_grad():
                for x, _ in self.batches():
                    functional_call(self.model, (params, buffers), (x,))
        finally:
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum
            for module, flag in flags:
                module.training = flag
        self.counters.passes += 1
        if self.data_parallel:
            world = float(self.world_size)
            for n, t in stats.items():
                if t.is_floating_point():
                    stats[n] = self.all_reduce(t.clone()) / world
        return stats

    @contextmanager
    def using_buffers(self, buffers: dict[str, Tensor]) -> Iterator[Objective]:
        """Evaluate with these buffers (e.g. :meth:`norm_statistics`) inside the block.

        Only this objective changes, and only inside the block; the model's own
        buffers are untouched.
        """
        known = {n for n, _ in self.model.named_buffers()}
        unknown = sorted(set(buffers) - known)
        if unknown:
            raise ValueError(
                f"unknown buffer names {unknown[:3]}; the model's buffers are "
                f"{sorted(known)[:5]}{' ...' if len(known) > 5 else ''}."
            )
        previous = self._buffer_override
        self._buffer_override = {**(previous or {}), **buffers}
        try:
            yield self
        finally:
            self._buffer_override = previous

    # ----------------------------------------------------------------- helpers
    def check_theta(self, theta: Tensor | None) -> Tensor:
        """Validate a parameter vector (``None``: the model's), returned detached."""
        if theta is None:
            return self.theta
        if (
            not isinstance(theta, Tensor)
            or theta.ndim != 1
            or theta.shape[0] != self._dim
        ):
            raise ValueError(
                f"expected theta of shape ({self._dim},) (a flat parameter vector, "
                f"like obj.theta); got {_shape_or_type(theta)}."
            )
        check_block(theta, self._dim, self._dtype, self._device)
        return theta.detach()

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks (a no-op unless data-parallel); returns the sum."""
        if not self.data_parallel:
            return t
        home = t.device
        comm = self._comm_device()
        t = t.to(comm).contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.to(home)

    def _reduce_cpu(self, t: Tensor) -> Tensor:
        return self.all_reduce(t).cpu()

    def _comm_device(self) -> torch.device:
        # NCCL reduces on the GPU; gloo (and others) on the CPU.
        if dist.get_backend() == "nccl":
            return self._device
        return torch.device("cpu")

    def _check_same_theta(self) -> None:
        theta = self.theta.double().to(self._comm_device())
        local = torch.stack([theta.sum(), (theta * theta).sum(), theta.abs().max()])
        high = local.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        differs = (high != local).any().double().reshape(1)
        dist.all_reduce(differs, op=dist.ReduceOp.MAX)
        if differs.item() > 0:
            raise ValueError(
                "the model's parameters differ between ranks; data-parallel probes "
                "need the same theta on every rank. Seed the model identically or "
                "broadcast the parameters from rank 0 first."
            )

    def _validate(self) -> None:
        """Run the first batch once to turn shape and type mistakes into clear errors."""
        first = next(iter(self.batches()), None)
        if first is None:
            raise ValueError(
                f"the data is empty: the {self.data_description} yielded no "
                "batches. Pass at least one batch."
            )
        x, y = first
        x, y = x[:_VALIDATION_SAMPLES], y[:_VALIDATION_SAMPLES]
        leaves = {
            n: p.detach().clone().requires_grad_(True)
            for n, p in zip(self.names, self._params, strict=True)
        }
        frozen = {n: p.detach() for n, p in self._frozen}
        buffers = self.probe_buffers()
        with self.probe_mode(), torch.enable_grad():
            try:
                out = functional_call(self.model, ({**leaves, **frozen}, buffers), (x,))
            except Exception as err:  # noqa: BLE001 - re-raised with context
                raise ValueError(
                    f"the model ({type(self.model).__name__}) could not be applied to "
                    f"the inputs: got inputs of shape {tuple(x.shape)} and dtype "
                    f"{x.dtype} (first batch of the {self.data_description}); the "
                    f"model raised {type(err).__name__}: {err}. Check the input shape "
                    "the model expects (e.g. flatten images for an MLP)."
                ) from err
            try:
                loss = self.loss_fn(out, y)
            except Exception as err:  # noqa: BLE001 - re-raised with context
                raise ValueError(
                    f"loss_fn could not compare outputs of shape {tuple(out.shape)} "
                    f"({out.dtype}) with targets of shape {tuple(y.shape)} "
                    f"({y.dtype}): {type(err).__name__}: {err}. Cross-entropy expects "
                    "class indices (int64, shape (n,)) or probabilities shaped like "
                    "the outputs; MSE expects targets shaped like the outputs."
                ) from err
            if not isinstance(loss, Tensor) or loss.ndim != 0:
                raise ValueError(
                    "loss_fn must return a scalar tensor (the mean over the batch); "
                    "got "
                    + (
                        f"shape {tuple(loss.shape)}"
                        if isinstance(loss, Tensor)
                        else type(loss).__name__
                    )
                    + ". Use reduction='mean' (the default of torch.nn losses)."
                )
            if not loss.requires_grad:
                raise ValueError(
                    "the loss does not depend on any trainable parameter (no gradient "
                    "flows from loss_fn(model(x), y) to the parameters). Check that "
                    "loss_fn does not detach its input."
                )
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        self.unused_parameters = [
            n for n, g in zip(self.names, grads, strict=True) if g is None
        ]
        if self.unused_parameters:
            warnings.warn(
                "these trainable parameters do not reach the loss on the first batch; "
                "their gradient and curvature are zero: "
                + ", ".join(self.unused_parameters),
                UserWarning,
                stacklevel=3,
            )

    def __repr__(self) -> str:
        return (
            f"Objective(model={type(self.model).__name__}, dim={self._dim}, "
            f"data={self.data_description!r}, mode={self.mode!r}, "
            f"dtype={self._dtype}, device='{self._device}')"
        )


def _over_points(
    fn: Callable[[Tensor, Tensor, Tensor], Tensor], chunk_size: int | None
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``fn(theta, x, y)`` mapped over the rows of ``theta``: vmap, or a loop for 1."""
    if chunk_size == 1:
        return lambda P, x, y: torch.stack([fn(p, x, y) for p in P])
    return vmap(fn, in_dims=(0, None, None), chunk_size=chunk_size)


def _shape_or_type(x: object) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _model_placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    floating = [p for p in model.parameters() if p.is_floating_point()]
    if not floating:
        raise ValueError(
            f"the model ({type(model).__name__}) has no floating-point parameters; "
            "there is nothing to differentiate."
        )
    devices = {p.device for p in floating}
    dtypes = {p.dtype for p in floating}
    if len(devices) > 1:
        raise ValueError(
            f"the model's parameters are spread over devices {sorted(map(str, devices))}; "
            "an Objective needs them on one device. Move the model with model.to(device)."
        )
    if len(dtypes) > 1:
        raise ValueError(
            f"the model's parameters have mixed dtypes {sorted(map(str, dtypes))}; "
            "pass dtype=... to evaluate a copy in one dtype."
        )
    return devices.pop(), dtypes.pop()


def _hvp_forward_over_reverse(
    batch_loss: Callable[..., Tensor], theta: Tensor, V: Tensor, x: Tensor, y: Tensor
) -> Tensor:
    """H_b @ V by forward-mode differentiation of the reverse-mode gradient."""
    g = grad(batch_loss)
    if y.is_floating_point():
        # Give the targets an explicit zero tangent. Without it, forward AD through
        # mse_loss's backward writes into an immutable "efficient zero" tangent and
        # fails (pytorch/pytorch#123996); a materialised zero avoids that path.
        y_tangent = torch.zeros_like(y)

        def one(v: Tensor) -> Tensor:
            return jvp(lambda t, yy: g(t, x, yy), (theta, y), (v, y_tangent))[1]

    else:

        def one(v: Tensor) -> Tensor:
            return jvp(lambda t: g(t, x, y), (theta,), (v,))[1]

    if V.shape[1] == 1:
        return one(V[:, 0]).unsqueeze(1)
    return vmap(one, in_dims=1, out_dims=1)(V)


def _auto_backends(device: torch.device) -> tuple[str, str]:
    """The HVP backend tried first under ``"auto"``, and the fallback.

    Measured with ``benchmarks/hvp.py`` (float32, eval mode): on CPU double backward
    was faster than forward-over-reverse on an MLP (2.1x), a BatchNorm CNN (1.06x)
    and ResNet-20 (1.09x), so CPU starts with double backward; elsewhere
    forward-over-reverse comes first. Either falls back to the other when an
    operation lacks the derivative it needs. Both are exact; the choice only
    changes speed (and round-off).
    """
    if device.type == "cpu":
        return "double-backward", "forward-over-reverse"
    return "forward-over-reverse", "double-backward"


def _hvp_double_backward(
    batch_loss: Callable[..., Tensor], theta: Tensor, V: Tensor, x: Tensor, y: Tensor
) -> Tensor:
    """H_b @ V by differentiating the gradient's inner product with V (reverse twice).

    The forward and first backward pass are shared by all columns of ``V``; each
    column costs one backward pass through the gradient's graph. (A ``vmap`` over
    the columns, ``is_grads_batched``, was slower than this loop for convolutions
    on CPU.)
    """
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(batch_loss(t, x, y), t, create_graph=True)
        return hvp_from_graph(g, t, V)


def hvp_from_graph(g: Tensor, t: Tensor, V: Tensor) -> Tensor:
    """Columns ``d(g . v)/dt`` for each column ``v`` of ``V``, keeping ``g``'s graph."""
    if not g.requires_grad:  # the loss is linear in theta: zero Hessian
        return torch.zeros_like(V)
    cols = []
    for j in range(V.shape[1]):
        (hv,) = torch.autograd.grad(g, t, V[:, j], retain_graph=True, allow_unused=True)
        cols.append(torch.zeros_like(t) if hv is None else hv)
    return torch.stack(cols, dim=1)
