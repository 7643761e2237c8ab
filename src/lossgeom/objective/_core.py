"""The functional core of an Objective: layout, one batch, the sum over data.

Everything an :class:`~lossgeom.objective.Objective` computes is built from three
pieces held here: the flat parameter layout (``theta`` <-> ``{name: tensor}``),
one batch's contribution to the objective at any ``theta`` through
:func:`torch.func.functional_call` (:meth:`ObjectiveCore.batch_term`, defined by
the loss's own reduction, see :mod:`lossgeom.objective._reduction`), and
:meth:`ObjectiveCore.accumulate`, which adds per-batch contributions over all
batches and ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

from lossgeom.linalg import check_block
from lossgeom.linalg._operator import NonFiniteError
from lossgeom.objective._affine_norm import AffineBatchNorm
from lossgeom.objective._data import Batch
from lossgeom.objective._distributed import DistributedMixin
from lossgeom.objective._reduction import LossReduction, Totals, check_sample_mean
from lossgeom.objective._validation import (
    check_loss_value,
    label_error,
    shape_or_type,
)

__all__ = ["Counters", "HvpBackend", "LossFn", "Mode", "ObjectiveCore"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Mode = Literal["eval", "train"]
HvpBackend = Literal["auto", "forward-over-reverse", "double-backward"]


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


class ObjectiveCore(DistributedMixin):
    """Parameter layout, data access and the per-batch functional core.

    The state is set by :class:`~lossgeom.objective.Objective`'s constructor; the
    mixins for products, many-point evaluation and normalization statistics build
    on the methods here.
    """

    model: nn.Module
    loss_fn: LossFn
    mode: Mode
    names: list[str]
    counters: Counters
    _params: list[nn.Parameter]
    _shapes: list[torch.Size]
    _numels: list[int]
    _dim: int
    _dtype: torch.dtype
    _frozen: list[tuple[str, nn.Parameter]]
    _trainable: set[str]
    _running_stat_names: list[str]
    _buffer_override: dict[str, Tensor] | None
    _reduction: LossReduction
    _totals: Totals | None

    # ------------------------------------------------------------------ layout
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
                f"like obj.theta); got {shape_or_type(theta)}."
            )
        check_block(theta, self._dim, self._dtype, self._device)
        return theta.detach()

    # -------------------------------------------------------------------- data
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
        """The loss function's own value on one batch at ``theta`` (differentiable).

        This is the loss of the batch as a minibatch (its own reduction over the
        batch), not its contribution to the objective: see :meth:`batch_term`.
        """
        loss = self.loss_fn(self.model_fn(theta, x), y)
        check_loss_value(loss)
        return loss

    def batch_term(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """One batch's contribution to the objective at ``theta`` (differentiable).

        The terms of all batches (and ranks) add up to the objective: the loss
        function's own reduction applied to the whole data set at once.
        """
        return self.loss_term(self.model_fn(theta, x), y)

    def loss_term(self, out: Tensor, y: Tensor, scale: float = 1.0) -> Tensor:
        """The contribution of outputs ``out`` with targets ``y`` to the objective.

        Args:
            out: model outputs on a batch (or on one sample, with its batch dim).
            y: the targets of those outputs.
            scale: a factor applied along with the normalizer (exactly 1 leaves
                the term as it is).
        """
        loss = self._reduction.term(out, y, self.loss_totals(), scale)
        check_loss_value(loss)
        return loss

    @property
    def loss_reduction(self) -> LossReduction:
        """How the loss function reduces over samples (see ``docs/objective.md``)."""
        return self._reduction

    def loss_totals(self) -> Totals:
        """The data-set normalizer of the loss's reduction, and sample counts.

        Computed once, on first use, by one pass over the targets (the model runs
        once, on the first batch, for the shape of its outputs); summed over
        ranks; float64. Not counted in :attr:`counters` (no loss is evaluated).
        When the loss is a custom one that declares no reduction and the data
        comes in more than one batch, the first batch checks that it is a mean
        over samples.
        """
        if self._totals is not None:
            return self._totals
        parts: list[Tensor] = []
        first: tuple[Tensor, Tensor] | None = None
        tail: tuple[int, ...] = ()
        with torch.no_grad():
            for x, y in self.batches():
                if first is None:
                    first = (x, y)
                    tail = self._output_tail(x)
                n = torch.tensor([float(x.shape[0]), 1.0], dtype=torch.float64)
                z = self._reduction.batch_normalizer(y, tail).cpu()
                parts.append(torch.cat([z, n]))
        if first is None:
            raise ValueError("the data yielded no batches.")
        flat = self.all_reduce(torch.stack(parts).sum(0).to(self._device)).cpu()
        z, odd, n, batches = (float(v) for v in flat)
        if self._reduction.reduction == "sum" or self._reduction.kind == "sum":
            z = 1.0
        if z <= 0:
            raise ValueError(
                f"the loss's normalizer over the data set is {z:g} (every target "
                "ignored, or zero total class weight): the mean loss is undefined."
            )
        totals = Totals(z, int(n), int(batches), plain_mean=odd == 0)
        if not self._reduction.declared and totals.n_batches > 1:
            with torch.no_grad(), self.probe_mode(higher_order=False):
                check_sample_mean(
                    self.loss_fn, self.model_fn(self.theta, first[0]), first[1]
                )
        self._totals = totals
        return totals

    def _output_tail(self, x: Tensor) -> tuple[int, ...]:
        """The model's output shape without the sample dimension."""
        if self._reduction.kind != "torch":
            return ()
        with self.probe_mode(higher_order=False):
            return tuple(self.model_fn(self.theta, x[:2]).shape[1:])

    @contextmanager
    def probe_mode(self, *, higher_order: bool = True) -> Iterator[None]:
        """Put the model in this objective's mode, restoring every flag after.

        With ``higher_order=True``, scaled-dot-product attention is restricted to
        its composite "math" kernel: the fused flash and memory-efficient kernels
        have neither forward-mode AD nor a double backward, so second derivatives
        through them fail. The math kernel computes the same function. In eval
        mode BatchNorm then runs as the affine map it is
        (:class:`~lossgeom.objective._affine_norm.AffineBatchNorm`), whose
        derivatives are far cheaper than PyTorch's general ones.
        """
        flags = [(m, m.training) for m in self.model.modules()]
        # only for derivatives and with BatchNorm: the mode costs every other
        # operation a Python call, and plain evaluation gains nothing from it
        affine = (
            higher_order
            and self.mode == "eval"
            and any(isinstance(m, _BatchNorm) for m, _ in flags)
        )
        self.model.train(self.mode == "train")
        try:
            with (
                sdpa_kernel(SDPBackend.MATH) if higher_order else nullcontext(),
                AffineBatchNorm() if affine else nullcontext(),
            ):
                yield
        finally:
            for module, flag in flags:
                module.training = flag

    # ------------------------------------------------------- average over data
    def accumulate(
        self,
        fn: Callable[[Tensor, Tensor], Tensor],
        *,
        what: str,
        per: Literal["term", "mean", "sum"] = "term",
        higher_order: bool = True,
        check_finite: bool = True,
        count_pass: bool = True,
    ) -> Tensor:
        r"""Combine a per-batch quantity over all batches and ranks.

        Returns :math:`\sum_b f(x_b, y_b)` when ``fn`` returns a batch's
        contribution to a data-set total (``per="term"``, e.g. a quantity built
        on :meth:`batch_term`), :math:`\frac1N\sum_b n_b\, f(x_b, y_b)` when it
        returns a batch mean over samples (``per="mean"``), or
        :math:`\frac1N\sum_b f(x_b, y_b)` when it returns a batch sum over
        samples (``per="sum"``). Counts one data pass. Non-finite results raise
        :class:`NonFiniteError` naming the first offending batch; a batch whose
        class labels lie outside the model's outputs raises ``ValueError`` naming
        the batch, the label and the number of outputs.

        Args:
            fn: ``fn(inputs, targets) -> Tensor`` of a fixed shape.
            what: what is computed, for error messages ("loss", "gradient", ...).
            per: whether ``fn`` returns a term, a batch mean or a batch sum.
            higher_order: whether ``fn`` takes second derivatives (see
                :meth:`probe_mode`).
            check_finite: raise on non-finite values (``False`` returns them).
            count_pass: count a data pass (``False`` when ``fn`` ignores the batch
                contents, e.g. products through graphs kept from an earlier pass).

        Returns:
            The average, a tensor of ``fn``'s shape.
        """
        if per == "term":
            self.loss_totals()  # before any transform of fn, and only once
        total: Tensor | None = None
        count = 0
        finite: list[Tensor] = []
        with self.probe_mode(higher_order=higher_order):
            for index, (x, y) in enumerate(self.batches()):
                n = int(x.shape[0])
                try:
                    value = fn(x, y)
                except (IndexError, RuntimeError) as err:
                    self.explain_failed_batch(index, x, y, err)
                    raise
                if check_finite:
                    finite.append(torch.isfinite(value).all())
                weighted = value * n if per == "mean" else value
                total = weighted if total is None else total + weighted
                count += n
        if count_pass:
            self.counters.passes += 1
        if total is None:
            raise ValueError(f"the data yielded no batches while computing the {what}.")
        if per == "term":
            result = self.all_reduce(total)
        else:
            flat = torch.cat([total.reshape(-1), total.new_tensor([count])])
            flat = self.all_reduce(flat)
            result = (flat[:-1] / flat[-1]).view(total.shape)
        if check_finite:
            flags = torch.stack(finite)
            if not bool(flags.all()) or not bool(torch.isfinite(result).all()):
                self.raise_non_finite(what, flags)
        return result

    def explain_failed_batch(
        self, index: int, x: Tensor, y: Tensor, err: Exception
    ) -> None:
        """Turn a failure caused by out-of-range class labels into a clear error.

        Called after a per-batch computation raised ``err``: if batch ``index``
        holds class labels outside the model's outputs, raise a ``ValueError``
        that says so (from ``err``); otherwise return, and the caller re-raises.
        """
        if y.is_floating_point():
            return
        try:
            with torch.no_grad():
                out = self.model_fn(self.theta, x)
        except Exception:  # noqa: BLE001 - the model fails: not a label problem
            return
        where = self.data_description + (
            f" on rank {self.rank}" if self.data_parallel else ""
        )
        problem = label_error(index, y, out, where)
        if problem is not None:
            raise problem from err

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
