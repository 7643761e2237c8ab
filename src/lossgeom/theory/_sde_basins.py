r"""Basin occupancy of the Langevin SDE on a two-parameter surface.

At temperature :math:`T` the isotropic SGD-SDE
:math:`d\theta = -\nabla L\,dt + \sqrt{2T}\,dW` has the stationary Gibbs measure
:math:`p(\theta) = e^{-L(\theta)/T}/Z`. The mass of basin :math:`i` (the points
that gradient flow carries to minimum :math:`\theta_i^*`) is computed three ways:

* **Gibbs** -- :math:`p_i = \int_{B_i} e^{-L/T} / \int e^{-L/T}` by the midpoint
  rule on a grid of cells over ``bounds``; each cell is given to a basin by
  discrete steepest descent on the grid (every cell points to the neighbour, of
  its eight, with the most negative slope; pointers are followed to a cell with
  none, which goes to the nearest given minimum), an approximation of the
  gradient-flow partition to the grid spacing; or by a ``partition`` callable.
* **Laplace** -- :math:`p_i \propto e^{-L_i^*/T}(2\pi T)^{d/2}/\sqrt{\det H_i}`, the
  quadratic approximation of each basin, exact as :math:`T \to 0`
  (:math:`H_i` the Hessian at the minimum).
* **Simulated** -- the fraction of chain-time after burn-in that independent
  Euler-Maruyama chains spend in each basin. Each chain's fraction is one
  draw; the chains are independent, so the standard error of their mean is their
  standard deviation over :math:`\sqrt{\text{chains}}` whatever the
  autocorrelation within a chain, and the interval uses Student's t. The
  fractions estimate the stationary occupancy when the chains mix between basins
  during the run or start from the stationary law (``start="gibbs"``: chains
  drawn from the grid's Gibbs measure); ``details["mixed_fraction"]`` says what
  fraction of chains visited more than one basin after burn-in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from scipy import stats
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
    refine_minimum,
)
from lossgeom.theory._sde_grid import (
    Grid,
    basin_labels,
    check_minima,
    gibbs_mass,
    nearest,
)

__all__ = ["BasinOccupancy", "basin_occupancy"]

OCCUPANCY_DEFINITION = (
    "occupancy of the basins of attraction (of gradient flow) of the given minima "
    "under d theta = -grad L dt + sqrt(2T) dW. gibbs: integral over basin i of "
    "exp(-L/T) / integral of exp(-L/T), midpoint rule on a grid over bounds, cells "
    "assigned by discrete steepest descent; laplace: proportional to exp(-L_i/T) "
    "(2 pi T)^(d/2) / sqrt(det H_i); simulated: mean over independent "
    "Euler-Maruyama chains of the fraction of post-burn-in steps in basin i, "
    "standard error std/sqrt(chains), Student-t interval"
)


@dataclass(frozen=True)
class BasinOccupancy(Result):
    """Gibbs, Laplace and simulated occupancy of each basin, in the order of minima.

    Attributes:
        minima: the minima (refined by Newton's method), ``(k, d)``.
        minimum_losses: the loss at each, ``(k,)``.
        hessians: the Hessian at each, ``(k, d, d)``.
        temperature: :math:`T`.
        gibbs: the Gibbs occupancy by quadrature, ``(k,)``.
        gibbs_bound: ``|gibbs - gibbs on a grid twice as coarse|``, an indicator
            of the quadrature's error, ``(k,)``.
        laplace: the Laplace approximation, ``(k,)``.
        simulated: the mean over chains of the fraction of time in each basin.
        simulated_stderr: its standard error (over independent chains).
        ci_low: the lower end of the ``confidence`` interval.
        ci_high: the upper end.
        confidence: the interval's confidence level.
        per_chain: each chain's fractions, ``(chains, k)`` (left out of
            :meth:`to_dict`).
        definition: the three quantities, in words.
        parameters: the settings.
        details: grid and simulation diagnostics (``mixed_fraction``,
            ``outside_fraction``, ``edge_mass``, ``dt_curvature``, ...).
        cost: gradients (chain-steps), loss evaluations and seconds.
    """

    minima: Tensor
    minimum_losses: Tensor
    hessians: Tensor
    temperature: float
    gibbs: Tensor
    gibbs_bound: Tensor
    laplace: Tensor
    simulated: Tensor
    simulated_stderr: Tensor
    ci_low: Tensor
    ci_high: Tensor
    confidence: float
    per_chain: Tensor
    bulky: ClassVar[tuple[str, ...]] = ("per_chain",)

    def scalars(self) -> dict[str, float]:
        """Per basin ``i``: ``gibbs_i``, ``laplace_i``, ``simulated_i``, its stderr."""
        out: dict[str, float] = {}
        for i in range(self.gibbs.shape[0]):
            out[f"gibbs_{i}"] = float(self.gibbs[i])
            out[f"laplace_{i}"] = float(self.laplace[i])
            out[f"simulated_{i}"] = float(self.simulated[i])
            out[f"simulated_{i}_stderr"] = float(self.simulated_stderr[i])
        return out

    def __repr__(self) -> str:
        rows = [
            f"  basin {i} at {[round(v, 4) for v in self.minima[i].tolist()]}: "
            f"gibbs {float(self.gibbs[i]):.4f}, laplace {float(self.laplace[i]):.4f}, "
            f"simulated {float(self.simulated[i]):.4f} "
            f"+- {float(self.simulated_stderr[i]):.4f}"
            for i in range(self.gibbs.shape[0])
        ]
        return f"BasinOccupancy(T={self.temperature:g}\n" + "\n".join(rows) + ")"


# ---------------------------------------------------------------------- public
def basin_occupancy(
    loss: BatchedLoss,
    minima: Tensor | Sequence[Sequence[float]],
    temperature: float,
    *,
    bounds: Sequence[Sequence[float]],
    dt: float,
    steps: int,
    chains: int = 256,
    burn_in: int | None = None,
    start: Literal["gibbs", "minima"] | Tensor = "gibbs",
    grid: int | tuple[int, int] = 400,
    partition: Callable[[Tensor], Tensor] | None = None,
    boundary: Literal["none", "reflect"] = "none",
    hessians: Tensor | None = None,
    confidence: float = 0.95,
    seed: int = 0,
) -> BasinOccupancy:
    r"""Gibbs, Laplace and simulated occupancy of the basins of a 2-D surface.

    Args:
        loss: a :class:`~lossgeom.theory.BatchedLoss` on two parameters.
        minima: the minima, ``(k, 2)``, ``k >= 2`` (refined by Newton's method).
        temperature: :math:`T > 0`.
        bounds: the box ``((low_1, high_1), (low_2, high_2))`` of the quadrature
            (it should hold all but a negligible part of the Gibbs mass:
            ``details["edge_mass"]`` is the share of the outermost ring of cells).
        dt: the Euler-Maruyama step; keep ``dt * curvature`` small
            (``details["dt_curvature"]``: the stationary variance of a basin of
            curvature ``h`` is biased by the factor ``1 / (1 - h dt / 2)``).
        steps: steps per chain (0: quadrature and Laplace only; the simulated
            fields are ``nan``).
        chains: independent chains.
        burn_in: steps left out at the start (default ``steps // 10``).
        start: ``"gibbs"`` (draws from the grid's Gibbs measure: no burn-in bias),
            ``"minima"`` (chain ``c`` at minimum ``c mod k``), or a ``(2,)`` /
            ``(chains, 2)`` tensor.
        grid: cells per axis (or two numbers).
        partition: a callable ``(n, 2) -> (n,)`` of basin indices in
            ``[0, k)`` that replaces the steepest-descent partition (e.g.
            ``lambda w: (w[:, 0] > 0).long()`` for the double well).
        boundary: ``"none"`` (chains move freely; outside the box a point
            belongs to the nearest minimum's basin) or ``"reflect"`` (chains are
            reflected at the box, whose stationary law is the Gibbs measure on
            the box, which the quadrature computes).
        hessians: the Hessians at the minima, ``(k, 2, 2)`` (default: autograd).
        confidence: level of the interval.
        seed: seed of the start and the noise.

    Returns:
        A :class:`BasinOccupancy`.

    Example:
        >>> dw = lambda w: (w[:, 0] ** 2 - 1) ** 2 + w[:, 1] ** 2 / 2
        >>> minima = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
        >>> res = basin_occupancy(dw, minima, 0.3, bounds=((-2.5, 2.5), (-3, 3)),
        ...     dt=0.01, steps=400, chains=64, grid=200)
        >>> [round(p, 6) for p in res.gibbs.tolist()]   # symmetric: half each
        [0.5, 0.5]
    """
    began = time.perf_counter()
    T = check_positive("temperature", temperature, "Use T > 0.")
    dt = check_positive("dt", dt)
    steps = check_count("steps", steps, 0)
    chains = check_count("chains", chains, 2)
    burn_in = steps // 10 if burn_in is None else burn_in
    if isinstance(burn_in, bool) or not isinstance(burn_in, int):
        raise ValueError(f"burn_in must be an integer; got {burn_in!r}.")
    if not 0 <= burn_in < max(steps, 1):
        raise ValueError(
            f"burn_in must be in [0, steps) = [0, {steps}); got {burn_in}."
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence!r}.")
    if boundary not in ("none", "reflect"):
        raise ValueError(f"boundary must be 'none' or 'reflect'; got {boundary!r}.")
    mins = check_minima(minima)
    k = mins.shape[0]
    box = Grid(bounds, grid, mins)
    outside = ~((mins >= box.lo) & (mins <= box.hi)).all(1)
    if bool(outside.any()):
        raise ValueError(
            f"minima {mins[outside].tolist()} lie outside bounds {bounds!r}; widen "
            "bounds to hold every basin."
        )
    refined, hess = [], []
    for i in range(k):
        m, H = refine_minimum(loss, mins[i], f"minima[{i}]")
        refined.append(m)
        hess.append(H)
    mins = torch.stack(refined)
    if hessians is not None:
        if not isinstance(hessians, Tensor) or hessians.shape != (k, 2, 2):
            got = tuple(hessians.shape) if isinstance(hessians, Tensor) else hessians
            raise ValueError(f"hessians must have shape ({k}, 2, 2); got {got}.")
        hess = list(hessians.to(mins))
    H = torch.stack(hess)
    min_losses = loss_values(loss, mins)

    # ---- quadrature
    values = loss_values(loss, box.points)
    if not bool(torch.isfinite(values).all()):
        bad = box.points[~torch.isfinite(values)][0].tolist()
        raise ValueError(
            f"the loss is not finite at {bad} inside bounds; shrink bounds."
        )
    labels = basin_labels(box, values, mins, partition, k)
    weights = torch.exp(-(values - values.min()) / T)
    gibbs = gibbs_mass(weights, labels, k)
    coarse = torch.zeros(box.n, dtype=torch.bool, device=mins.device)
    coarse[::2, ::2] = True
    coarse = coarse.reshape(-1)
    gibbs_coarse = gibbs_mass(weights[coarse], labels[coarse], k)
    ring = torch.ones(box.n, dtype=torch.bool, device=mins.device)
    ring[1:-1, 1:-1] = False
    edge_mass = float(weights[ring.reshape(-1)].sum() / weights.sum())

    # ---- Laplace
    d = mins.shape[1]
    logdet = torch.linalg.slogdet(H)
    if bool((logdet.sign <= 0).any()):
        raise ValueError("hessians must be positive definite at every minimum.")
    log_w = -min_losses / T + d / 2 * math.log(2 * math.pi * T) - logdet.logabsdet / 2
    laplace = torch.softmax(log_w, 0)

    # ---- simulation
    gen = generator(seed, mins.device)
    theta = _start(start, chains, box, weights, mins, gen)
    counts, visited, n_out = _run_chains(
        loss, theta, mins, box, labels, T, dt, steps, burn_in, boundary, gen
    )
    n_counted = max(steps - burn_in, 1)
    per_chain = counts / n_counted if steps else torch.full_like(counts, math.nan)
    simulated = per_chain.mean(0)
    stderr = per_chain.std(0, correction=1) / math.sqrt(chains)
    q = float(stats.t.ppf((1 + confidence) / 2, chains - 1))
    top_curv = float(torch.linalg.eigvalsh(H).max())
    return BasinOccupancy(
        minima=mins,
        minimum_losses=min_losses,
        hessians=H,
        temperature=T,
        gibbs=gibbs,
        gibbs_bound=(gibbs - gibbs_coarse).abs(),
        laplace=laplace,
        simulated=simulated,
        simulated_stderr=stderr,
        ci_low=(simulated - q * stderr).clamp(0, 1),
        ci_high=(simulated + q * stderr).clamp(0, 1),
        confidence=confidence,
        per_chain=per_chain,
        definition=OCCUPANCY_DEFINITION,
        parameters={
            "temperature": T,
            "bounds": box_bounds(box),
            "grid": list(box.n),
            "dt": dt,
            "steps": steps,
            "chains": chains,
            "burn_in": burn_in,
            "start": start if isinstance(start, str) else "tensor",
            "partition": "steepest_descent" if partition is None else "callable",
            "boundary": boundary,
            "confidence": confidence,
            "seed": seed,
        },
        details={
            "mixed_fraction": float((visited.sum(1) > 1).double().mean()),
            "outside_fraction": n_out / (chains * n_counted),
            "edge_mass": edge_mass,
            "dt_curvature": dt * top_curv,
            "time": steps * dt,
            "burn_in_time": burn_in * dt,
            "grid_spacing": box.h.tolist(),
        },
        cost=Cost(
            seconds=time.perf_counter() - began,
            counters={
                "gradients": steps * chains,
                "loss": int(box.points.shape[0]),
            },
        ),
    )


def box_bounds(box: Grid) -> list[list[float]]:
    """The box as ``[[low_1, high_1], [low_2, high_2]]``."""
    return [[float(box.lo[j]), float(box.hi[j])] for j in range(2)]


def _start(
    start: object,
    chains: int,
    box: Grid,
    weights: Tensor,
    mins: Tensor,
    gen: torch.Generator,
) -> Tensor:
    if isinstance(start, Tensor):
        s = start.detach().to(mins)
        if s.shape == (2,):
            return s.expand(chains, 2).clone()
        if s.shape == (chains, 2):
            return s.clone()
        raise ValueError(
            f"start must be 'gibbs', 'minima', or a tensor of shape (2,) or "
            f"({chains}, 2); got shape {tuple(s.shape)}."
        )
    if start == "minima":
        return mins[torch.arange(chains, device=mins.device) % mins.shape[0]].clone()
    if start == "gibbs":
        cells = torch.multinomial(weights, chains, replacement=True, generator=gen)
        jitter = torch.rand(
            chains, 2, generator=gen, dtype=mins.dtype, device=mins.device
        )
        return box.points[cells] + (jitter - 0.5) * box.h
    raise ValueError(f"start must be 'gibbs', 'minima', or a tensor; got {start!r}.")


def _reflect(theta: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    theta = torch.where(theta < lo, 2 * lo - theta, theta)
    theta = torch.where(theta > hi, 2 * hi - theta, theta)
    return torch.minimum(torch.maximum(theta, lo), hi)


def _run_chains(
    loss: BatchedLoss,
    theta: Tensor,
    mins: Tensor,
    box: Grid,
    labels: Tensor,
    T: float,
    dt: float,
    steps: int,
    burn_in: int,
    boundary: str,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor, int]:
    """Euler-Maruyama chains; steps per basin after burn-in, basins visited."""
    chains, k = theta.shape[0], mins.shape[0]
    counts = torch.zeros(chains, k, dtype=mins.dtype, device=mins.device)
    visited = torch.zeros(chains, k, dtype=torch.bool, device=mins.device)
    n_out = 0
    scale = math.sqrt(2 * T * dt)
    for step in range(steps):
        _, g = loss_and_grad(loss, theta)
        z = torch.randn(
            theta.shape, generator=gen, dtype=theta.dtype, device=theta.device
        )
        theta = theta - dt * g + scale * z
        if boundary == "reflect":
            theta = _reflect(theta, box.lo, box.hi)
        if step + 1 <= burn_in:
            continue
        cell, inside = box.index(theta)
        lab = labels[cell]
        if not bool(inside.all()):
            if not bool(torch.isfinite(theta).all()):
                raise NonFiniteError(
                    f"the chains diverged by step {step + 1}; reduce dt."
                )
            lab = torch.where(inside, lab, nearest(theta, mins))
            n_out += int((~inside).sum())
        hot = F.one_hot(lab, k)
        counts += hot
        visited |= hot.bool()
    return counts, visited, n_out
