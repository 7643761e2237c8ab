"""Escape experiments: a start reached by full-batch descent, and isotropic noise.

Zhu et al. (2019, "The anisotropic noise in stochastic gradient descent: its
behavior of escaping from sharp minima and regularization effects", ICML) compare
how fast SGD leaves a sharp minimum found by gradient descent with how fast the
same descent with isotropic noise of the same size does. Two options of the
training config make that experiment a study:

* ``start`` -- before step 0 the weights descend by plain full-batch gradient
  descent from their seeded initialisation, so every run of a seed starts from
  the same point whatever its batch size or noise;
* ``optim.noise: isotropic`` -- each update uses the full-batch gradient plus an
  isotropic random vector with exactly the norm of that step's minibatch noise
  (minibatch gradient minus full-batch gradient): the same total variance as
  SGD's noise, step by step, in a uniformly random direction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lossgeom.train._batches import step_generator
from lossgeom.train._config import TrainConfig

__all__ = ["descend_to_start", "isotropic_gradients"]

_NOISE_SALT = 3


def _full_batch_loss(
    model: nn.Module, loss_fn: nn.Module, data: tuple[Tensor, Tensor]
) -> Tensor:
    X, y = data
    return loss_fn(model(X), y)


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {k: b.detach().clone() for k, b in model.named_buffers()}


def _restore_buffers(model: nn.Module, saved: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for k, b in model.named_buffers():
            b.copy_(saved[k])


def descend_to_start(
    cfg: TrainConfig,
    model: nn.Module,
    loss_fn: nn.Module,
    data: tuple[Tensor, Tensor],
) -> tuple[float, float]:
    """Plain full-batch gradient descent of ``cfg.start.steps`` steps, in place.

    The model is in training mode, as in training (BatchNorm: batch statistics,
    whose running averages the descent leaves as they were at initialisation).

    Args:
        cfg: the run's config (``cfg.start`` is set).
        model: the freshly initialised model; its parameters are updated.
        loss_fn: the training loss.
        data: the whole training set.

    Returns:
        The full-batch training loss before and after the descent.

    Raises:
        FloatingPointError: the loss became non-finite (the message names the step
            and suggests a smaller ``start.lr``).
    """
    start = cfg.start
    params = [p for p in model.parameters() if p.requires_grad]
    saved = _buffers(model)
    model.train()
    first = math.nan
    for step in range(start.steps + 1):
        loss = _full_batch_loss(model, loss_fn, data)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the start's full-batch descent reached a loss of {value} after "
                f"{step} of {start.steps} steps at start.lr {start.lr:g}; use a "
                "smaller start.lr"
            )
        if step == 0:
            first = value
        if step == start.steps:
            break
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.sub_(g, alpha=start.lr)
    _restore_buffers(model, saved)
    return first, value


def isotropic_gradients(
    cfg: TrainConfig,
    model: nn.Module,
    loss_fn: nn.Module,
    data: tuple[Tensor, Tensor],
    step: int,
) -> float:
    """Replace the minibatch gradients in ``.grad`` by full gradient + isotropic noise.

    With ``g_B`` the minibatch gradient (already in the parameters' ``.grad``) and
    ``g`` the full-batch gradient, the update direction becomes
    ``g + ||g_B - g|| u`` with ``u`` uniform on the unit sphere of all trainable
    parameters, drawn from a generator seeded by ``(seed, step)`` so a resumed run
    draws the same. Running statistics of BatchNorm are left as the minibatch
    pass set them.

    Returns:
        The noise norm ``||g_B - g||``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    saved = _buffers(model)
    full = torch.autograd.grad(
        _full_batch_loss(model, loss_fn, data), params, allow_unused=True
    )
    _restore_buffers(model, saved)
    full = [
        torch.zeros_like(p) if g is None else g
        for p, g in zip(params, full, strict=True)
    ]
    batch = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    noise_sq = sum(
        float(((b - g) ** 2).sum()) for b, g in zip(batch, full, strict=True)
    )
    gen = step_generator(cfg.seed, step, _NOISE_SALT)
    draws = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    draw_norm = math.sqrt(sum(float((u**2).sum()) for u in draws))
    scale = math.sqrt(noise_sq) / draw_norm if draw_norm > 0 else 0.0
    with torch.no_grad():
        for p, g, u in zip(params, full, draws, strict=True):
            p.grad = g + scale * u.to(p.device)
    return math.sqrt(noise_sq)
