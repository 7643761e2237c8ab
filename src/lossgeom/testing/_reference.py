"""Brute-force references: dense matrices by torch.func and per-sample autograd loops."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import functional_call, grad, hessian, jacrev

from lossgeom.objective import Objective

__all__ = [
    "exact_gradient",
    "exact_gradient_covariance",
    "exact_ggn",
    "exact_hessian",
    "exact_loss",
]

_MAX_DIM = 5000


def _setup(
    obj: Objective, theta: Tensor | None
) -> tuple[Tensor, Callable[[Tensor, Tensor], Tensor]]:
    if obj.dim > _MAX_DIM:
        raise ValueError(
            f"dense references are for small models (d <= {_MAX_DIM}); this one has "
            f"d = {obj.dim}."
        )
    theta = (obj.theta if theta is None else theta).detach()
    obj.loss_totals()
    named = dict(obj.model.named_parameters())
    frozen = {n: p.detach() for n, p in named.items() if n not in obj.names}
    buffers = obj.probe_buffers()
    offsets = [0]
    for n in obj.names:
        offsets.append(offsets[-1] + named[n].numel())

    def outputs(t: Tensor, x: Tensor) -> Tensor:
        params = {
            n: t[offsets[i] : offsets[i + 1]].reshape(named[n].shape)
            for i, n in enumerate(obj.names)
        }
        return functional_call(obj.model, ({**params, **frozen}, dict(buffers)), (x,))

    return theta, outputs


def _weighted_sum(
    obj: Objective, per_batch: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """The sum over batches of each batch's contribution (``obj.loss_term``)."""
    total = None
    with obj.probe_mode():
        for x, y in obj.batches():
            value = per_batch(x, y)
            total = value if total is None else total + value
    return total


def exact_loss(obj: Objective, theta: Tensor | None = None) -> float:
    """The loss over the data set by a plain loop over batches."""
    theta, outputs = _setup(obj, theta)
    with torch.no_grad():
        return float(
            _weighted_sum(obj, lambda x, y: obj.loss_term(outputs(theta, x), y))
        )


def exact_gradient(obj: Objective, theta: Tensor | None = None) -> Tensor:
    """The gradient by reverse-mode autograd, batch by batch."""
    theta, outputs = _setup(obj, theta)

    def per_batch(x: Tensor, y: Tensor) -> Tensor:
        with torch.enable_grad():
            t = theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(obj.loss_term(outputs(t, x), y), t)
        return g

    return _weighted_sum(obj, per_batch)


def exact_hessian(obj: Objective, theta: Tensor | None = None) -> Tensor:
    """The dense Hessian of the mean loss, reverse-over-reverse per batch.

    Computed as ``jacrev(grad(loss))``: the Jacobian of the gradient, row by row
    in reverse mode, a different path from the forward-over-reverse products of
    :meth:`Objective.hvp`. (``torch.func.hessian``, i.e. ``jacfwd(jacrev(.))``,
    is not used: with BatchNorm in train mode its nested ``vmap`` gives wrong
    numbers in torch 2.13, about 2% off on a small CNN.)
    """
    theta, outputs = _setup(obj, theta)
    return _weighted_sum(
        obj,
        lambda x, y: jacrev(grad(lambda t: obj.loss_term(outputs(t, x), y)))(theta),
    )


def exact_ggn(obj: Objective, theta: Tensor | None = None) -> Tensor:
    """The dense Gauss-Newton matrix ``J^T H_out J`` from explicit Jacobians."""
    theta, outputs = _setup(obj, theta)

    def per_batch(x: Tensor, y: Tensor) -> Tensor:
        out = outputs(theta, x).detach()
        J = jacrev(lambda t: outputs(t, x))(theta).reshape(out.numel(), -1)
        H_out = hessian(lambda o: obj.loss_term(o, y))(out).reshape(
            out.numel(), out.numel()
        )
        return J.T @ H_out @ J

    return _weighted_sum(obj, per_batch)


def exact_gradient_covariance(
    obj: Objective, theta: Tensor | None = None, *, centered: bool = True, ddof: int = 0
) -> Tensor:
    """The per-sample gradient covariance from a Python loop, one sample at a time.

    Sample ``i``'s gradient is ``N`` times the gradient of its contribution to
    the objective (see :meth:`Objective.per_sample_grad`).
    """
    theta, outputs = _setup(obj, theta)
    scale = float(obj.loss_totals().n_samples)
    grads = []
    with obj.probe_mode():
        for x, y in obj.batches():
            for i in range(x.shape[0]):
                with torch.enable_grad():
                    t = theta.clone().requires_grad_(True)
                    out = outputs(t, x[i : i + 1])
                    loss = obj.loss_term(out, y[i : i + 1], scale)
                    (g,) = torch.autograd.grad(loss, t, allow_unused=True)
                grads.append(torch.zeros_like(theta) if g is None else g)
    G = torch.stack(grads)
    if centered:
        G = G - G.mean(0)
    return G.T @ G / (G.shape[0] - ddof)
