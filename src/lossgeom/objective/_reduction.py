r"""How a loss reduces over samples, and so what the loss over a data set is.

The objective over a data set is the loss function's own reduction applied to the
whole data set at once, whatever the batching:

.. math::
    L(\theta) = \frac{1}{Z} \sum_b S_b(\theta),

where :math:`S_b` is the loss of batch ``b`` with ``reduction="sum"`` and
:math:`Z` the normalizer of the loss's own reduction over the whole data set:
1 for ``"sum"``, the number of loss elements for an elementwise ``"mean"``, the
total target weight of the kept (not ignored) targets for a class-weighted
cross-entropy or NLL ``"mean"``, the number of samples for ``"batchmean"``.
Each batch contributes the *term* :math:`S_b / Z`; the terms add up to
:math:`L`.

A loss that is not one of the ``torch.nn`` losses known here is *custom*. It
declares how it reduces with an attribute ``reduction`` (``"mean"``: a mean over
samples, or ``"sum"``), optionally with ``lossgeom_normalizer(targets)``, the
number its batch mean divides by (then the batch's term is
``loss * Z_b / Z`` with :math:`Z = \sum_b Z_b`). A custom loss that declares
nothing is taken to be a mean over samples, and when the data comes in more than
one batch that is checked on the first batch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LossReduction", "Totals", "resolve_reduction"]

_CLASS_INDEX = (nn.CrossEntropyLoss, nn.NLLLoss)
_ELEMENTWISE = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.KLDivLoss,
)
_REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class Totals:
    """Data-set totals of a loss's reduction, computed once per objective.

    Attributes:
        normalizer: :math:`Z`, what the data-set sum of the loss is divided by.
        n_samples: :math:`N`, samples in one pass (all ranks).
        n_batches: batches in one pass (all ranks).
        plain_mean: whether every sample weighs the same in the loss's mean (so
            that a minibatch's loss is an unbiased estimate of the objective).
    """

    normalizer: float
    n_samples: int
    n_batches: int
    plain_mean: bool


class LossReduction:
    """The reduction of one loss function, and the term each batch contributes.

    Attributes:
        kind: ``"torch"`` (a known ``torch.nn`` loss, summed per batch),
            ``"sum"``, ``"mean"`` (a custom mean over samples) or
            ``"normalizer"`` (a custom mean with ``lossgeom_normalizer``).
        reduction: the loss's own reduction (``"mean"``, ``"sum"``,
            ``"batchmean"``).
        declared: whether the reduction was declared or known (``False``: a
            custom loss taken to be a mean over samples, to be checked).
        description: a short description for results and messages.
    """

    def __init__(
        self,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        kind: str,
        reduction: str,
        *,
        declared: bool = True,
        sum_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ):
        self.loss_fn = loss_fn
        self.kind = kind
        self.reduction = reduction
        self.declared = declared
        self.sum_fn = sum_fn
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        self.description = f"{name} (reduction={reduction!r})"

    # ------------------------------------------------------------- normalizer
    def batch_normalizer(self, y: Tensor, out_tail: tuple[int, ...]) -> Tensor:
        """This batch's share of :math:`Z` (float64 scalar) and its ignored count.

        Returns a float64 tensor ``[Z_b, not_plain_b]``: ``not_plain_b`` counts
        targets that make the mean not a plain mean over samples (ignored
        targets, class weights).
        """
        n = y.shape[0]
        one = y.new_zeros((), dtype=torch.float64)
        if self.kind == "sum":
            return torch.stack([one, one])
        if self.kind == "mean":
            return torch.stack([one + n, one])
        if self.kind == "normalizer":
            z = self.loss_fn.lossgeom_normalizer(y)  # type: ignore[attr-defined]
            return torch.stack([one + torch.as_tensor(z).double().to(one.device), one])
        loss = self.loss_fn
        if loss.reduction == "sum":
            return torch.stack([one, one])
        if isinstance(loss, nn.KLDivLoss) and loss.reduction == "batchmean":
            return torch.stack([one + n, one])
        if isinstance(loss, _CLASS_INDEX) and not y.is_floating_point():
            keep = y != loss.ignore_index
            weight = loss.weight
            if weight is None:
                z = keep.sum().double()
                odd = (~keep).sum().double()
            else:
                safe = torch.where(keep, y, 0).clamp(0, weight.numel() - 1)
                z = (weight.double()[safe] * keep).sum()
                odd = one + y.numel()
            return torch.stack([one + z, one + odd])
        if isinstance(loss, nn.CrossEntropyLoss):  # probability targets
            classes = y.shape[1] if y.ndim > 1 else y.numel()
            return torch.stack([one + y.numel() // max(classes, 1), one])
        shape = torch.broadcast_shapes((n, *out_tail), tuple(y.shape))
        return torch.stack([one + math.prod(shape), one])

    # ------------------------------------------------------------------ terms
    def term(
        self, out: Tensor, y: Tensor, totals: Totals, scale: float = 1.0
    ) -> Tensor:
        """This batch's contribution to the objective, times ``scale``."""
        if self.kind == "torch":
            return self.sum_fn(out, y) * (scale / totals.normalizer)
        value = self.loss_fn(out, y)
        if self.kind == "sum":
            return value * scale if scale != 1.0 else value
        if self.kind == "mean":
            return value * (scale * y.shape[0] / totals.n_samples)
        z = self.loss_fn.lossgeom_normalizer(y)  # type: ignore[attr-defined]
        return value * (torch.as_tensor(z).to(value) * (scale / totals.normalizer))

    def value_over(self, pairs: Iterable[tuple[Tensor, Tensor]]) -> float:
        """The loss over all ``(outputs, targets)`` chunks at once, as a float.

        For callers that hold outputs already (evaluation during training); the
        same definition as the objective's, without a separate normalizer pass.
        """
        total, z = 0.0, 0.0
        for out, y in pairs:
            zb = float(self.batch_normalizer(y, tuple(out.shape[1:]))[0])
            if self.kind == "torch":
                total += float(self.sum_fn(out, y))
            elif self.kind == "sum":
                total += float(self.loss_fn(out, y))
            else:
                total += float(self.loss_fn(out, y)) * zb
            z += zb
        if self.kind == "sum" or self.reduction == "sum":
            z = 1.0
        return total / z if z > 0 else math.nan

    def minibatch_scale(self, totals: Totals) -> str | None:
        """How a minibatch's loss estimates the objective's gradient direction.

        ``"mean"``: the loss of a minibatch is an unbiased estimate of the
        objective; ``"sum"``: its sum divided by the minibatch size is, up to a
        constant factor; ``None``: neither (class weights, ignored targets, or a
        normalizer of its own make the minibatch loss a ratio).
        """
        if self.kind == "sum" or (
            self.kind == "torch" and self.loss_fn.reduction == "sum"
        ):
            return "sum"
        if self.kind == "normalizer" or not totals.plain_mean:
            return None
        return "mean"


