"""Training a curve's control points: minibatches, curve parameters, the loss.

The training loop itself is :func:`~lossgeom.objective.minimize`; this module
feeds it (:func:`_train_curve`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Generator, Iterator
from contextlib import closing

import torch
from torch import Tensor

from lossgeom.geometry._curve_basis import curve_weights
from lossgeom.linalg._operator import NonFiniteError
from lossgeom.objective import MinimizeLog, Objective, minimize

__all__ = [
    "_curve_loss",
    "_initial_bends",
    "_minibatches",
    "_objective_in_mode",
    "_train_curve",
]


def _initial_bends(
    a: Tensor, b: Tensor, bends: int, noise: float, gen: torch.Generator
) -> Tensor:
    """Trainable points on the line, ``a + k/(bends+1) (b - a)``, plus seeded noise.

    For both kinds this makes the initial curve the straight line ``(1-t) a + t b``
    (for Bezier curves by the degree-elevation identity ``sum_k k/n B_k(t) = t``).
    """
    frac = torch.arange(1, bends + 1, dtype=a.dtype, device=a.device) / (bends + 1)
    free = a + frac[:, None] * (b - a)
    if noise > 0:
        scale = noise * float((b - a).norm()) / math.sqrt(a.numel())
        free += scale * torch.randn(
            free.shape, generator=gen, device=a.device, dtype=a.dtype
        )
    return free


def _curve_loss(
    obj: Objective,
    kind: str,
    a: Tensor,
    b: Tensor,
    free: Tensor,
    ts: Tensor,
    x: Tensor,
    y: Tensor,
    criterion: str,
) -> Tensor:
    """The training loss of one step: mean or max over ``ts`` of the batch loss."""
    W = curve_weights(kind, ts, free.shape[0] + 2)
    losses = []
    for w in W:
        theta = w[0] * a + w[-1] * b + w[1:-1] @ free
        losses.append(obj.batch_loss(theta, x, y))
    stacked = torch.stack(losses)
    return stacked.max() if criterion == "minimax" else stacked.mean()


def _draw_t(k: int, criterion: str, gen: torch.Generator, obj: Objective) -> Tensor:
    u = torch.rand(k, generator=gen, device=obj.device, dtype=obj.dtype)
    if criterion == "minimax":  # stratified: one t in each of k equal intervals
        u = (torch.arange(k, device=obj.device, dtype=obj.dtype) + u) / k
    return u


def _minibatches(
    obj: Objective, batch_size: int | None, gen: torch.Generator
) -> Generator[tuple[Tensor, Tensor], None, None]:
    """Shuffled minibatches, cycling over the objective's batches forever."""
    while True:
        yielded = False
        for x, y in obj.batches():
            n = int(x.shape[0])
            size = n if batch_size is None else min(batch_size, n)
            order = torch.randperm(n, generator=gen, device=gen.device).to(x.device)
            for lo in range(0, n, size):
                idx = order[lo : lo + size]
                if idx.numel() < size and lo > 0:
                    break  # drop a short remainder
                yielded = True
                yield x[idx], y[idx]
        if not yielded:
            raise ValueError("the objective's data yielded no batches to train on.")


class _Batches:
    """A re-iterable view of an objective's batches (for a sibling objective)."""

    def __init__(self, obj: Objective):
        self.obj = obj

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.obj.batches()


def _objective_in_mode(obj: Objective, mode: str) -> Objective:
    """``obj`` itself, or an objective on the same model and data in ``mode``."""
    if mode == obj.mode:
        return obj
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # obj already warned about its model
        return Objective(
            obj.model,
            obj.loss_fn,
            _Batches(obj),
            mode=mode,
            data_parallel=obj.data_parallel,
        )


def _train_curve(
    obj: Objective,
    train_obj: Objective,
    kind: str,
    a: Tensor,
    b: Tensor,
    free: Tensor,
    gen: torch.Generator,
    *,
    steps: int,
    lr: float,
    batch_size: int | None,
    criterion: str,
    t_samples: int,
    log_every: int,
) -> MinimizeLog:
    """Train the bend points ``free`` in place with Adam; the training log.

    Minibatches come from ``obj``'s data; the loss is taken on ``train_obj`` (the
    same model and data, perhaps in another mode). Gradients are averaged over
    ranks when ``obj`` is data parallel.

    Raises:
        NonFiniteError: the training loss became non-finite.
    """
    batches = _minibatches(obj, batch_size, gen)

    def curve_loss(_step: int, f: Tensor) -> Tensor:
        x, y = next(batches)
        ts = _draw_t(t_samples, criterion, gen, obj)
        return _curve_loss(train_obj, kind, a, b, f, ts, x, y, criterion)

    def average_over_ranks(g: Tensor) -> Tensor:
        return obj.all_reduce(g) / obj.world_size

    with train_obj.probe_mode(higher_order=False), closing(batches):
        log = minimize(
            free,
            curve_loss,
            steps=steps,
            lr=lr,
            log_every=log_every,
            reduce_grad=average_over_ranks if obj.data_parallel else None,
        )
    if not log.finite:
        first, last = log.window()
        raise NonFiniteError(
            f"the training loss of the curve became non-finite between steps "
            f"{first} and {last}. Lower lr (got {lr}) or check the ends for "
            "non-finite values."
        )
    return log
