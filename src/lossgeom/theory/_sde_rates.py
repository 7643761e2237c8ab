r"""Escape rates: the Eyring-Kramers law and simulated first passages.

**Eyring-Kramers.** For :math:`d\theta = -\nabla L\,dt + \sqrt{2T}\,dW`, a minimum
:math:`m` with Hessian :math:`H_m` and the index-one saddle :math:`s` (Hessian
:math:`H_s`, one negative eigenvalue :math:`\lambda_-`) that separates it from
another basin, with barrier :math:`\Delta L = L(s) - L(m)`, the rate of
transitions out of the basin of :math:`m` is, as :math:`T \to 0`,

.. math::
    k = \frac{|\lambda_-|}{2\pi}\sqrt{\frac{\det H_m}{|\det H_s|}}\,
        e^{-\Delta L/T}

(Kramers 1940, "Brownian motion in a field of force and the diffusion model of
chemical reactions", Physica 7; Berglund 2013, "Kramers' law: validity,
derivations and generalisations", Markov Process. Related Fields 19). Bovier,
Gayrard & Klein (2004, "Metastability in reversible diffusion processes I",
JEMS) prove :math:`E\,\tau = k^{-1}(1 + O(\sqrt{T}\,|\log T|))` for the time
:math:`\tau` to reach a small ball around the other minimum, the target region
of :func:`escape_rate`. The law holds for :math:`\Delta L/T` large (about 5 or
more).

**Simulated rate.** Chains start at the minimum and run Euler-Maruyama until they
enter the target region (the first passage, so recrossings of the saddle before
committing are not counted) or until ``max_time`` (censored). For exponential
first-passage times with censoring the maximum-likelihood rate is
:math:`\hat k = n / E` (:math:`n` passages, :math:`E` the total observed time,
censored chains contributing ``max_time``); the interval is the exact Poisson
(Garwood 1936) interval for :math:`n` over exposure :math:`E`:
:math:`[\chi^2_{2n}(\alpha/2)/(2E),\ \chi^2_{2n+2}(1-\alpha/2)/(2E)]`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from scipy import stats
from torch import Tensor

from lossgeom._results import Cost, Result
from lossgeom.objective import NonFiniteError
from lossgeom.theory._sde_base import (
    BatchedLoss,
    check_count,
    check_point,
    check_positive,
    generator,
    loss_and_grad,
    loss_values,
    refine_minimum,
)

__all__ = ["EscapeRate", "KramersRate", "escape_rate", "kramers_rate"]

KRAMERS_DEFINITION = (
    "Eyring-Kramers rate k = |lambda_-(H_s)| / (2 pi) sqrt(det H_min / |det H_s|) "
    "exp(-barrier / T) for d theta = -grad L dt + sqrt(2T) dW (Kramers 1940; "
    "Berglund 2013; Bovier, Gayrard & Klein 2004)"
)
ESCAPE_DEFINITION = (
    "first-passage rate from start into the target region under Euler-Maruyama "
    "for d theta = -grad L dt + sqrt(2T) dW: maximum-likelihood rate of "
    "exponential times censored at max_time, n / E (n passages, E total observed "
    "time); exact Poisson (Garwood 1936) interval for n over exposure E"
)


@dataclass(frozen=True)
class KramersRate(Result):
    r"""The Eyring-Kramers rate and its parts.

    Attributes:
        value: the rate :math:`k` (per unit time).
        prefactor: :math:`\frac{|\lambda_-|}{2\pi}\sqrt{\det H_m/|\det H_s|}`.
        saddle_eigenvalue: :math:`\lambda_-`, the negative eigenvalue of
            :math:`H_s`.
        barrier: :math:`\Delta L`.
        temperature: :math:`T`.
        mean_time: :math:`1/k`.
        definition: the formula, with citations.
        parameters: the inputs.
    """

    value: float
    prefactor: float
    saddle_eigenvalue: float
    barrier: float
    temperature: float
    mean_time: float


@dataclass(frozen=True)
class EscapeRate(Result):
    """A simulated escape rate with its exact Poisson interval.

    Attributes:
        value: the maximum-likelihood rate ``events / exposure``.
        stderr: ``sqrt(events) / exposure``.
        ci_low: the lower end of the ``confidence`` interval (0 without events).
        ci_high: the upper end.
        confidence: the interval's level.
        events: chains that reached the target by ``max_time``.
        exposure: total observed time (passage times, and ``max_time`` for each
            censored chain).
        chains: chains run.
        max_time: the censoring time.
        first_passage_times: per chain, the time of entering the target, ``inf``
            when censored (left out of :meth:`to_dict`).
        start: the start (the refined minimum).
        definition: the estimator, in words.
        parameters: the settings.
        details: diagnostics (``mean_observed_time`` of the passages,
            ``censored`` chains, ``start_loss``).
        cost: gradients (chain-steps) and seconds.
    """

    value: float
    stderr: float
    ci_low: float
    ci_high: float
    confidence: float
    events: int
    exposure: float
    chains: int
    max_time: float
    first_passage_times: Tensor
    start: Tensor
    bulky: ClassVar[tuple[str, ...]] = ("first_passage_times",)


def _square(name: str, H: object, d: int | None = None) -> Tensor:
    if not isinstance(H, Tensor) or not H.is_floating_point():
        raise TypeError(
            f"{name} must be a floating tensor of shape (d, d); got {type(H).__name__}."
        )
    if H.ndim != 2 or H.shape[0] != H.shape[1] or (d is not None and H.shape[0] != d):
        want = "(d, d)" if d is None else f"({d}, {d}) like hessian_min"
        raise ValueError(f"{name} must have shape {want}; got {tuple(H.shape)}.")
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"{name} must be finite.")
    H = H.detach().double().cpu()
    if not torch.allclose(H, H.T, rtol=1e-8, atol=1e-10 * float(H.abs().max())):
        raise ValueError(f"{name} must be symmetric.")
    return (H + H.T) / 2


def kramers_rate(
    barrier: float,
    hessian_min: Tensor,
    hessian_saddle: Tensor,
    temperature: float,
) -> KramersRate:
    r"""The Eyring-Kramers escape rate of overdamped Langevin dynamics.

    :math:`k = \frac{|\lambda_-|}{2\pi}\sqrt{\det H_m/|\det H_s|}\,e^{-\Delta L/T}`
    (module docstring), for the SDE :math:`d\theta = -\nabla L\,dt +
    \sqrt{2T}\,dW`; valid for :math:`\Delta L/T \gtrsim 5`.

    Args:
        barrier: :math:`\Delta L = L(\text{saddle}) - L(\text{minimum}) > 0`.
        hessian_min: :math:`H_m`, positive definite, ``(d, d)``.
        hessian_saddle: :math:`H_s`, exactly one negative eigenvalue, ``(d, d)``.
        temperature: :math:`T > 0`.

    Returns:
        A :class:`KramersRate`.

    Example:
        The double well: :math:`H_m = \mathrm{diag}(8, 1)`,
        :math:`H_s = \mathrm{diag}(-4, 1)`, barrier 1.

        >>> k = kramers_rate(1.0, torch.diag(torch.tensor([8.0, 1.0])),
        ...                  torch.diag(torch.tensor([-4.0, 1.0])), 0.2)
        >>> round(k.value, 6), round(k.prefactor, 6)
        (0.006066, 0.900316)
    """
    dL = check_positive("barrier", barrier, "The saddle must lie above the minimum.")
    T = check_positive("temperature", temperature, "Use T > 0.")
    Hm = _square("hessian_min", hessian_min)
    Hs = _square("hessian_saddle", hessian_saddle, Hm.shape[0])
    em = torch.linalg.eigvalsh(Hm)
    if float(em.min()) <= 0:
        raise ValueError(
            f"hessian_min must be positive definite (a minimum); its eigenvalues "
            f"are {em.tolist()}."
        )
    es = torch.linalg.eigvalsh(Hs)
    scale = float(es.abs().max())
    n_neg = int((es < 0).sum())
    if n_neg != 1 or float(es.abs().min()) <= 1e-12 * scale:
        raise ValueError(
            f"hessian_saddle must have exactly one negative eigenvalue and no zero "
            f"one (an index-one saddle between two basins); its eigenvalues are "
            f"{es.tolist()}. Without a negative eigenvalue there is no saddle, and "
            "no second basin to escape to."
        )
    lam = float(es[0])
    log_pref = (
        math.log(abs(lam) / (2 * math.pi))
        + 0.5 * float(torch.log(em).sum())
        - 0.5 * float(torch.log(es.abs()).sum())
    )
    rate = math.exp(log_pref - dL / T)
    return KramersRate(
        value=rate,
        prefactor=math.exp(log_pref),
        saddle_eigenvalue=lam,
        barrier=dL,
        temperature=T,
        mean_time=1 / rate,
        definition=KRAMERS_DEFINITION,
        parameters={
            "barrier": dL,
            "temperature": T,
            "hessian_min_eigenvalues": em.tolist(),
            "hessian_saddle_eigenvalues": es.tolist(),
        },
    )


def _target_region(
    loss: BatchedLoss,
    start: Tensor,
    target: object,
    radius: float | None,
) -> tuple[Callable[[Tensor], Tensor], dict[str, object]]:
    if callable(target) and not isinstance(target, Tensor):
        if radius is not None:
            raise ValueError("radius applies to a target point, not a callable region.")
        return target, {"target": "callable"}
    point = check_point("target", target, start.shape[0]).to(start)
    point, _ = refine_minimum(loss, point, "target")
    gap = float((point - start).norm())
    if gap <= 1e-8 * max(1.0, float(start.norm())):
        raise ValueError(
            f"target refines to the minimum of start ({start.tolist()}): it lies in "
            "the same basin. An escape rate needs a second basin; pass the location "
            "of another minimum as target."
        )
    r = 0.25 * gap if radius is None else check_positive("radius", radius)
    if r >= gap:
        raise ValueError(
            f"radius {r:g} reaches start (distance {gap:g}); use radius < distance "
            "from start to target (default: a quarter of it)."
        )

    def region(theta: Tensor) -> Tensor:
        return (theta - point).norm(dim=1) < r

    return region, {"target": point.tolist(), "radius": r}


def escape_rate(
    loss: BatchedLoss,
    start: Tensor,
    target: Tensor | Callable[[Tensor], Tensor],
    temperature: float,
    *,
    dt: float,
    max_time: float,
    chains: int = 1000,
    radius: float | None = None,
    confidence: float = 0.95,
    seed: int = 0,
) -> EscapeRate:
    r"""The rate of escape from a minimum into another basin, by simulation.

    Every chain starts at ``start`` (refined to the minimum by Newton's method)
    and runs Euler-Maruyama for :math:`d\theta = -\nabla L\,dt + \sqrt{2T}\,dW`
    until it enters the target region, or until ``max_time``. Chains that have
    arrived are dropped, so the cost falls as they arrive.

    Args:
        loss: a :class:`~lossgeom.theory.BatchedLoss`.
        start: a minimum, ``(d,)``; its device and dtype are the simulation's.
        target: another minimum, ``(d,)`` (refined by Newton's method; the region
            is the open ball of radius ``radius`` around it, default a quarter of
            its distance from ``start``: inside the other basin, past the saddle
            by a margin), or a callable ``theta (n, d) -> (n,) bool``.
        temperature: :math:`T > 0`.
        dt: the step; the rate's discretization bias grows with
            ``dt * curvature`` and with the barrier over ``T``.
        max_time: the censoring time.
        chains: independent chains.
        radius: the target ball's radius.
        confidence: level of the interval.
        seed: seed of the noise.

    Returns:
        An :class:`EscapeRate`.

    Example:
        >>> dw = lambda w: (w[:, 0] ** 2 - 1) ** 2 + w[:, 1] ** 2 / 2
        >>> one = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> res = escape_rate(dw, -one, one, 0.5, dt=0.01, max_time=5.0, chains=200)
        >>> res.ci_low < res.value < res.ci_high
        True
    """
    began = time.perf_counter()
    T = check_positive("temperature", temperature, "Use T > 0.")
    dt = check_positive("dt", dt)
    horizon = check_positive("max_time", max_time)
    chains = check_count("chains", chains)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence!r}.")
    start = check_point("start", start)
    start, _ = refine_minimum(loss, start, "start")
    region, where = _target_region(loss, start, target, radius)
    inside = region(start.unsqueeze(0))
    if not isinstance(inside, Tensor) or inside.shape != (1,):
        raise ValueError("target must map points (n, d) to a boolean tensor (n,).")
    if bool(inside[0]):
        raise ValueError("start lies in the target region; nothing to escape.")
    n_steps = math.ceil(horizon / dt)
    gen = generator(seed, start.device)
    theta = start.expand(chains, -1).clone()
    alive = torch.arange(chains, device=start.device)
    times = torch.full((chains,), math.inf, dtype=torch.float64)
    scale = math.sqrt(2 * T * dt)
    gradients = 0
    for k in range(n_steps):
        _, g = loss_and_grad(loss, theta)
        gradients += theta.shape[0]
        z = torch.randn(
            theta.shape, generator=gen, dtype=theta.dtype, device=theta.device
        )
        theta = theta - dt * g + scale * z
        hit = region(theta)
        if bool(hit.any()):
            times[alive[hit].cpu()] = (k + 1) * dt
            keep = ~hit
            theta, alive = theta[keep], alive[keep]
            if alive.numel() == 0:
                break
        if k % 256 == 0 and not bool(torch.isfinite(theta).all()):
            raise NonFiniteError(f"the chains diverged by step {k + 1}; reduce dt.")
    arrived = torch.isfinite(times)
    n = int(arrived.sum())
    exposure = float(times[arrived].sum()) + (chains - n) * n_steps * dt
    rate = n / exposure
    alpha = 1 - confidence
    lo = 0.0 if n == 0 else float(stats.chi2.ppf(alpha / 2, 2 * n)) / (2 * exposure)
    hi = float(stats.chi2.ppf(1 - alpha / 2, 2 * n + 2)) / (2 * exposure)
    details: dict[str, object] = {
        "mean_observed_time": float(times[arrived].mean()) if n else math.nan,
        "censored": chains - n,
        "start_loss": float(loss_values(loss, start.unsqueeze(0))[0]),
    }
    if n == 0:
        details["warning"] = (
            f"no chain reached the target within max_time={horizon:g}: the rate is "
            "below ci_high; raise max_time or the temperature."
        )
    return EscapeRate(
        value=rate,
        stderr=math.sqrt(n) / exposure,
        ci_low=lo,
        ci_high=hi,
        confidence=confidence,
        events=n,
        exposure=exposure,
        chains=chains,
        max_time=n_steps * dt,
        first_passage_times=times,
        start=start,
        definition=ESCAPE_DEFINITION,
        parameters={
            "temperature": T,
            "dt": dt,
            "max_time": horizon,
            "chains": chains,
            "confidence": confidence,
            "seed": seed,
            **where,
        },
        details=details,
        cost=Cost(
            seconds=time.perf_counter() - began, counters={"gradients": gradients}
        ),
    )
