"""Fitting the Marchenko-Pastur law to eigenvalues or to an SLQ spectral density.

**Why CDF matching, not maximum likelihood.** The Marchenko-Pastur support
depends on the parameters, and the density vanishes like a square root at its
edges, so the likelihood is not regular (Smith 1985): it is ``-inf`` as soon as
one eigenvalue lies outside the fitted edges, and at finite size the extreme
eigenvalues do cross the limiting edges (Tracy-Widom fluctuations of order
``n^-2/3``, Johnstone 2001), let alone the outliers of a spiked spectrum. The fit
therefore minimizes the Cramer-von Mises distance between the fitted CDF and the
empirical one (a minimum-distance estimator, Wolfowitz 1957): least squares of
``F(lambda_(i)) - (i - 1/2)/p`` over the sorted eigenvalues, in the
parameters ``(log ratio, log scale)`` (``scipy.optimize.least_squares`` from a
few starting points, the moment estimate among them). The residuals are bounded
by 1 whatever the eigenvalue, so a handful of outliers moves the fit by about
their share of the spectrum. The point mass at 0 enters through the zero
eigenvalues: a zero eigenvalue at mid-position ``u`` has residual
``max(0, u - (1 - 1/ratio))``, so the fit matches the share of zeros.

For an SLQ density the empirical CDF is that of its Gauss quadrature measure
(all probes' nodes, each with weight ``w / n_probes``), with the residuals
weighted by the atoms' weights; without a quadrature (KPM) it is the CDF of the
density on its grid, smoothed by the kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats as st
import torch
from scipy.optimize import least_squares
from torch import Tensor

from lossgeom._results import timed
from lossgeom.linalg import DensityResult
from lossgeom.theory._rmt import (
    Numbers,
    check_ratio,
    check_scale,
    mp_cdf,
    point_mass,
    values_of,
    wishart_eigenvalues,
)
from lossgeom.theory._rmt_results import DEFINITION, MarchenkoPasturFit

__all__ = ["MIN_EIGENVALUES", "fit_marchenko_pastur"]

MIN_EIGENVALUES = 10  # non-zero eigenvalues a fit needs (two parameters, and a CDF)
_STARTS = (0.02, 0.1, 0.3, 0.7, 1.5, 4.0, 20.0)  # ratios the fit starts from
_LOG_RATIO = (math.log(1e-4), math.log(1e4))
BOOTSTRAP = (
    "standard errors: parametric bootstrap, refits of Wishart spectra of the same "
    "size drawn at the fitted law (Dumitriu & Edelman 2002 bidiagonal model); "
    "ks_statistic: scipy.stats.kstest of the non-zero eigenvalues against the "
    "fitted continuous part, its p-value from the same bootstrap with refitting "
    "(Stute, Gonzalez Manteiga & Presedo Quindimil 1993)"
)
JACKKNIFE = (
    "empirical CDF: the SLQ Gauss quadrature measure of all probes; standard "
    "errors: jackknife over the probes; ks_statistic: the largest distance "
    "between the fitted and the quadrature CDF"
)
GRID = (
    "empirical CDF: the density on its grid (smoothed by its kernel); no "
    "standard errors; ks_statistic: the largest distance between the CDFs"
)


# ------------------------------------------------------------- the measure
@dataclass(frozen=True)
class _Measure:
    """A discrete measure (sorted atoms with weights summing to 1) to fit."""

    x: np.ndarray
    w: np.ndarray
    zero: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray, w: np.ndarray, zero_tol: float) -> _Measure:
        order = np.argsort(x, kind="stable")
        x, w = x[order], w[order] / w.sum()
        top = float(np.abs(x).max()) if x.size else 0.0
        zero = np.abs(x) <= zero_tol * top
        return cls(np.where(zero, 0.0, x), w, zero)

    @property
    def mid(self) -> np.ndarray:
        return np.cumsum(self.w) - self.w / 2

    def residuals(self, log_ratio: float, log_scale: float) -> np.ndarray:
        y, s = math.exp(log_ratio), math.exp(log_scale)
        u = self.mid
        r = np.where(
            self.zero, np.maximum(0.0, u - point_mass(y)), mp_cdf(self.x, y, s) - u
        )
        return np.sqrt(self.w) * r

    def moments(self) -> tuple[float, float]:
        """Moment estimates: mean ``scale``, second moment ``scale^2 (1 + ratio)``."""
        m1 = float((self.w * self.x).sum())
        m2 = float((self.w * self.x**2).sum())
        return m1, (m2 / m1**2 - 1.0 if m1 > 0 else math.nan)

    def distance(self, y: float, s: float) -> float:
        """The largest gap between the fitted and the empirical CDF at the atoms."""
        after = np.cumsum(self.w)
        before = after - self.w
        if self.zero.any():  # the zero atoms are one jump, from 0 to the mass at 0
            before = np.where(self.zero, before[self.zero].min(), before)
            after = np.where(self.zero, after[self.zero].max(), after)
        F = mp_cdf(self.x, y, s)
        F_left = np.where(self.zero, 0.0, F)
        return float(max(np.abs(F - after).max(), np.abs(F_left - before).max()))


def _fit(m: _Measure, starts: list[tuple[float, float]]) -> tuple[float, float, bool]:
    """Least squares from the two best starts; ``(ratio, scale, converged)``."""
    thetas = [
        (min(max(math.log(y0), _LOG_RATIO[0]), _LOG_RATIO[1]), math.log(s0))
        for y0, s0 in starts
    ]
    thetas.sort(key=lambda t: float((m.residuals(*t) ** 2).sum()))
    best: Any = None
    for theta0 in thetas[:2]:
        res = least_squares(
            lambda t: m.residuals(t[0], t[1]),
            theta0,
            bounds=([_LOG_RATIO[0], -np.inf], [_LOG_RATIO[1], np.inf]),
            xtol=1e-12,
            ftol=1e-12,
            gtol=1e-12,
            max_nfev=400,
        )
        if best is None or res.cost < best.cost:
            best = res
    return math.exp(best.x[0]), math.exp(best.x[1]), bool(best.status > 0)


def _starts(m: _Measure) -> list[tuple[float, float]]:
    s0, y0 = m.moments()
    if not s0 > 0:
        raise ValueError(
            "the eigenvalues' mean is not positive: a Marchenko-Pastur law (a "
            "positive semi-definite spectrum) cannot fit them."
        )
    ys = list(_STARTS)
    if math.isfinite(y0) and y0 > 0:
        ys.insert(0, y0)
    return [(y, s0) for y in ys]


def _ks(m: _Measure, y: float, s: float) -> float:
    """KS statistic of the non-zero eigenvalues against the continuous part."""
    w0 = point_mass(y)
    x = m.x[~m.zero]

    def cdf(v):
        return np.clip((mp_cdf(np.asarray(v), y, s) - w0) / (1 - w0), 0.0, 1.0)

    return float(st.kstest(x, cdf).statistic)


# ------------------------------------------------------------------- inputs
def _zero_tol(zero_tol: float | None, default: float) -> float:
    tol = default if zero_tol is None else float(zero_tol)
    if not (math.isfinite(tol) and 0 <= tol < 1):
        raise ValueError(
            f"zero_tol must lie in [0, 1) (eigenvalues with |lambda| <= zero_tol * "
            f"max |lambda| count as zero); got {zero_tol!r}."
        )
    return tol


def _enough(m: _Measure, what: str, minimum: int) -> None:
    n = int(np.count_nonzero(~m.zero))
    if n < minimum:
        raise ValueError(
            f"{what} must hold at least {minimum} non-zero eigenvalues to fit the "
            f"two parameters of a Marchenko-Pastur law; got {n} (of {m.x.size}). "
            "Pass the whole spectrum, or a density."
        )


def _density_measures(
    density: DensityResult, zero_tol: float
) -> tuple[list[_Measure], int | None, str]:
    """One measure per SLQ probe, or one for the grid; the dimension; the source."""
    quad = density.quadrature
    if quad is not None:
        nodes = quad.nodes.detach().double().cpu().numpy()
        weights = quad.weights.detach().double().cpu().numpy()
        out = []
        for x, w in zip(nodes, weights, strict=True):
            used = (w > 0) & np.isfinite(x)
            out.append((x[used], w[used]))
        return (
            [_combine(out, zero_tol)] + _leave_one_out(out, zero_tol),
            quad.dim,
            "density",
        )
    grid = density.grid.detach().double().cpu().numpy()
    vals = np.clip(density.values.detach().double().cpu().numpy(), 0, None)
    dx = np.gradient(grid)
    return [_Measure.of(grid, vals * dx, zero_tol)], None, "density-grid"


def _combine(parts: list[tuple[np.ndarray, np.ndarray]], zero_tol: float) -> _Measure:
    x = np.concatenate([p[0] for p in parts])
    w = np.concatenate([p[1] / p[1].sum() for p in parts])
    return _Measure.of(x, w, zero_tol)


def _leave_one_out(parts, zero_tol: float) -> list[_Measure]:
    if len(parts) < 2:
        return []
    return [_combine(parts[:i] + parts[i + 1 :], zero_tol) for i in range(len(parts))]


# ---------------------------------------------------------------------- fit
def fit_marchenko_pastur(
    eigenvalues: Numbers | None = None,
    *,
    density: DensityResult | None = None,
    n_bootstrap: int = 50,
    zero_tol: float | None = None,
    seed: int = 0,
) -> MarchenkoPasturFit:
    """Fit ``ratio`` and ``scale`` of a Marchenko-Pastur law to a spectrum.

    Give either ``eigenvalues`` (the whole spectrum of a ``p x p`` matrix, zero
    eigenvalues included: their share is the point mass ``1 - 1/ratio``) or
    ``density``, an SLQ :class:`~lossgeom.DensityResult` (``lg.density``).
    The fit matches CDFs (minimum Cramer-von Mises distance, see the module
    docstring for why not maximum likelihood).

    Error bars. For eigenvalues, ``n_bootstrap`` spectra of the fitted law at
    the same size (``p`` eigenvalues, ``n = round(p / ratio)`` samples, drawn by
    the Dumitriu-Edelman bidiagonal model) are refitted: the standard
    deviations of their parameters are the standard errors, and the share of
    them whose KS statistic is at least the data's is the p-value of the fit
    (a parametric bootstrap with re-estimation, so it accounts for the fitted
    parameters and for the eigenvalues' dependence). These describe a
    Marchenko-Pastur spectrum of this size; for an operator whose bulk is not
    Marchenko-Pastur they measure only how well the law describes it. For an
    SLQ density the standard errors are a jackknife over the probes (the
    random part of SLQ); the quadrature's discretization is not included.

    Args:
        eigenvalues: all eigenvalues of the matrix (tensor, array or list).
        density: an SLQ (or KPM) density, instead of ``eigenvalues``.
        n_bootstrap: parametric bootstrap replicates for eigenvalues (0: none;
            standard errors and p-value NaN). About 0.05 s each at ``p = 2000``.
        zero_tol: eigenvalues with ``|lambda| <= zero_tol * max |lambda|`` are
            zero (default ``1e-9``, ``1e-5`` for a float32 tensor or a density).
        seed: seed of the bootstrap.

    Returns:
        A :class:`MarchenkoPasturFit`.

    Raises:
        ValueError: neither or both inputs, fewer than 10 non-zero eigenvalues,
            non-finite values, a non-positive mean, a bad ``zero_tol`` or
            ``n_bootstrap``.
        TypeError: ``density`` is not a ``DensityResult``.

    Example:
        >>> import numpy as np
        >>> X = np.random.default_rng(0).standard_normal((1000, 250))
        >>> fit = fit_marchenko_pastur(np.linalg.eigvalsh(2.0 * X.T @ X / 1000),
        ...                            n_bootstrap=0)
        >>> abs(fit.ratio - 0.25) < 0.005, abs(fit.scale - 2.0) < 0.02
        (True, True)
    """
    if (eigenvalues is None) == (density is None):
        raise ValueError(
            "give either eigenvalues (the whole spectrum) or density (an SLQ "
            "DensityResult from lg.density), not "
            + ("both." if eigenvalues is not None else "neither.")
        )
    if (
        not isinstance(n_bootstrap, int)
        or isinstance(n_bootstrap, bool)
        or n_bootstrap < 0
    ):
        raise ValueError(
            f"n_bootstrap must be a non-negative integer (0: no error bars; 50 "
            f"gives standard errors to about 10%); got {n_bootstrap!r}."
        )
    with timed() as meter:
        if eigenvalues is not None:
            out = _fit_eigenvalues(eigenvalues, n_bootstrap, zero_tol, seed)
        else:
            out = _fit_density(density, zero_tol)
    return MarchenkoPasturFit(**out, cost=meter.cost)


def _fit_eigenvalues(eigenvalues, n_bootstrap, zero_tol, seed) -> dict[str, Any]:
    x = values_of(eigenvalues, "eigenvalues")
    low_precision = isinstance(eigenvalues, Tensor) and eigenvalues.dtype in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
    )
    tol = _zero_tol(zero_tol, 1e-5 if low_precision else 1e-9)
    m = _Measure.of(x, np.ones_like(x), tol)
    _enough(m, "eigenvalues", MIN_EIGENVALUES)
    y, s, ok = _fit(m, _starts(m))
    ks = _ks(m, y, s)
    p = x.size
    n = max(1, round(p / y))
    rng = np.random.default_rng(seed)
    boot = np.full((n_bootstrap, 3), math.nan)
    for b in range(n_bootstrap):
        mb = _Measure.of(wishart_eigenvalues(p, n, s, rng), np.ones(p), tol)
        if np.count_nonzero(~mb.zero) < MIN_EIGENVALUES:
            continue
        yb, sb, _ = _fit(mb, [(y, s)])
        boot[b] = yb, sb, _ks(mb, yb, sb)
    done = boot[np.isfinite(boot[:, 0])]
    sd = done[:, :2].std(0, ddof=1) if len(done) > 1 else np.full(2, math.nan)
    pval = (
        (1 + np.count_nonzero(done[:, 2] >= ks)) / (1 + len(done))
        if len(done)
        else math.nan
    )
    m1, ym = m.moments()
    details = {
        "n_zero": int(m.zero.sum()),
        "n_negative": int(np.count_nonzero(m.x < 0)),
        "moment_ratio": ym,
        "moment_scale": m1,
        "bootstrap_samples": n,
        "bootstrap_replicates": len(done),
        "zero_tol": tol,
    }
    return _fields(m, y, s, ok, sd, ks, pval, p, "eigenvalues", details) | {
        "parameters": {"n_bootstrap": n_bootstrap, "zero_tol": zero_tol, "seed": seed},
        "definition": f"{DEFINITION}; {BOOTSTRAP}",
    }


def _fit_density(density, zero_tol) -> dict[str, Any]:
    if not isinstance(density, DensityResult):
        raise TypeError(
            "density must be a DensityResult (from lg.density or "
            f"lossgeom.linalg.slq_density); got {type(density).__name__}."
        )
    tol = _zero_tol(zero_tol, 1e-5)
    measures, dim, source = _density_measures(density, tol)
    m = measures[0]
    _enough(m, "density", MIN_EIGENVALUES)
    y, s, ok = _fit(m, _starts(m))
    loo = [_fit(mi, [(y, s)])[:2] for mi in measures[1:]]
    if len(loo) > 1:
        arr = np.log(np.asarray(loo))  # jackknife of the log-parameters
        k = len(loo)
        se_log = np.sqrt((k - 1) / k * ((arr - arr.mean(0)) ** 2).sum(0))
        sd = np.array([y, s]) * se_log
    else:
        sd = np.full(2, math.nan)
    m1, ym = m.moments()
    details = {
        "n_probes": len(loo) if loo else None,
        "moment_ratio": ym,
        "moment_scale": m1,
        "method": density.method,
        "zero_tol": tol,
        "stderr_method": "jackknife over probes" if len(loo) > 1 else None,
    }
    how = JACKKNIFE if source == "density" else GRID
    return _fields(
        m, y, s, ok, sd, m.distance(y, s), math.nan, dim, source, details
    ) | {"parameters": {"zero_tol": zero_tol}, "definition": f"{DEFINITION}; {how}"}


def _fields(m, y, s, ok, sd, ks, pval, dim, source, details) -> dict[str, Any]:
    check_ratio(y)  # a fit at the bounds of the search still names a valid law
    check_scale(s)
    return {
        "ratio": y,
        "scale": s,
        "ratio_stderr": float(sd[0]),
        "scale_stderr": float(sd[1]),
        "lower_edge": s * (1 - math.sqrt(y)) ** 2,
        "upper_edge": s * (1 + math.sqrt(y)) ** 2,
        "point_mass": point_mass(y),
        "zero_fraction": float(m.w[m.zero].sum()),
        "ks_statistic": float(ks),
        "ks_pvalue": float(pval),
        "dimension": None if dim is None else int(dim),
        "n_eigenvalues": int(m.x.size),
        "source": source,
        "converged": ok,
        "details": details,
    }
