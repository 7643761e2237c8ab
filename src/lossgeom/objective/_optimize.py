"""A small optimiser loop on one flat tensor, shared by the probes that train.

Mode-connecting curves (:func:`lossgeom.connect`) train their control points and
intrinsic dimension (:func:`lossgeom.intrinsic_dimension`) trains subspace
coordinates; both minimise a stochastic loss of one tensor with Adam. The full
training loop (:func:`lossgeom.train`) is a different thing: it trains a model
with any ``torch.optim`` optimizer, callbacks and checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["MinimizeLog", "minimize"]


@dataclass
class MinimizeLog:
    """What :func:`minimize` did.

    Attributes:
        steps: the step at the end of each logging window.
        losses: the mean loss over each window.
        last_loss: the loss of the last step taken (detached).
        steps_taken: steps done (fewer than asked when a window's loss was not
            finite and ``stop_on_nonfinite`` was set).
    """

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    last_loss: Tensor | None = None
    steps_taken: int = 0

    @property
    def finite(self) -> bool:
        """Whether every logged window had a finite mean loss."""
        return all(math.isfinite(x) for x in self.losses)

    def window(self, i: int = -1) -> tuple[int, int]:
        """First and last step of logging window ``i``."""
        end = self.steps[i]
        start = self.steps[i - 1] + 1 if (i % len(self.steps)) > 0 else 1
        return start, end


def minimize(
    z: Tensor,
    loss_of: Callable[[int, Tensor], Tensor],
    *,
    steps: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    log_every: int | None = None,
    reduce_grad: Callable[[Tensor], Tensor] | None = None,
    stop_on_nonfinite: bool = True,
) -> MinimizeLog:
    """Minimise ``loss_of(step, z)`` over ``z``, in place, with Adam.

    The update of ``torch.optim.Adam`` with its defaults (Kingma and Ba 2015:
    bias-corrected moments, ``eps`` added to ``sqrt(v_hat)``), written out for one
    tensor: it spares the optimizer's per-step overhead, which dominates on the
    small problems this loop serves.

    Args:
        z: the tensor to train (a leaf; changed in place).
        loss_of: ``loss_of(step, z)`` with ``step`` from 1: the (stochastic) loss
            to minimise at this step; it draws its own minibatch.
        steps: Adam steps.
        lr: step size.
        betas: Adam's decay rates of the first and second moments.
        eps: added to ``sqrt(v_hat)`` in Adam's denominator.
        log_every: steps per logging window (default ``max(1, steps // 100)``);
            the mean loss of each window is logged.
        reduce_grad: applied to each gradient before the update (e.g. an average
            over data-parallel ranks).
        stop_on_nonfinite: stop at the end of the first window whose mean loss
            is not finite.

    Returns:
        A :class:`MinimizeLog`.

    Example:
        >>> z = torch.tensor([3.0, -2.0], dtype=torch.float64)
        >>> log = minimize(z, lambda step, z: (z**2).sum(), steps=300, lr=0.1)
        >>> bool(z.abs().max() < 1e-2), log.steps[-1], log.finite
        (True, 300, True)
    """
    b1, b2 = betas
    log_every = log_every or max(1, steps // 100)
    m, v = torch.zeros_like(z), torch.zeros_like(z)
    log = MinimizeLog()
    running = z.new_zeros((), dtype=torch.float64)
    count = 0
    with torch.enable_grad():
        for t in range(1, steps + 1):
            z.requires_grad_(True)
            loss = loss_of(t, z)
            (g,) = torch.autograd.grad(loss, z)
            z.requires_grad_(False)
            if reduce_grad is not None:
                g = reduce_grad(g)
            with torch.no_grad():
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
                z.addcdiv_(m, denom, value=-lr / (1 - b1**t))
            log.last_loss = loss.detach()
            running += log.last_loss.double()
            count += 1
            log.steps_taken = t
            if t % log_every == 0 or t == steps:
                log.steps.append(t)
                log.losses.append(float(running) / count)
                running.zero_()
                count = 0
                if stop_on_nonfinite and not math.isfinite(log.losses[-1]):
                    break
    return log
