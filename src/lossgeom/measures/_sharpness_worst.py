"""The worst case over a neighbourhood: Auto-PGD ascent and SAM's first-order step.

Kinds ``"worst"`` and ``"keskar"`` (:func:`_worst`, Auto-PGD of Croce & Hein
2020) and ``"sam"`` (:func:`_sam`, Foret et al. 2021) of
:func:`~lossgeom.measures.sharpness`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lossgeom.measures._sharpness_base import _Outcome
from lossgeom.objective import Objective

__all__ = ["_sam", "_worst"]

# Auto-PGD constants (Croce & Hein 2020): momentum, the fraction of increasing
# steps below which the step size is halved, checkpoint spacing (fractions of N).
_MOMENTUM = 0.75
_RHO = 0.75
_FIRST_CHECK, _CHECK_DECREASE, _MIN_CHECK = 0.22, 0.03, 0.06


def _project(norm: str, radius: float) -> Callable[[Tensor], Tensor]:
    if norm == "l2":

        def project(z: Tensor) -> Tensor:
            n = float(z.norm())
            return z * (radius / n) if n > radius else z

        return project
    return lambda z: z.clamp(-radius, radius)


def _ascent_direction(norm: str, g: Tensor) -> Tensor:
    if norm == "linf":
        return g.sign()
    n = g.norm()
    return g / n if float(n) > 0 else torch.zeros_like(g)


def _random_start(
    norm: str, radius: float, d: int, gen: torch.Generator, like: Tensor
) -> Tensor:
    if norm == "linf":
        z = (2 * torch.rand(d, generator=gen, dtype=torch.float64) - 1) * radius
    else:
        z = torch.randn(d, generator=gen, dtype=torch.float64)
        z = z * (0.5 * radius / z.norm().clamp_min(1e-300))
    return z.to(device=like.device, dtype=like.dtype)


def _worst(
    obj: Objective,
    theta: Tensor,
    scale: Tensor | None,
    radius: float,
    norm: str,
    steps: int,
    restarts: int,
    seed: int,
) -> _Outcome:
    """Auto-PGD ascent of ``f(z) = L(theta + T z)`` over ``||z||_norm <= radius``."""
    project = _project(norm, radius)

    def point(z: Tensor) -> Tensor:
        return theta + (z if scale is None else scale * z)

    def f_and_g(z: Tensor) -> tuple[float, Tensor]:
        f, g = obj.loss_and_grad(point(z))
        return f, (g if scale is None else scale * g)

    base, g0 = obj.loss_and_grad(theta)
    gz0 = g0 if scale is None else scale * g0
    gen = torch.Generator().manual_seed(int(seed))
    best_f, best_z = base, torch.zeros_like(theta)
    per_restart, halvings, starts = [], [], []
    for r in range(restarts):
        if r == 0 and float(gz0.abs().max()) > 0:
            z0, start = radius * _ascent_direction(norm, gz0), "first-order"
        else:
            z0, start = _random_start(norm, radius, theta.numel(), gen, theta), "random"
        f_r, z_r, n_halved = _apgd(
            f_and_g, lambda z: obj.loss(point(z)), z0, project, norm, radius, steps
        )
        per_restart.append(f_r - base)
        halvings.append(n_halved)
        starts.append(start)
        if f_r > best_f:
            best_f, best_z = f_r, z_r
    delta = best_z if scale is None else scale * best_z
    details = {
        "base_loss": base,
        "max_loss": best_f,
        "per_restart": per_restart,
        "best_restart": int(max(range(restarts), key=per_restart.__getitem__)),
        "starts": starts,
        "halvings": halvings,
        "steps": steps,
        "restarts": restarts,
        "delta_l2": float(delta.norm()),
        "delta_linf": float(delta.abs().max()),
        "z_norm": float(best_z.norm() if norm == "l2" else best_z.abs().max()),
    }
    return _Outcome(best_f - base, None, details, delta)


def _apgd(
    f_and_g: Callable[[Tensor], tuple[float, Tensor]],
    f_only: Callable[[Tensor], float],
    z: Tensor,
    project: Callable[[Tensor], Tensor],
    norm: str,
    radius: float,
    steps: int,
) -> tuple[float, Tensor, int]:
    """One Auto-PGD run of ``steps`` moves; returns the best value, point, halvings."""
    z = project(z)
    f, g = f_and_g(z)
    best_f, best_z, best_g = f, z, g
    z_prev = z
    step = 2.0 * radius
    interval = max(int(_FIRST_CHECK * steps), 1)
    decrease = max(int(_CHECK_DECREASE * steps), 1)
    min_interval = max(int(_MIN_CHECK * steps), 1)
    since_check, increases, halved = 0, 0, 0
    halved_last_check, best_at_last_check = False, best_f
    for k in range(steps):
        u = project(z + step * _ascent_direction(norm, g))
        a = 1.0 if k == 0 else _MOMENTUM
        z_prev, z = z, project(z + a * (u - z) + (1 - a) * (z - z_prev))
        if k == steps - 1:
            f_new, g = f_only(z), g
        else:
            f_new, g = f_and_g(z)
        increases += f_new > f
        f = f_new
        if f > best_f:
            best_f, best_z, best_g = f, z, g
        since_check += 1
        if since_check == interval and k < steps - 1:
            stalled = increases <= _RHO * interval
            flat = not halved_last_check and best_f <= best_at_last_check
            halved_last_check = stalled or flat
            best_at_last_check = best_f
            if halved_last_check:
                step /= 2
                halved += 1
                z, z_prev, f, g = best_z, best_z, best_f, best_g
            since_check, increases = 0, 0
            interval = max(interval - decrease, min_interval)
    return best_f, best_z, halved


def _sam(
    obj: Objective, theta: Tensor, scale: Tensor | None, rho: float, norm: str
) -> _Outcome:
    base, g = obj.loss_and_grad(theta)
    gz = g if scale is None else scale * g
    z = rho * _ascent_direction(norm, gz)
    delta = z if scale is None else scale * z
    loss = obj.loss(theta + delta)
    dual = gz.norm() if norm == "l2" else gz.abs().sum()
    details = {
        "base_loss": base,
        "perturbed_loss": loss,
        "first_order": rho * float(dual),
        "grad_norm": float(g.norm()),
        "delta_l2": float(delta.norm()),
    }
    return _Outcome(loss - base, None, details, delta)