def resolve_reduction(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> LossReduction:
    """How ``loss_fn`` reduces over samples; refuses what cannot be summed exactly."""
    if isinstance(loss_fn, nn.GaussianNLLLoss):
        raise ValueError(
            "GaussianNLLLoss takes three arguments (input, target, var), but an "
            "Objective calls loss_fn(outputs, targets). Wrap it in a function that "
            "splits the model's outputs into mean and variance, and declare its "
            "reduction on the function, e.g. loss.reduction = 'mean' and "
            "loss.lossgeom_normalizer = lambda targets: targets.numel() (see "
            "docs/objective.md)."
        )
    reduction = getattr(loss_fn, "reduction", None)
    if type(loss_fn) in (*_CLASS_INDEX, *_ELEMENTWISE):
        allowed = (
            (*_REDUCTIONS, "batchmean")
            if isinstance(loss_fn, nn.KLDivLoss)
            else _REDUCTIONS
        )
        if reduction not in allowed and reduction != "none":
            raise ValueError(
                f"{type(loss_fn).__name__}(reduction={reduction!r}) is not a "
                f"reduction an Objective knows; use one of {allowed} (the loss over "
                "the data set is that reduction applied to all samples at once)."
            )
        # reduction="none" is refused on the first batch, with the loss's shape
        summed = copy.copy(loss_fn)
        summed.reduction = "sum"
        return LossReduction(loss_fn, "torch", reduction, sum_fn=summed)
    if reduction is None:
        return LossReduction(loss_fn, "mean", "mean", declared=False)
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"the loss declares reduction={reduction!r}; an Objective needs a "
            "scalar loss per batch: declare reduction='mean' (a mean over samples, "
            "or over lossgeom_normalizer(targets) when the loss has that method) or "
            "reduction='sum'."
        )
    if reduction == "mean" and callable(getattr(loss_fn, "lossgeom_normalizer", None)):
        return LossReduction(loss_fn, "normalizer", "mean")
    return LossReduction(loss_fn, reduction, reduction)


def check_sample_mean(
    loss_fn: Callable[[Tensor, Tensor], Tensor], out: Tensor, y: Tensor
) -> None:
    """Refuse an undeclared custom loss that is not a mean over samples.

    Compares the loss of a whole batch with the size-weighted mean of the loss of
    its two halves (exact for a mean over samples).
    """
    n = out.shape[0]
    if n < 2:
        return
    h = n // 2
    whole = float(loss_fn(out, y))
    halves = (
        h * float(loss_fn(out[:h], y[:h])) + (n - h) * float(loss_fn(out[h:], y[h:]))
    ) / n
    tol = 10 * math.sqrt(torch.finfo(out.dtype).eps)
    if not math.isclose(whole, halves, rel_tol=tol, abs_tol=tol * 1e-3):
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise ValueError(
            f"the loss {name} declares no reduction, so it is taken to be a mean "
            "over samples; but on the first batch its value "
            f"({whole:.10g}) is not the size-weighted mean of its values on the two "
            f"halves of the batch ({halves:.10g}), so batches cannot be combined. "
            "Declare how it reduces: set loss_fn.reduction = 'sum', or 'mean' "
            "together with loss_fn.lossgeom_normalizer(targets) -> the number "
            "its batch mean divides by (see docs/objective.md)."
        )
