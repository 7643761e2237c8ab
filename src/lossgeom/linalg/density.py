"""Spectral density: stochastic Lanczos quadrature, and the kernel polynomial method.

Stochastic Lanczos quadrature (Golub & Meurant 2010; Lin, Saad & Yang 2016; used
for neural-network Hessians by Ghorbani, Krishnan & Xiao 2019): for a unit probe
``v``, ``m`` Lanczos steps give the Gauss quadrature ``sum_j w_j delta(x - theta_j)``
of the measure ``sum_i (v . u_i)^2 delta(x - lambda_i)``, whose expectation over
random probes is the spectral measure ``(1/d) sum_i delta(x - lambda_i)``. All
probes run side by side, so every step is one product with a block of vectors.
Each probe is reorthogonalised fully against its own basis (``reorth="full"``),
which keeps nodes free of spurious copies at the cost of ``d x m`` numbers per
probe.

The kernel polynomial method (Weisse et al. 2006) is the second estimator: it
expands the density in Chebyshev polynomials on an interval that contains the
spectrum, with moments from Hutchinson probes and Jackson damping.

Written here to batch probes through one product call, to return the quadrature
nodes and weights themselves (so any ``tr f(A)`` can be formed with an error bar),
and because PyHessian's implementation no longer runs on current torch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from lossgeom._results import Cost, Result
from lossgeom.linalg._operator import SymmetricOperator, apply_checked, working

__all__ = ["DensityResult", "Quadrature", "kpm_density", "slq", "slq_density"]


@dataclass(frozen=True)
class Quadrature(Result):
    """Gauss quadrature of the spectral measure, one rule per probe.

    Attributes:
        nodes: ``(n_probes, m)`` Ritz values; unused slots (a probe that broke
            down early, having found an invariant subspace) hold NaN.
        weights: ``(n_probes, m)`` weights, each row summing to 1 (0 where unused).
        dim: the operator's dimension ``d``.
        residuals: ``(n_probes, m)`` Ritz residuals ``||A y_j - theta_j y_j||`` of
            the nodes (``beta_m |s_mj|`` from the Lanczos relation; 0 where a
            probe found an invariant subspace, NaN where unused), or ``None``.
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`.
    """

    nodes: Tensor
    weights: Tensor
    dim: int
    residuals: Tensor | None = None
    definition: str = field(
        default="Gauss quadrature of the spectral measure u^T f(A) u for random "
        "unit probes u, from Lanczos tridiagonals (Golub and Meurant 2010; Ubaru, "
        "Chen and Saad 2017)",
        kw_only=True,
    )

    def per_probe(self, f) -> Tensor:
        """``d * sum_j w_j f(theta_j)`` for each probe: unbiased estimates of ``tr f(A)``."""
        nodes = torch.nan_to_num(self.nodes, nan=0.0)
        return (self.weights * f(nodes) * (self.weights > 0)).sum(1) * self.dim

    def trace_of(self, f) -> tuple[float, float]:
        """Estimate ``tr f(A)`` and its standard error from the quadrature.

        Args:
            f: a function applied elementwise to a tensor of nodes.

        Returns:
            ``(value, stderr)``: ``d`` times the mean over probes of
            ``sum_j w_j f(theta_j)``, and ``d`` times the standard error of that mean.
        """
        per_probe = self.per_probe(f)
        n = per_probe.numel()
        err = float(per_probe.std() / math.sqrt(n)) if n > 1 else float("inf")
        return float(per_probe.mean()), err

    def fraction_below(self, x: float) -> tuple[Tensor, Tensor]:
        """Certain bounds, per probe, on the probe's spectral measure below ``x``.

        Each probe's measure ``mu = sum_i (u . q_i)^2 delta(lambda_i)`` has
        ``mu((-inf, x))`` between ``low`` and ``high``, whatever the eigenvalues:

        * the Chebyshev-Markov-Stieltjes inequalities of Gauss quadrature: with
          ``q`` the weight of the nodes below ``x``, the true value lies in
          ``[q - w_k, q + w_{k+1}]`` (``w_k``, ``w_{k+1}`` the weights of the nodes
          on either side of ``x``);
        * the Ritz residuals: the probe is ``sum_j s_j y_j`` over Ritz vectors
          ``y_j``, and ``y_j`` has at most ``r_j^2 / (theta_j - x)^2`` of its
          spectral weight across ``x``; so ``sqrt(mu((-inf, x)))`` is within
          ``delta = sum_j |s_j| min(1, r_j / |theta_j - x|)`` of ``sqrt(q)``, which
          is tight when converged nodes stay clear of ``x`` (a gap in the spectrum).

        The intersection of both is returned (exact arithmetic; full
        reorthogonalisation keeps rounding far below these widths).

        Args:
            x: the point.

        Returns:
            ``(low, high)``, each of shape ``(n_probes,)``, in ``[0, 1]``.
        """
        used = self.weights > 0
        nodes = torch.nan_to_num(self.nodes, nan=0.0)
        w = self.weights * used
        below = used & (nodes < x)
        q = (w * below).sum(1)
        at_left = torch.where(below, nodes, torch.full_like(nodes, -math.inf))
        at_right = torch.where(used & ~below, nodes, torch.full_like(nodes, math.inf))
        left = w.gather(1, at_left.argmax(1, keepdim=True)).squeeze(1)
        right = w.gather(1, at_right.argmin(1, keepdim=True)).squeeze(1)
        left = torch.where(below.any(1), left, torch.zeros_like(left))
        right = torch.where((used & ~below).any(1), right, torch.zeros_like(right))
        low, high = q - left, q + right
        if self.residuals is not None:
            r = torch.nan_to_num(self.residuals, nan=math.inf)
            dist = (nodes - x).abs()
            share = torch.where(dist > 0, r / dist, torch.ones_like(r)).clamp(max=1.0)
            delta = (w.sqrt() * share * used).sum(1)
            low = torch.maximum(low, (q.sqrt() - delta).clamp_min(0) ** 2)
            high = torch.minimum(high, (q.sqrt() + delta) ** 2)
        return low.clamp(0, 1), high.clamp(0, 1)


@dataclass(frozen=True)
class DensityResult(Result):
    """A spectral density on a grid.

    Attributes:
        grid: points ``x``.
        values: density at ``grid``; integrates to 1 over the grid (trapezoid).
        sigma: width of the Gaussian kernel (SLQ) or ``None`` (KPM).
        method: ``"slq"`` or ``"kpm"``.
        quadrature: the SLQ nodes and weights per probe (SLQ only).
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`.
    """

    grid: Tensor
    values: Tensor
    sigma: float | None
    method: str
    quadrature: Quadrature | None = None
    definition: str = field(
        default="spectral density phi(x) = (1/d) sum_i delta(x - lambda_i) of a "
        "symmetric operator, smoothed: stochastic Lanczos quadrature with a "
        "Gaussian kernel of width sigma (Ghorbani, Krishnan and Xiao 2019) or the "
        "kernel polynomial method (Lin, Saad and Yang 2016)",
        kw_only=True,
    )
    bulky: ClassVar[tuple[str, ...]] = ("quadrature",)

    def scalars(self) -> dict[str, float]:
        """A density has no headline number."""
        return {}


def _probes(d: int, n: int, gen: torch.Generator, op: SymmetricOperator) -> Tensor:
    bits = torch.randint(0, 2, (d, n), generator=gen, device=op.device)
    return (2 * bits - 1).to(op.dtype) / math.sqrt(d)


def slq(
    op: SymmetricOperator,
    n_probes: int = 10,
    lanczos_steps: int = 80,
    *,
    seed: int = 0,
    reorth: str = "full",
) -> Quadrature:
    """Run ``n_probes`` Lanczos processes of ``lanczos_steps`` steps side by side.

    Args:
        op: symmetric operator.
        n_probes: random unit probes (Rademacher / sqrt(d)).
        lanczos_steps: Lanczos steps per probe (at most ``d``).
        seed: seed of the probes.
        reorth: ``"full"`` (against each probe's whole basis; exact but stores
            ``n_probes x lanczos_steps`` vectors) or ``"none"`` (three-term recurrence).

    Returns:
        The :class:`Quadrature`.
    """
    start = time.perf_counter()
    if reorth not in ("full", "none"):
        raise ValueError(f"reorth must be 'full' or 'none'; got {reorth!r}.")
    if not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive integer; got {n_probes!r}.")
    if not isinstance(lanczos_steps, int) or lanczos_steps < 1:
        raise ValueError(
            f"lanczos_steps must be a positive integer; got {lanczos_steps!r}."
        )
    op = working(op)  # the basis and recurrence in float32 at least
    d = op.shape[0]
    m = min(lanczos_steps, d)
    gen = torch.Generator(device=op.device).manual_seed(seed)
    V = _probes(d, n_probes, gen, op)
    basis = None
    if reorth == "full":
        basis = torch.empty(n_probes, m, d, dtype=op.dtype, device=op.device)
        basis[:, 0] = V.T
    alphas = torch.zeros(n_probes, m, dtype=torch.float64, device=op.device)
    betas = torch.zeros(n_probes, m, dtype=torch.float64, device=op.device)
    active = torch.ones(n_probes, dtype=torch.bool, device=op.device)
    lengths = torch.full((n_probes,), m, dtype=torch.long, device=op.device)
    prev = torch.zeros_like(V)
    beta_prev = torch.zeros(n_probes, dtype=op.dtype, device=op.device)
    # beta after each probe's last step: it scales the nodes' Ritz residuals
    beta_last = torch.zeros(n_probes, dtype=torch.float64, device=op.device)
    n_mv = 0
    for j in range(m):
        W = apply_checked(op, V)
        n_mv += n_probes
        alpha = (V * W).sum(0)
        W = W - V * alpha - prev * beta_prev
        if basis is not None:
            Qs = basis[:, : j + 1]  # (p, j+1, d)
            Wt = W.T.unsqueeze(2)  # (p, d, 1)
            for _ in range(2):
                Wt = Wt - torch.bmm(Qs.transpose(1, 2), torch.bmm(Qs, Wt))
            W = Wt.squeeze(2).T
        beta = W.norm(dim=0)
        alphas[:, j] = alpha.double()
        scale = alphas[:, : j + 1].abs().max(1).values.to(op.dtype).clamp_min(1e-300)
        broke = active & (beta <= 1e3 * torch.finfo(op.dtype).eps * scale)
        lengths[broke] = j + 1
        beta_last = torch.where(active, beta.double(), beta_last)
        active = active & ~broke
        if j == m - 1 or not bool(active.any()):
            break
        betas[:, j] = torch.where(active, beta, torch.zeros_like(beta)).double()
        prev, beta_prev = V, beta
        V = torch.where(active, W / beta.clamp_min(1e-300), torch.zeros_like(W))
        if basis is not None:
            basis[:, j + 1] = V.T
    nodes = torch.full(
        (n_probes, m), float("nan"), dtype=torch.float64, device=op.device
    )
    weights = torch.zeros(n_probes, m, dtype=torch.float64, device=op.device)
    residuals = torch.full_like(nodes, float("nan"))
    for p in range(n_probes):
        n = int(lengths[p])
        T = torch.diag(alphas[p, :n])
        if n > 1:
            off = betas[p, : n - 1]
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        nodes[p, :n] = theta
        weights[p, :n] = S[0] ** 2
        residuals[p, :n] = beta_last[p] * S[-1].abs()
    weights = weights / weights.sum(1, keepdim=True)
    return Quadrature(
        nodes=nodes,
        weights=weights,
        dim=d,
        residuals=residuals,
        parameters={"n_probes": n_probes, "lanczos_steps": lanczos_steps, "seed": seed},
        cost=Cost(matvecs=n_mv, seconds=time.perf_counter() - start),
    )


def _normalised(values: Tensor, x: Tensor) -> tuple[Tensor, float]:
    """Scale a density to integrate to 1 on its grid; also return the mass it had."""
    mass = float(torch.trapezoid(values, x))
    return (values / mass if mass > 0 else values), mass


def _grid_for(lo: float, hi: float, grid: Tensor | int | None, pad: float) -> Tensor:
    if isinstance(grid, Tensor):
        return grid.double()
    n = 1000 if grid is None else int(grid)
    width = max(hi - lo, 1e-12)
    return torch.linspace(lo - pad * width, hi + pad * width, n, dtype=torch.float64)


def slq_density(
    op: SymmetricOperator,
    n_probes: int = 10,
    lanczos_steps: int = 80,
    *,
    seed: int = 0,
    grid: Tensor | int | None = None,
    sigma: float | None = None,
    reorth: str = "full",
) -> DensityResult:
    """The spectral density by SLQ, smoothed with a Gaussian kernel.

    Args:
        op: symmetric operator.
        n_probes: random probes.
        lanczos_steps: Lanczos steps per probe: each probe contributes that many
            kernels (its quadrature nodes), so at least 2 (a single step puts one
            spike at each probe's Rayleigh quotient); 40-100 resolve a spectrum.
        seed: seed of the probes.
        grid: points (tensor), a number of points, or ``None`` (1,000 points over
            the nodes' range padded by 5%).
        sigma: kernel width (default: 1% of the nodes' range).
        reorth: see :func:`slq`.

    Returns:
        A :class:`DensityResult` with the quadrature attached.

    Example:
        >>> from lossgeom.linalg import DenseOperator
        >>> A = torch.diag(torch.linspace(-1, 1, 300, dtype=torch.float64))
        >>> dens = slq_density(DenseOperator(A), 4, 40)
        >>> abs(torch.trapezoid(dens.values, dens.grid).item() - 1) < 1e-6
        True
    """
    start = time.perf_counter()
    if isinstance(lanczos_steps, int) and lanczos_steps < 2 <= op.shape[0]:
        raise ValueError(
            f"lanczos_steps must be at least 2 for a density; got {lanczos_steps!r}. "
            "Each probe's density is a sum of lanczos_steps kernels at its Lanczos "
            "quadrature nodes, so one step gives a single spike per probe, not a "
            "spectrum; use 40-100 (default 80)."
        )
    quad = slq(op, n_probes, lanczos_steps, seed=seed, reorth=reorth)
    finite = quad.nodes[torch.isfinite(quad.nodes)]
    lo, hi = float(finite.min()), float(finite.max())
    width = max(hi - lo, 1e-12)
    sig = 0.01 * width if sigma is None else float(sigma)
    if not sig > 0:
        raise ValueError(f"sigma must be positive; got {sigma!r}.")
    x = _grid_for(lo, hi, grid, pad=max(0.05, 4 * sig / width)).to(quad.nodes.device)
    nodes = torch.nan_to_num(quad.nodes, nan=0.0)
    z = (x[:, None, None] - nodes[None]) / sig
    kern = torch.exp(-0.5 * z * z) / (sig * math.sqrt(2 * math.pi))
    values = (kern * quad.weights[None]).sum(2).mean(1)
    values, mass = _normalised(values, x)
    return DensityResult(
        grid=x,
        values=values,
        sigma=sig,
        method="slq",
        cost=Cost(matvecs=quad.cost.matvecs, seconds=time.perf_counter() - start),
        quadrature=quad,
        parameters={"n_probes": n_probes, "lanczos_steps": lanczos_steps},
        details={"mass_on_grid": mass},
    )


def kpm_density(
    op: SymmetricOperator,
    n_probes: int = 10,
    n_moments: int = 80,
    *,
    seed: int = 0,
    grid: Tensor | int | None = None,
    bounds: tuple[float, float] | None = None,
) -> DensityResult:
    """The spectral density by the kernel polynomial method (Jackson damping).

    Args:
        op: symmetric operator.
        n_probes: Hutchinson probes for the Chebyshev moments.
        n_moments: Chebyshev moments (one product per probe each).
        seed: seed of the probes.
        grid: as in :func:`slq_density`.
        bounds: an interval containing the spectrum; default from 10 Lanczos
            steps per probe (``slq``), widened by 5%.

    Returns:
        A :class:`DensityResult` (``sigma`` is ``None``).
    """
    start = time.perf_counter()
    op = working(op)  # the Chebyshev recurrence in float32 at least
    d = op.shape[0]
    n_mv = 0
    if bounds is None:
        quad = slq(op, n_probes=1, lanczos_steps=min(20, d), seed=seed + 1)
        n_mv += quad.cost.matvecs
        finite = quad.nodes[torch.isfinite(quad.nodes)]
        lo, hi = float(finite.min()), float(finite.max())
        pad = 0.05 * max(hi - lo, 1e-12)
        lo, hi = lo - pad, hi + pad
    else:
        lo, hi = map(float, bounds)
        if not hi > lo:
            raise ValueError(
                f"bounds must be (low, high) with high > low; got {bounds!r}."
            )
    center, half = (hi + lo) / 2, (hi - lo) / 2
    gen = torch.Generator(device=op.device).manual_seed(seed)
    Z = _probes(d, n_probes, gen, op) * math.sqrt(d)  # Rademacher

    def scaled(V: Tensor) -> Tensor:
        W = apply_checked(op, V)
        return (W - center * V) / half

    mu = torch.zeros(n_moments, dtype=torch.float64)
    T_prev, T_cur = Z, scaled(Z)
    n_mv += n_probes
    mu[0] = float((Z * T_prev).sum()) / (n_probes * d)
    if n_moments > 1:
        mu[1] = float((Z * T_cur).sum()) / (n_probes * d)
    for k in range(2, n_moments):
        T_next = 2 * scaled(T_cur) - T_prev
        n_mv += n_probes
        mu[k] = float((Z * T_next).sum()) / (n_probes * d)
        T_prev, T_cur = T_cur, T_next
    N = n_moments
    k = torch.arange(N, dtype=torch.float64)
    jackson = (
        (N - k + 1) * torch.cos(math.pi * k / (N + 1))
        + torch.sin(math.pi * k / (N + 1)) / math.tan(math.pi / (N + 1))
    ) / (N + 1)
    x = _grid_for(lo, hi, grid, pad=0.0)
    raw = (x - center) / half
    inside = raw.abs() < 1
    t = raw.clamp(-1 + 1e-12, 1 - 1e-12)
    theta = torch.arccos(t)
    series = mu[0] * jackson[0] + 2 * (
        (mu[1:] * jackson[1:])[None] * torch.cos(k[1:][None] * theta[:, None])
    ).sum(1)
    values = series / (math.pi * torch.sqrt(1 - t * t)) / half
    values = torch.where(inside, values.clamp_min(0), torch.zeros_like(values))
    values, mass = _normalised(values, x)
    return DensityResult(
        grid=x,
        values=values,
        sigma=None,
        method="kpm",
        parameters={"n_probes": n_probes, "n_moments": n_moments},
        details={"bounds": [lo, hi]},
        cost=Cost(matvecs=n_mv, seconds=time.perf_counter() - start),
    )
