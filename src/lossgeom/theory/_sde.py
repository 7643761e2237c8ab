r"""SGD as a stochastic differential equation: Euler-Maruyama on many chains.

**The SDE.** Overdamped Langevin dynamics in the loss :math:`L`,

.. math::
    d\theta = -\nabla L(\theta)\,dt + \sqrt{2T}\,dW_t \quad\text{(isotropic)},
    \qquad
    d\theta = -\nabla L(\theta)\,dt + \sqrt{s}\,\Sigma(\theta)^{1/2}\,dW_t,

with temperature :math:`T`, or a covariance :math:`\Sigma(\theta)` and a scale
:math:`s` (``dt_scale``). With isotropic noise and a loss that grows at infinity,
the stationary law is the Gibbs measure :math:`p(\theta) \propto e^{-L(\theta)/T}`.

**SGD <-> SDE** (Li, Tai & E 2017, "Stochastic modified equations and adaptive
stochastic gradient algorithms", ICML, Thm. 1; Mandt, Hoffman & Blei 2017,
"Stochastic gradient descent as approximate Bayesian inference", JMLR). SGD
:math:`\theta_{k+1} = \theta_k - \eta\,g_B(\theta_k)` whose minibatch gradient has
mean :math:`\nabla L` and covariance :math:`\Sigma(\theta)/B` (:math:`\Sigma` the
covariance of one sample's gradient, :math:`B` samples drawn with replacement) is,
to weak order one in :math:`\eta` over a fixed time horizon, the solution at
:math:`t = k\eta` of

.. math::
    d\theta = -\nabla L\,dt + \sqrt{\eta\,\Sigma(\theta)/B}\,dW_t ,

i.e. ``dt_scale = lr / batch_size``. For isotropic gradient noise
:math:`\Sigma = \sigma^2 I` this is the Langevin equation at temperature
:math:`T = \eta\sigma^2/(2B)` (:func:`sgd_temperature`). Minibatches drawn without
replacement from :math:`N` samples have covariance
:math:`\frac{N-B}{B(N-1)}\Sigma` instead of :math:`\Sigma/B`. Near a minimum with
Hessian :math:`H` and constant :math:`\Sigma` the stationary law is Gaussian with
covariance :math:`C` solving :math:`HC + CH = \eta\Sigma/B` (Mandt, Hoffman & Blei
2017); with anisotropic or state-dependent :math:`\Sigma` it is in general not a
Gibbs measure of :math:`L` (Chaudhari & Soatto 2018, "Stochastic gradient descent
performs variational inference, converges to limit cycles for deep networks",
ICLR).

**Discretization.** Euler-Maruyama with step :math:`\Delta t`:
:math:`\theta_{k+1} = \theta_k - \Delta t\,\nabla L(\theta_k) + \sqrt{\Delta t}\,
\xi_k`, :math:`\xi_k \sim N(0, 2T I)` or :math:`N(0, s\,\Sigma(\theta_k))`,
independent across steps and chains (weak order one, Kloeden & Platen 1992).
Its stationary law differs from the SDE's by :math:`O(\Delta t)`: on a quadratic
of curvature :math:`h` the stationary variance is :math:`T/(h(1 - h\Delta t/2))`
instead of :math:`T/h`, so :math:`h\Delta t` bounds the relative bias.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lossgeom._results import Cost, Result
from lossgeom.objective import NonFiniteError
from lossgeom.theory._sde_base import (
    BatchedLoss,
    check_count,
    check_positive,
    generator,
    loss_and_grad,
    loss_values,
    start_states,
    symmetric_sqrt,
)

__all__ = ["SDEPath", "sgd_temperature", "simulate_sde"]

SDE_DEFINITION = (
    "Euler-Maruyama for d theta = -grad L(theta) dt + sqrt(2T) dW (isotropic, "
    "temperature T) or + sqrt(dt_scale) Sigma(theta)^(1/2) dW (covariance Sigma): "
    "theta_{k+1} = theta_k - dt grad L(theta_k) + sqrt(dt) xi_k, xi_k ~ N(0, 2T I) "
    "or N(0, dt_scale Sigma(theta_k)), independent chains; t = k dt. SGD with step "
    "eta and minibatch noise Sigma/B maps to dt_scale = eta/B, and isotropic "
    "Sigma = sigma^2 I to T = eta sigma^2 / (2B) (Li, Tai & E 2017; Mandt, "
    "Hoffman & Blei 2017)"
)


def sgd_temperature(lr: float, batch_size: int, noise_variance: float) -> float:
    r"""The temperature :math:`T = \eta\sigma^2/(2B)` of SGD with isotropic noise.

    SGD with step ``lr`` (:math:`\eta`), batches of ``batch_size`` (:math:`B`)
    samples drawn with replacement, and per-sample gradient noise of covariance
    ``noise_variance * I`` (:math:`\sigma^2 I`) is approximated by the Langevin
    SDE at this temperature (Li, Tai & E 2017; Mandt, Hoffman & Blei 2017).

    Example:
        >>> sgd_temperature(0.1, 10, 4.0)
        0.02
    """
    lr = check_positive("lr", lr)
    check_count("batch_size", batch_size)
    var = check_positive("noise_variance", noise_variance)
    return lr * var / (2 * batch_size)


# ----------------------------------------------------------------------- result
@dataclass(frozen=True)
class SDEPath(Result):
    r"""Chains of an SDE (or of SGD), recorded every ``record_every`` steps.

    Attributes:
        times: the recorded times :math:`t = k\,\Delta t` (SGD: :math:`k\eta`),
            shape ``(R,)``.
        steps: the recorded step indices ``k``, shape ``(R,)``.
        states: the chains' parameters, ``(R, chains, d)`` (left out of
            :meth:`to_dict`).
        losses: the loss of every chain, ``(R, chains)`` (left out of
            :meth:`to_dict`).
        mean_loss: the mean over chains of the loss, ``(R,)``.
        mean: the mean over chains of the parameters, ``(R, d)``.
        variance: their variance over chains (``ddof=1``; 0 for one chain),
            ``(R, d)``.
        noise_trace: the trace of the noise's covariance per unit time, averaged
            over chains, ``(R,)``: ``2 T d`` (isotropic), ``dt_scale tr Sigma``
            (covariance); for SGD, ``lr tr Cov(g_B)`` (the SGD step noise
            ``lr^2 Cov(g_B)`` per time ``lr``).
        value: the mean loss at the last recorded time.
        stderr: its standard error over chains.
        definition: the dynamics, with citations.
        parameters: the settings.
        details: further outputs.
        cost: gradients (chain-steps), data passes and seconds.
    """

    times: Tensor
    steps: Tensor
    states: Tensor
    losses: Tensor
    mean_loss: Tensor
    mean: Tensor
    variance: Tensor
    noise_trace: Tensor
    value: float
    stderr: float
    bulky: ClassVar[tuple[str, ...]] = ("states", "losses")

    def __repr__(self) -> str:
        r, c, d = self.states.shape
        return (
            f"SDEPath(chains={c}, d={d}, records={r}, t_end={float(self.times[-1]):g}, "
            f"mean_loss_end={self.value:.6g} +- {self.stderr:.2g})"
        )


class Recorder:
    """Collects states, losses and noise traces at recorded steps."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.states: list[Tensor] = []
        self.losses: list[Tensor] = []
        self.traces: list[float] = []

    def add(self, k: int, theta: Tensor, losses: Tensor, trace: Tensor) -> None:
        check_finite(theta, k)
        self.steps.append(k)
        self.states.append(theta.detach().clone())
        self.losses.append(losses.detach().clone())
        self.traces.append(float(trace.double().mean()))

    def fields(self, dt: float) -> dict[str, Any]:
        states = torch.stack(self.states)
        losses = torch.stack(self.losses)
        chains = states.shape[1]
        var = (
            states.var(1, correction=1)
            if chains > 1
            else torch.zeros_like(states[:, 0])
        )
        last = losses[-1].double()
        stderr = (
            float(last.std(correction=1)) / math.sqrt(chains) if chains > 1 else 0.0
        )
        steps = torch.tensor(self.steps)
        return {
            "times": steps.double() * dt,
            "steps": steps,
            "states": states,
            "losses": losses,
            "mean_loss": losses.mean(1),
            "mean": states.mean(1),
            "variance": var,
            "noise_trace": torch.tensor(self.traces, dtype=torch.float64),
            "value": float(last.mean()),
            "stderr": stderr,
        }


