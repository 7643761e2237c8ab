"""Shared pieces of the SGD-SDE modules: input checks, batched losses, minima.

A :class:`BatchedLoss` maps a batch of parameter vectors ``(chains, d)`` to their
losses ``(chains,)``; every simulation takes one (:func:`batched_loss` wraps a
model or an :class:`~lossgeom.Objective`). Gradients come from autograd on the
sum over chains, which is the gradient of each chain's loss since chains are
independent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.func import vmap

from lossgeom.objective import Objective

__all__ = [
    "BatchedLoss",
    "ObjectiveLoss",
    "batched_loss",
    "check_count",
    "check_point",
    "check_positive",
    "generator",
    "gradient_at",
    "hessian_at",
    "loss_and_grad",
    "loss_values",
    "refine_minimum",
    "start_states",
    "symmetric_sqrt",
]


class BatchedLoss(Protocol):
    """A loss on a batch of parameter vectors: ``(chains, d) -> (chains,)``.

    It must be differentiable with autograd; row ``c`` of the output may depend
    on row ``c`` of the input only (chains are independent).
    """

    def __call__(self, theta: Tensor) -> Tensor: ...  # noqa: D102


# --------------------------------------------------------------------- checks
def check_positive(name: str, value: object, fix: str = "") -> float:
    """``value`` as a positive finite float, or a ``ValueError`` naming ``name``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(
            f"{name} must be a positive finite number; got {value!r}."
            + (f" {fix}" if fix else "")
        )
    return float(value)


def check_count(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an integer ``>= minimum``, or a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return value


def check_point(name: str, value: object, dim: int | None = None) -> Tensor:
    """A floating 1-D tensor (of length ``dim`` when given), detached."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor of shape (d,); got "
            f"{type(value).__name__}"
            + (f" of dtype {value.dtype}" if isinstance(value, Tensor) else "")
            + "."
        )
    if value.ndim != 1 or (dim is not None and value.shape[0] != dim):
        want = "(d,)" if dim is None else f"({dim},)"
        raise ValueError(
            f"{name} must have shape {want}; got shape {tuple(value.shape)}."
        )
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite; got {value.tolist()}.")
    return value.detach()


def start_states(theta0: object, chains: int | None) -> Tensor:
    """``theta0`` of shape ``(d,)`` repeated ``chains`` times, or ``(chains, d)``."""
    if not isinstance(theta0, Tensor) or not theta0.is_floating_point():
        raise TypeError(
            "theta0 must be a floating-point tensor of shape (d,) or (chains, d); "
            f"got {type(theta0).__name__}."
        )
    if chains is not None:
        check_count("chains", chains)
    if theta0.ndim == 1:
        return theta0.detach().expand(chains or 1, -1).clone()
    if theta0.ndim != 2 or theta0.shape[0] == 0 or theta0.shape[1] == 0:
        raise ValueError(
            "theta0 must have shape (d,) or (chains, d); got shape "
            f"{tuple(theta0.shape)}."
        )
    if chains is not None and chains != theta0.shape[0]:
        raise ValueError(
            f"theta0 holds {theta0.shape[0]} chains but chains={chains}; pass "
            "theta0 of shape (d,) to start every chain at one point, or leave "
            "chains=None."
        )
    if not bool(torch.isfinite(theta0).all()):
        raise ValueError("theta0 must be finite.")
    return theta0.detach().clone()


def generator(seed: object, device: torch.device) -> torch.Generator:
    """A seeded generator on ``device``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer; got {seed!r}.")
    return torch.Generator(device=device).manual_seed(seed)


def loss_and_grad(loss: BatchedLoss, theta: Tensor) -> tuple[Tensor, Tensor]:
    """``loss(theta)`` and its gradient per chain (autograd on the sum)."""
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        value = loss(t)
        if not isinstance(value, Tensor) or value.shape != theta.shape[:1]:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value)
            raise ValueError(
                f"loss must map parameters of shape (chains, d) = "
                f"{tuple(theta.shape)} to losses of shape ({theta.shape[0]},); got "
                f"{got}. Wrap a model with lossgeom.theory.batched_loss."
            )
        (g,) = torch.autograd.grad(value.sum(), t, allow_unused=True)
    g = torch.zeros_like(theta) if g is None else g
    return value.detach(), g


def loss_values(loss: BatchedLoss, theta: Tensor, chunk: int = 65536) -> Tensor:
    """``loss`` at many points without gradients, ``chunk`` points at a time."""
    with torch.no_grad():
        parts = [loss(theta[i : i + chunk]) for i in range(0, theta.shape[0], chunk)]
    return torch.cat(parts) if parts else theta.new_empty(0)


def point_loss(loss: BatchedLoss) -> Callable[[Tensor], Tensor]:
    """The scalar loss at one point ``(d,)``."""
    return lambda w: loss(w.unsqueeze(0))[0]


def hessian_at(loss: BatchedLoss, point: Tensor) -> Tensor:
    """The Hessian ``(d, d)`` of a batched loss at one point (autograd, symmetrized).

    Example:
        >>> quad = lambda w: (w**2 * torch.tensor([1.0, 3.0], dtype=w.dtype)).sum(1)
        >>> hessian_at(quad, torch.zeros(2, dtype=torch.float64)).tolist()
        [[2.0, 0.0], [0.0, 6.0]]
    """
    point = check_point("point", point)
    with torch.enable_grad():
        H = torch.autograd.functional.hessian(point_loss(loss), point)
    return (H + H.T) / 2


