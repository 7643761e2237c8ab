r"""SGD on a network and its SDE with the real gradient-noise covariance.

With per-sample gradients :math:`g_i` (:meth:`~lossgeom.Objective.per_sample_grad`:
their mean over the :math:`N` samples is the full-data gradient :math:`g`),
:math:`c_i = g_i - g` and :math:`\Sigma = \frac1N\sum_i c_i c_i^T`, the gradient of
a minibatch of :math:`B` samples drawn uniformly has covariance
:math:`\operatorname{Cov}(g_B) = f\,\Sigma` with :math:`f = 1/B` (with
replacement) or :math:`f = \frac{N-B}{B(N-1)}` (without, the default: Cochran 1977,
ch. 2).

* :func:`simulate_sgd`: real SGD, :math:`\theta_{k+1} = \theta_k - \eta\,g_B`, with
  an independent minibatch per chain and step (``noise="gradient"``), or the
  full gradient plus isotropic Gaussian noise of the same total variance,
  :math:`g + \sqrt{f\operatorname{tr}\Sigma/d}\,z` (``noise="isotropic"``).
* :func:`simulate_sgd_sde`: Euler-Maruyama for the SGD-SDE
  :math:`d\theta = -g\,dt + \sqrt{\eta f\,\Sigma(\theta)}\,dW` (Li, Tai & E 2017),
  the square root through the centred per-sample gradients:
  :math:`\sqrt{f/N}\,C^T z` with :math:`z \sim N(0, I_N)` has covariance
  :math:`f\Sigma` without forming :math:`\Sigma` (``noise="gradient"``), or
  isotropic noise of equal trace, :math:`\sqrt{f\operatorname{tr}\Sigma/d}\,z`
  (``noise="isotropic"``). With ``dt = lr`` (default) one step is SGD with the
  minibatch noise replaced by a Gaussian of the same covariance; smaller ``dt``
  resolves the SDE itself.

Both record ``noise_trace`` :math:`= \eta f\operatorname{tr}\Sigma(\theta)`, the
trace of the noise covariance per unit time, the same for both noises at the
same point by construction.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from torch import Tensor
from torch.func import grad, vmap

from lossgeom._results import Cost
from lossgeom.objective import Objective
from lossgeom.theory._sde import Recorder, SDEPath, record_steps
from lossgeom.theory._sde_base import (
    check_count,
    check_positive,
    generator,
    start_states,
)

__all__ = ["simulate_sgd", "simulate_sgd_sde"]

NoiseKind = Literal["gradient", "isotropic"]

SGD_DEFINITION = (
    "SGD theta_{k+1} = theta_k - lr g_B(theta_k), t = k lr; noise='gradient': g_B "
    "the mean gradient of B samples drawn uniformly (an independent minibatch per "
    "chain and step); noise='isotropic': g + sqrt(f tr(Sigma)/d) z, z ~ N(0, I_d), "
    "the same total variance as the minibatch noise, whose covariance is "
    "f Sigma, f = 1/B (with replacement) or (N-B)/(B(N-1)) (without); Sigma = "
    "(1/N) sum_i c_i c_i^T, c_i centred per-sample gradients"
)
SGD_SDE_DEFINITION = (
    "Euler-Maruyama for the SGD-SDE d theta = -g dt + sqrt(lr f Sigma(theta)) dW "
    "(Li, Tai & E 2017): theta += -dt g + sqrt(dt lr) xi; noise='gradient': "
    "xi = sqrt(f/N) C^T z, z ~ N(0, I_N), C the centred per-sample gradients "
    "(covariance f Sigma); noise='isotropic': xi = sqrt(f tr(Sigma)/d) z, "
    "z ~ N(0, I_d) (equal trace); f = 1/B (with replacement) or (N-B)/(B(N-1))"
)


class _Network:
    """An objective's data, gradients and per-sample gradients at many points."""

    def __init__(self, obj: object, what: str, chunk_size: int | None):
        if not isinstance(obj, Objective):
            raise TypeError(
                f"{what} expects a lossgeom Objective (lg.Objective(model, loss_fn, "
                f"data)); got {type(obj).__name__}."
            )
        if obj.mode != "eval":
            raise ValueError(
                f"{what} needs an Objective in mode='eval': per-sample gradients and "
                "one minibatch per chain need each sample's loss on its own "
                "(BatchNorm in train mode mixes the samples of a batch)."
            )
        if obj.data_parallel:
            raise ValueError(f"{what} runs on one process; use data_parallel=False.")
        self.obj = obj
        xs, ys = zip(*obj.batches(), strict=True)
        self.X, self.Y = torch.cat(xs), torch.cat(ys)
        self.n = self.X.shape[0]
        self.chunk = chunk_size
        totals = obj.loss_totals()  # computed once, outside the vmaps
        self.n_total = totals.n_samples

    def fraction(self, batch_size: int, replacement: bool) -> float:
        """``f`` with ``Cov(g_B) = f Sigma``."""
        ok = isinstance(batch_size, int) and not isinstance(batch_size, bool)
        top = math.inf if replacement else self.n
        if not ok or not 1 <= batch_size <= top:
            if replacement:
                check_count("batch_size", batch_size)
            raise ValueError(
                f"batch_size must be in [1, N] = [1, {self.n}] (minibatches drawn "
                f"without replacement); got {batch_size}."
            )
        if replacement:
            return 1.0 / batch_size
        return (
            (self.n - batch_size) / (batch_size * (self.n - 1)) if self.n > 1 else 0.0
        )

    def per_sample(self, theta: Tensor) -> Tensor:
        """Per-sample gradients at every chain: ``(chains, N, d)``."""
        obj, X, Y = self.obj, self.X, self.Y
        G = vmap(lambda t: obj.per_sample_grad(t, X, Y), chunk_size=self.chunk)(theta)
        obj.counters.per_sample_grad += theta.shape[0]
        obj.counters.passes += theta.shape[0]
        return G

    def minibatch_grad(self, theta: Tensor, idx: Tensor) -> Tensor:
        """The gradient of each chain's minibatch ``idx[c]``: ``(chains, d)``."""
        obj = self.obj
        scale = self.n_total / idx.shape[1]  # N/B: an unbiased estimate of L

        def term(t: Tensor, x: Tensor, y: Tensor) -> Tensor:
            return obj.loss_term(obj.model_fn(t, x), y, scale)

        g = vmap(grad(term), chunk_size=self.chunk)(theta, self.X[idx], self.Y[idx])
        obj.counters.grad += theta.shape[0]
        return g

    def losses(self, theta: Tensor) -> Tensor:
        return self.obj.evaluate(theta.to(self.obj.dtype), chunk_size=self.chunk)

    def sample(
        self, chains: int, b: int, replacement: bool, gen: torch.Generator
    ) -> Tensor:
        dev = self.X.device
        if replacement:
            return torch.randint(0, self.n, (chains, b), generator=gen, device=dev)
        keys = torch.rand(chains, self.n, generator=gen, device=dev)
        return keys.argsort(1)[:, :b]