def check_finite(theta: Tensor, k: int) -> None:
    """Refuse diverged chains, naming the step and a chain."""
    bad = ~torch.isfinite(theta).all(1)
    if bool(bad.any()):
        c = int(bad.nonzero()[0, 0])
        raise NonFiniteError(
            f"the chains diverged by step {k}: chain {c} (of {int(bad.sum())} "
            "non-finite) left the finite numbers. The step dt (or lr) is too large "
            "for the curvature or the noise; reduce it."
        )


def record_steps(steps: int, record_every: int) -> set[int]:
    """Step indices recorded: ``0, r, 2r, ...`` and the last."""
    return set(range(0, steps + 1, record_every)) | {steps}


# ------------------------------------------------------------------------ noise
class Noise:
    """Draws the noise ``xi`` of one step, covariance ``D(theta)`` per unit time."""

    def sample(self, theta: Tensor, gen: torch.Generator) -> Tensor:
        raise NotImplementedError

    def trace(self, theta: Tensor) -> Tensor:
        raise NotImplementedError


class IsotropicNoise(Noise):
    def __init__(self, temperature: float):
        self.temperature = temperature
        self.scale = math.sqrt(2 * temperature)

    def sample(self, theta: Tensor, gen: torch.Generator) -> Tensor:
        z = torch.randn(
            theta.shape, generator=gen, dtype=theta.dtype, device=theta.device
        )
        return z.mul_(self.scale)

    def trace(self, theta: Tensor) -> Tensor:
        return theta.new_full(theta.shape[:1], 2 * self.temperature * theta.shape[1])