def gradient_at(loss: BatchedLoss, point: Tensor) -> Tensor:
    """The gradient ``(d,)`` of a batched loss at one point."""
    return loss_and_grad(loss, point.unsqueeze(0))[1][0]


def refine_minimum(
    loss: BatchedLoss, point: Tensor, name: str, *, max_iter: int = 50
) -> tuple[Tensor, Tensor]:
    """Damped Newton's method from ``point`` to a nearby minimum.

    Each step is halved until the loss does not rise. Returns the minimum and
    the Hessian there; raises a ``ValueError`` naming ``name`` when a Hessian on
    the way is not positive definite or the gradient does not vanish.
    """
    f = point_loss(loss)
    w = point.detach().clone()
    eps = torch.finfo(w.dtype).eps
    for _ in range(max_iter):
        g, H = gradient_at(loss, w), hessian_at(loss, w)
        evals = torch.linalg.eigvalsh(H)
        scale = float(evals.abs().max()) or 1.0
        if float(evals.min()) <= 0:
            raise ValueError(
                f"{name} = {point.tolist()} is not near a minimum of the loss: the "
                f"Hessian at {w.tolist()} has eigenvalues {evals.tolist()} (a "
                "minimum needs all positive). Pass the location of a minimum (of a "
                "second basin, for an escape target)."
            )
        if float(g.norm()) <= 100 * eps * scale * max(1.0, float(w.norm())):
            return w, H
        step = torch.linalg.solve(H, g)
        with torch.no_grad():
            here = float(f(w))
            for _ in range(30):
                if float(f(w - step)) <= here + 1e-12 * max(1.0, abs(here)):
                    break
                step = step / 2
        w = w - step
    g, H = gradient_at(loss, w), hessian_at(loss, w)
    evals = torch.linalg.eigvalsh(H)
    scale = float(evals.abs().max()) or 1.0
    small = float(g.norm()) <= math.sqrt(eps) * scale * max(1.0, float(w.norm()))
    if small and float(evals.min()) > 0:  # at the floor of rounding
        return w, H
    raise ValueError(
        f"{name} = {point.tolist()} is not near a minimum of the loss: Newton's "
        f"method ended at {w.tolist()} with gradient norm {float(g.norm()):.3g} "
        f"after {max_iter} steps. Pass the location of a minimum (of a second "
        "basin, for an escape target)."
    )


def symmetric_sqrt(S: Tensor, name: str) -> Tensor:
    """The PSD square root of symmetric matrices ``(..., d, d)`` (eigh, clipped)."""
    if not torch.allclose(S, S.mT, rtol=1e-6, atol=1e-12 * float(S.abs().max())):
        raise ValueError(f"{name} must be symmetric.")
    evals, vecs = torch.linalg.eigh((S + S.mT) / 2)
    top = evals.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(S.dtype).tiny)
    if bool((evals < -1e-8 * top).any()):
        raise ValueError(
            f"{name} must be positive semi-definite; it has eigenvalue "
            f"{float(evals.min()):.3g}."
        )
    return (vecs * evals.clamp_min(0).sqrt().unsqueeze(-2)) @ vecs.mT


# --------------------------------------------------------------- loss wrapper
class ObjectiveLoss:
    """An :class:`~lossgeom.Objective` as a :class:`BatchedLoss`.

    ``loss(points)`` is the objective's loss over its whole data set at every row
    of ``points`` (``vmap`` over the points, ``chunk_size`` at a time), in the
    objective's mode; differentiable.

    Attributes:
        objective: the objective.
        dim: the number of parameters.
    """

    def __init__(self, objective: Objective, chunk_size: int | None = None):
        if objective.mode != "eval":
            raise ValueError(
                "batched_loss needs an Objective in mode='eval' (BatchNorm in train "
                "mode mixes the samples of a batch); build it with mode='eval'."
            )
        if objective.data_parallel:
            raise ValueError(
                "batched_loss evaluates on one process; build the Objective with "
                "data_parallel=False."
            )
        self.objective = objective
        self.dim = objective.dim
        self.chunk_size = chunk_size
        self._batches = list(objective.batches())
        objective.loss_totals()  # computed once, outside the vmap

    def __call__(self, points: Tensor) -> Tensor:
        obj = self.objective
        total = None
        with obj.probe_mode(higher_order=False):
            for x, y in self._batches:
                fn = vmap(
                    lambda t, x=x, y=y: obj.batch_term(t, x, y),
                    chunk_size=self.chunk_size,
                )
                part = fn(points)
                total = part if total is None else total + part
        assert total is not None  # an Objective has at least one batch
        return total


def batched_loss(source: Any, *, chunk_size: int | None = None) -> ObjectiveLoss:
    """A model's loss over its data as a function of many parameter vectors.

    Args:
        source: an :class:`~lossgeom.Objective`, or ``(model, loss_fn, data)``
            (e.g. ``lg.zoo.surface("double_well")``), made into one.
        chunk_size: points per vectorized call (``None``: all at once).

    Returns:
        A :class:`BatchedLoss` ``(chains, d) -> (chains,)``.

    Example:
        >>> import lossgeom as lg
        >>> loss = batched_loss(lg.zoo.surface("double_well"))
        >>> loss(torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)).tolist()
        [0.0, 1.0]
    """
    if isinstance(source, Objective):
        return ObjectiveLoss(source, chunk_size)
    if isinstance(source, tuple) and len(source) == 3:
        return ObjectiveLoss(Objective(*source), chunk_size)
    raise TypeError(
        "batched_loss expects a lossgeom Objective or a (model, loss_fn, data) "
        f"tuple such as lg.zoo.surface('double_well'); got {type(source).__name__}."
    )