def _centred(G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean gradient, centred rows and ``tr Sigma`` per chain."""
    g = G.mean(1)
    C = G - g.unsqueeze(1)
    return g, C, C.pow(2).sum((1, 2)) / G.shape[1]


def _setup(
    obj: object,
    theta0: Tensor | None,
    chains: int | None,
    what: str,
    noise: object,
    chunk_size: int | None,
) -> tuple[_Network, Tensor]:
    net = _Network(obj, what, chunk_size)
    if noise not in ("gradient", "isotropic"):
        raise ValueError(
            f"noise must be 'gradient' (the minibatch noise) or 'isotropic' (equal "
            f"total variance); got {noise!r}."
        )
    theta = start_states(net.obj.theta if theta0 is None else theta0, chains)
    if theta.shape[1] != net.obj.dim:
        raise ValueError(
            f"theta0 must have {net.obj.dim} entries per chain (the objective's "
            f"parameters); got {theta.shape[1]}."
        )
    if theta.dtype != net.obj.dtype or theta.device != net.obj.device:
        raise ValueError(
            f"theta0 must be on the objective's device and dtype ({net.obj.device}, "
            f"{net.obj.dtype}); got {theta.device}, {theta.dtype}."
        )
    return net, theta


def simulate_sgd(
    obj: Objective,
    theta0: Tensor | None = None,
    *,
    lr: float,
    batch_size: int,
    steps: int,
    chains: int | None = None,
    noise: NoiseKind = "gradient",
    replacement: bool = False,
    record_every: int = 1,
    seed: int = 0,
    chunk_size: int | None = None,
) -> SDEPath:
    r"""Many independent runs of SGD on ``obj``, vectorized over the chains.

    Every chain draws its own minibatch of ``batch_size`` samples each step
    (uniformly, without replacement within the batch unless ``replacement``).
    ``noise="isotropic"`` replaces the minibatch gradient by the full gradient
    plus :math:`N(0, (f\operatorname{tr}\Sigma/d) I)` at the chain's point (module
    docstring): the same total variance, spread evenly over directions. Times are
    ``t = k lr``, to compare with :func:`simulate_sgd_sde`.

    Args:
        obj: the objective (``mode="eval"``, one process).
        theta0: the start, ``(d,)`` or ``(chains, d)`` (default: the model's).
        lr: the step :math:`\eta > 0`.
        batch_size: :math:`B`.
        steps: the number of steps.
        chains: the number of runs (default: 1, or ``theta0``'s rows).
        noise: ``"gradient"`` or ``"isotropic"``.
        replacement: draw minibatches with replacement (``Cov = Sigma / B``).
        record_every: record every this many steps (and the last).
        seed: seed of the minibatches and the noise.
        chunk_size: chains per vectorized call (``None``: all at once).

    Returns:
        An :class:`~lossgeom.theory.SDEPath`; ``noise_trace`` is
        :math:`\eta f \operatorname{tr}\Sigma` at the recorded points.
    """
    net, theta = _setup(obj, theta0, chains, "simulate_sgd", noise, chunk_size)
    lr = check_positive("lr", lr)
    steps = check_count("steps", steps)
    record_every = check_count("record_every", record_every)
    f = net.fraction(batch_size, replacement)
    gen = generator(seed, theta.device)
    start, before = time.perf_counter(), dict(net.obj.counters.to_dict())
    rec, marks = Recorder(), record_steps(steps, record_every)
    d = theta.shape[1]
    with net.obj.probe_mode(higher_order=False):
        for k in range(steps + 1):
            tr = None
            if noise == "isotropic" or k in marks:
                g_full, _, tr = _centred(net.per_sample(theta))
            if k in marks:
                rec.add(k, theta, net.losses(theta), lr * f * tr)
            if k == steps:
                break
            if noise == "gradient":
                idx = net.sample(theta.shape[0], batch_size, replacement, gen)
                g = net.minibatch_grad(theta, idx)
            else:
                z = torch.randn(
                    theta.shape, generator=gen, dtype=theta.dtype, device=theta.device
                )
                g = g_full + (f * tr / d).sqrt().unsqueeze(1) * z
            theta = theta - lr * g
    return SDEPath(
        **rec.fields(lr),
        definition=SGD_DEFINITION,
        parameters=_parameters(
            net, lr, batch_size, steps, theta, noise, replacement, record_every, seed
        )
        | {"noise_fraction": f},
        details={"objective": net.obj.info()},
        cost=_cost(net, before, start),
    )


def simulate_sgd_sde(
    obj: Objective,
    theta0: Tensor | None = None,
    *,
    lr: float,
    batch_size: int,
    steps: int,
    chains: int | None = None,
    noise: NoiseKind = "gradient",
    replacement: bool = False,
    dt: float | None = None,
    record_every: int = 1,
    seed: int = 0,
    chunk_size: int | None = None,
) -> SDEPath:
    r"""The SGD-SDE of :func:`simulate_sgd` with the real gradient-noise covariance.

    Euler-Maruyama with step ``dt`` (default ``lr``) for
    :math:`d\theta = -g\,dt + \sqrt{\eta f\,\Sigma(\theta)}\,dW`, :math:`\Sigma`
    from the per-sample gradients at every step and chain (module docstring);
    ``noise="isotropic"`` uses :math:`\sqrt{\eta f \operatorname{tr}\Sigma / d}\,dW`
    instead (the same trace). Costs one pass of per-sample gradients per chain
    and step.

    Args:
        obj: the objective (``mode="eval"``, one process).
        theta0: the start, ``(d,)`` or ``(chains, d)`` (default: the model's).
        lr: the SGD step :math:`\eta` the SDE models.
        batch_size: :math:`B`.
        steps: the number of Euler-Maruyama steps (time ``steps * dt``).
        chains: the number of chains (default: 1, or ``theta0``'s rows).
        noise: ``"gradient"`` or ``"isotropic"``.
        replacement: model minibatches drawn with replacement.
        dt: the integration step (default ``lr``).
        record_every: record every this many steps (and the last).
        seed: seed of the noise.
        chunk_size: chains per vectorized call (``None``: all at once).

    Returns:
        An :class:`~lossgeom.theory.SDEPath`.
    """
    net, theta = _setup(obj, theta0, chains, "simulate_sgd_sde", noise, chunk_size)
    lr = check_positive("lr", lr)
    dt = lr if dt is None else check_positive("dt", dt)
    steps = check_count("steps", steps)
    record_every = check_count("record_every", record_every)
    f = net.fraction(batch_size, replacement)
    gen = generator(seed, theta.device)
    start, before = time.perf_counter(), dict(net.obj.counters.to_dict())
    rec, marks = Recorder(), record_steps(steps, record_every)
    chains_, d = theta.shape
    amplitude = math.sqrt(dt * lr)
    with net.obj.probe_mode(higher_order=False):
        for k in range(steps + 1):
            G = net.per_sample(theta)
            g, C, tr = _centred(G)
            if k in marks:
                rec.add(k, theta, net.losses(theta), lr * f * tr)
            if k == steps:
                break
            if noise == "gradient":
                z = torch.randn(
                    chains_,
                    net.n,
                    1,
                    generator=gen,
                    dtype=theta.dtype,
                    device=theta.device,
                )
                xi = math.sqrt(f / net.n) * (C.mT @ z).squeeze(-1)
            else:
                z = torch.randn(
                    theta.shape, generator=gen, dtype=theta.dtype, device=theta.device
                )
                xi = (f * tr / d).sqrt().unsqueeze(1) * z
            theta = theta - dt * g + amplitude * xi
    return SDEPath(
        **rec.fields(dt),
        definition=SGD_SDE_DEFINITION,
        parameters=_parameters(
            net, lr, batch_size, steps, theta, noise, replacement, record_every, seed
        )
        | {"dt": dt, "noise_fraction": f},
        details={"objective": net.obj.info()},
        cost=_cost(net, before, start),
    )


def _parameters(
    net: _Network,
    lr: float,
    batch_size: int,
    steps: int,
    theta: Tensor,
    noise: str,
    replacement: bool,
    record_every: int,
    seed: int,
) -> dict[str, object]:
    return {
        "lr": lr,
        "batch_size": batch_size,
        "steps": steps,
        "chains": theta.shape[0],
        "noise": noise,
        "replacement": replacement,
        "record_every": record_every,
        "seed": seed,
        "n_samples": net.n,
    }


def _cost(net: _Network, before: dict[str, int], start: float) -> Cost:
    after = net.obj.counters.to_dict()
    spent = {k: after[k] - before.get(k, 0) for k in after}
    return Cost(
        data_passes=spent.get("passes", 0),
        seconds=time.perf_counter() - start,
        counters=spent,
    )