class MatrixNoise(Noise):
    """Covariance ``dt_scale * Sigma`` with a fixed matrix or ``Sigma(theta)``."""

    def __init__(self, covariance: Tensor | Callable, dt_scale: float, like: Tensor):
        self.dt_scale = dt_scale
        self.dim = dim = like.shape[1]
        self.fn = None if isinstance(covariance, Tensor) else covariance
        if isinstance(covariance, Tensor):
            S = self.check(covariance, (dim, dim)).to(like)
            self.root = math.sqrt(dt_scale) * symmetric_sqrt(S, "covariance")
            self.fixed_trace = dt_scale * float(covariance.diagonal().sum())

    @staticmethod
    def check(S: object, shape: tuple[int, ...]) -> Tensor:
        if not isinstance(S, Tensor) or tuple(S.shape) != shape:
            got = tuple(S.shape) if isinstance(S, Tensor) else type(S).__name__
            raise ValueError(
                f"covariance must be a tensor of shape {shape} (or a callable "
                f"returning (chains, d, d)); got {got}."
            )
        if not bool(torch.isfinite(S).all()):
            raise ValueError("covariance must be finite.")
        return S

    def _cov(self, theta: Tensor) -> Tensor:
        S = self.fn(theta)  # type: ignore[misc]
        return self.check(S, (theta.shape[0], self.dim, self.dim)).to(theta)

    def sample(self, theta: Tensor, gen: torch.Generator) -> Tensor:
        z = torch.randn(
            theta.shape, generator=gen, dtype=theta.dtype, device=theta.device
        )
        if self.fn is None:
            return z @ self.root.T
        root = math.sqrt(self.dt_scale) * symmetric_sqrt(self._cov(theta), "covariance")
        return (root @ z.unsqueeze(-1)).squeeze(-1)

    def trace(self, theta: Tensor) -> Tensor:
        if self.fn is None:
            return theta.new_full(theta.shape[:1], self.fixed_trace)
        return self.dt_scale * self._cov(theta).diagonal(dim1=1, dim2=2).sum(1)


