"""Evaluation of an Objective at many parameter points in one pass over the data.

Points go through ``vmap`` a chunk at a time, or, with ``chunk_size=1`` in eval
mode, one after another through a private copy of the model (faster for
convolutions on the CPU, where a batch of convolution weights under ``vmap``
becomes a grouped convolution), with each BatchNorm after a convolution folded
into it (:mod:`lossgeom.objective._fold_norm`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import vmap

from lossgeom.linalg import check_block
from lossgeom.objective._core import LossFn, ObjectiveCore
from lossgeom.objective._fold_norm import FoldOnce
from lossgeom.objective._validation import shape_or_type

__all__ = ["EvaluationMixin"]

PointsFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class EvaluationMixin(ObjectiveCore):
    """Loss and accuracy at many parameter points."""

    _knows_accuracy: bool | None

    def evaluate(self, points: Tensor, *, chunk_size: int | None = 16) -> Tensor:
        """The loss over the data set at many parameter points in one pass.

        Points are evaluated ``chunk_size`` at a time with ``vmap`` (bounding
        memory to about ``chunk_size`` forward passes of one batch);
        ``chunk_size=1`` evaluates them one after another without ``vmap``, which
        is faster for convolutions on the CPU (a batch of convolution weights
        becomes a grouped convolution there). In eval mode that path loads each
        point into one private copy of the model, made once per call, which
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

    def _evaluate(
        self, points: Tensor, chunk_size: int | None, *, accuracy: bool
    ) -> dict[str, Tensor]:
        self._check_points(points, chunk_size)
        names = ["loss", "accuracy"] if accuracy else ["loss"]
        if points.shape[0] == 0:
            return {n: points.new_empty(0) for n in names}
        stats = _point_stats(self.loss_term, accuracy)
        runner = (
            self._point_runner() if chunk_size == 1 and points.shape[0] > 1 else None
        )
        if runner is not None:
            batched = self._through_runner(runner, stats)
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
        if accuracy:  # correct counts over all samples: a fraction
            out = torch.stack([out[:, 0], out[:, 1] / self.loss_totals().n_samples], 1)
        return {n: out[:, i] for i, n in enumerate(names)}

    def _check_points(self, points: object, chunk_size: int | None) -> None:
        if (
            not isinstance(points, Tensor)
            or points.ndim != 2
            or points.shape[1] != self._dim
        ):
            raise ValueError(
                f"expected points of shape (m, {self._dim}) (one parameter vector per "
                f"row); got {shape_or_type(points)}. A single point is "
                "points.unsqueeze(0)."
            )
        check_block(points.T, self._dim, self._dtype, self._device)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None; got {chunk_size}.")

    def _through_runner(
        self, runner: nn.Module, stats: Callable[[Tensor, Tensor], Tensor]
    ) -> PointsFn:
        """``stats`` at each point, loaded one after another into ``runner``.

        BatchNorms after convolutions are folded into them per point where the
        model allows (:mod:`lossgeom.objective._fold_norm`), decided once, at
        the first point on the first batch.
        """
        targets = [p for n, p in runner.named_parameters() if n in self._trainable]
        run = FoldOnce(runner)

        def batched(P: Tensor, x: Tensor, y: Tensor) -> Tensor:
            rows = []
            for point in P:
                for t, piece in zip(
                    targets, self.unflatten(point).values(), strict=True
                ):
                    t.copy_(piece)
                rows.append(stats(run(x), y))
            return torch.stack(rows)

        return batched

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


def _point_stats(
    loss_term: LossFn, accuracy: bool
) -> Callable[[Tensor, Tensor], Tensor]:
    """``stats(outputs, targets)``: the loss term, and correct predictions, as a row."""

    def stats(out: Tensor, y: Tensor) -> Tensor:
        loss = loss_term(out, y)
        if not accuracy:
            return loss.reshape(1)
        acc = (out.argmax(-1) == y).to(loss.dtype).sum()
        # argmax of a NaN row is an index like any other: no accuracy there.
        acc = torch.where(torch.isfinite(loss), acc, torch.full_like(acc, math.nan))
        return torch.stack([loss, acc])

    return stats


def _over_points(fn: PointsFn, chunk_size: int | None) -> PointsFn:
    """``fn(theta, x, y)`` mapped over the rows of ``theta``: vmap, or a loop for 1."""
    if chunk_size == 1:
        return lambda P, x, y: torch.stack([fn(p, x, y) for p in P])
    return vmap(fn, in_dims=(0, None, None), chunk_size=chunk_size)
