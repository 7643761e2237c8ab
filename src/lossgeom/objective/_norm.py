"""BatchNorm running statistics of an Objective: recompute them, evaluate with them.

A point between two networks (on a path or a curve) needs its own BatchNorm
statistics before it is evaluated in eval mode: the end points' statistics do
not describe it. :meth:`NormStatisticsMixin.norm_statistics` recomputes them in
one pass over the data; :meth:`NormStatisticsMixin.using_buffers` evaluates with
them, leaving the model's own buffers alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Self

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from lossgeom.objective._core import ObjectiveCore

__all__ = ["NormStatisticsMixin"]


class NormStatisticsMixin(ObjectiveCore):
    """Recompute BatchNorm statistics and evaluate with substituted buffers."""

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
        stats = _fresh_statistics(self.model)
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        buffers.update(stats)  # updated in place by the train-mode forward passes
        params = self.unflatten(theta)
        params.update((n, p.detach()) for n, p in self._frozen)
        self._gather_statistics(params, buffers)
        self.counters.passes += 1
        if self.data_parallel:
            world = float(self.world_size)
            for n, t in stats.items():
                if t.is_floating_point():
                    stats[n] = self.all_reduce(t.clone()) / world
        return stats

    def _gather_statistics(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor]
    ) -> None:
        """One train-mode pass with cumulative averaging into ``buffers``.

        The model's momenta and train/eval flags are restored afterwards.
        """
        norms = [m for m in self.model.modules() if isinstance(m, _BatchNorm)]
        momenta = [m.momentum for m in norms]
        flags = [(m, m.training) for m in self.model.modules()]
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

    @contextmanager
    def using_buffers(self, buffers: dict[str, Tensor]) -> Iterator[Self]:
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


def _fresh_statistics(model: nn.Module) -> dict[str, Tensor]:
    """Zero means, unit variances and zero counts for every tracked BatchNorm."""
    stats: dict[str, Tensor] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            name = f"{prefix}." if prefix else ""
            if module.running_mean is not None:
                stats[name + "running_mean"] = torch.zeros_like(module.running_mean)
                stats[name + "running_var"] = torch.ones_like(module.running_var)
            if module.num_batches_tracked is not None:
                stats[name + "num_batches_tracked"] = torch.zeros_like(
                    module.num_batches_tracked
                )
    return stats