class FactorNoise(Noise):
    """Covariance ``dt_scale * F F^T`` with ``F(theta)`` of shape ``(chains, d, m)``."""

    def __init__(self, factor: Callable, dt_scale: float, dim: int):
        self.fn, self.dt_scale, self.dim = factor, dt_scale, dim

    def _factor(self, theta: Tensor) -> Tensor:
        F = self.fn(theta)
        if not isinstance(F, Tensor) or F.ndim != 3 or F.shape[:2] != theta.shape:
            got = tuple(F.shape) if isinstance(F, Tensor) else type(F).__name__
            raise ValueError(
                "noise_factor must return a tensor of shape (chains, d, m) = "
                f"({theta.shape[0]}, {theta.shape[1]}, m); got {got}."
            )
        return F.to(theta)

    def sample(self, theta: Tensor, gen: torch.Generator) -> Tensor:
        F = self._factor(theta)
        z = torch.randn(
            (*F.shape[::2], 1), generator=gen, dtype=theta.dtype, device=theta.device
        )
        return math.sqrt(self.dt_scale) * (F @ z).squeeze(-1)

    def trace(self, theta: Tensor) -> Tensor:
        return self.dt_scale * self._factor(theta).pow(2).sum((1, 2))


def make_noise(
    temperature: float | None,
    covariance: Tensor | Callable | None,
    noise_factor: Callable | None,
    dt_scale: float,
    like: Tensor,
) -> Noise:
    """The noise of :func:`simulate_sde` from exactly one of its three forms."""
    given = [
        n
        for n, v in (
            ("temperature", temperature),
            ("covariance", covariance),
            ("noise_factor", noise_factor),
        )
        if v is not None
    ]
    if len(given) != 1:
        raise ValueError(
            "pass exactly one of temperature (isotropic noise sqrt(2T) dW), "
            "covariance (a (d, d) matrix or a callable theta -> (chains, d, d)) or "
            f"noise_factor (a callable theta -> (chains, d, m)); got {given or 'none'}."
        )
    if temperature is not None:
        return IsotropicNoise(
            check_positive(
                "temperature", temperature, "Use T > 0 (T = 0 is gradient flow)."
            )
        )
    if covariance is not None:
        if not (isinstance(covariance, Tensor) or callable(covariance)):
            raise TypeError(
                "covariance must be a (d, d) tensor or a callable theta -> "
                f"(chains, d, d); got {type(covariance).__name__}."
            )
        return MatrixNoise(covariance, dt_scale, like)
    if not callable(noise_factor):
        raise TypeError(
            "noise_factor must be a callable theta -> (chains, d, m); got "
            f"{type(noise_factor).__name__}."
        )
    return FactorNoise(noise_factor, dt_scale, like.shape[1])


# ------------------------------------------------------------------- simulation
def simulate_sde(
    loss: BatchedLoss,
    theta0: Tensor,
    *,
    temperature: float | None = None,
    covariance: Tensor | Callable[[Tensor], Tensor] | None = None,
    noise_factor: Callable[[Tensor], Tensor] | None = None,
    dt_scale: float = 1.0,
    dt: float,
    steps: int,
    chains: int | None = None,
    record_every: int = 1,
    seed: int = 0,
) -> SDEPath:
    r"""Euler-Maruyama paths of the SGD-SDE on many independent chains at once.

    :math:`\theta_{k+1} = \theta_k - \Delta t\,\nabla L(\theta_k) +
    \sqrt{\Delta t}\,\xi_k` with :math:`\xi_k \sim N(0, 2T I)` (``temperature``),
    :math:`N(0, s\,\Sigma)` (``covariance``: a fixed ``(d, d)`` matrix or a
    callable ``theta (chains, d) -> (chains, d, d)``) or
    :math:`N(0, s\,F F^T)` (``noise_factor``: a callable
    ``theta -> (chains, d, m)``, e.g. centred per-sample gradients over
    :math:`\sqrt N`), :math:`s` = ``dt_scale``. For SGD with step :math:`\eta`
    and batch size :math:`B` use ``dt_scale = eta / B`` (module docstring). All
    chains advance together: one gradient call per step on ``(chains, d)``.

    Args:
        loss: a :class:`BatchedLoss` ``(chains, d) -> (chains,)``
            (:func:`batched_loss` wraps a model or an Objective).
        theta0: the start, ``(d,)`` (every chain) or ``(chains, d)``; its device
            and dtype are the simulation's.
        temperature: :math:`T > 0` of isotropic noise.
        covariance: :math:`\Sigma`, fixed or state-dependent.
        noise_factor: a factor :math:`F` with :math:`\Sigma = F F^T`.
        dt_scale: :math:`s`, the scale of ``covariance`` / ``noise_factor``.
        dt: the step :math:`\Delta t > 0`.
        steps: the number of steps (``>= 1``).
        chains: the number of chains (default: 1, or ``theta0``'s rows).
        record_every: record every this many steps (and the last).
        seed: seed of the noise.

    Returns:
        An :class:`SDEPath`.

    Example:
        Ornstein-Uhlenbeck on ``L = |theta|^2 / 2``: stationary variance ``T``.

        >>> quad = lambda th: 0.5 * (th**2).sum(1)
        >>> path = simulate_sde(quad, torch.zeros(1, dtype=torch.float64),
        ...     temperature=0.5, dt=0.01, steps=500, chains=4000, record_every=500)
        >>> abs(path.variance[-1, 0].item() - 0.5) < 0.05
        True
    """
    theta = start_states(theta0, chains)
    dt = check_positive("dt", dt)
    steps = check_count("steps", steps)
    record_every = check_count("record_every", record_every)
    dt_scale = check_positive("dt_scale", dt_scale)
    noise = make_noise(temperature, covariance, noise_factor, dt_scale, theta)
    gen = generator(seed, theta.device)
    start = time.perf_counter()
    rec, marks = Recorder(), record_steps(steps, record_every)
    sqrt_dt = math.sqrt(dt)
    for k in range(steps):
        values, g = loss_and_grad(loss, theta)
        if k in marks:
            rec.add(k, theta, values, noise.trace(theta))
        elif k % 256 == 0:
            check_finite(theta, k)
        theta = theta - dt * g + sqrt_dt * noise.sample(theta, gen)
    rec.add(steps, theta, loss_values(loss, theta), noise.trace(theta))
    kind = (
        "isotropic"
        if temperature is not None
        else ("covariance" if covariance is not None else "noise_factor")
    )
    return SDEPath(
        **rec.fields(dt),
        definition=SDE_DEFINITION,
        parameters={
            "noise": kind,
            "temperature": temperature,
            "dt_scale": dt_scale,
            "dt": dt,
            "steps": steps,
            "chains": theta.shape[0],
            "record_every": record_every,
            "seed": seed,
            "dtype": str(theta.dtype).removeprefix("torch."),
            "device": str(theta.device),
        },
        details={
            "state_dependent_noise": kind != "isotropic"
            and not isinstance(covariance, Tensor)
        },
        cost=Cost(
            seconds=time.perf_counter() - start,
            counters={"gradients": steps * theta.shape[0]},
        ),
    )
