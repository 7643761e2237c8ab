"""Eigenvalues outside a Marchenko-Pastur bulk, with a Tracy-Widom margin.

At finite size the largest eigenvalue of a spike-free Wishart matrix lies above
the limiting edge about half the time; its fluctuations are of order
``n^-2/3`` and, centred and scaled as by Johnstone (2001, Thm. 1.1, real case),
follow the Tracy-Widom law ``TW1`` (Tracy & Widom 1996). The outlier threshold
is therefore the Johnstone centring plus a ``TW1`` quantile times the Johnstone
scale, so that a pure Marchenko-Pastur spectrum shows an outlier with
probability about ``1 - confidence``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from lossgeom._results import timed
from lossgeom.curvature import OutlierResult
from lossgeom.theory._rmt import Numbers, check_ratio, check_scale, values_of
from lossgeom.theory._rmt_fit import MIN_EIGENVALUES, fit_marchenko_pastur
from lossgeom.theory._rmt_results import MarchenkoPasturFit

__all__ = ["TW1_QUANTILES", "MarchenkoPasturOutliers", "count_outliers"]

#: Upper quantiles of the Tracy-Widom law TW1 (Johnstone 2001, Table 1; checked
#: against simulated Wishart spectra in tests/test_theory_rmt.py).
TW1_QUANTILES: dict[float, float] = {0.90: 0.4501, 0.95: 0.9793, 0.99: 2.0234}
KS_WARN = 0.03  # a fitted bulk this far from the law gets a caveat (or 4/m)
OUTLIER_SHARE = 0.1  # more outliers than this share of the spectrum: a caveat

DEFINITION = (
    "eigenvalues above the Marchenko-Pastur bulk: threshold = (scale/n) [(sqrt(N-1) "
    "+ sqrt(m))^2 + q (sqrt(N-1) + sqrt(m)) (1/sqrt(N-1) + 1/sqrt(m))^(1/3)], "
    "n = p/ratio, m = min(n, p), N = max(n, p), q the TW1 quantile at the given "
    "confidence (Johnstone 2001; Tracy & Widom 1996): the upper edge "
    "scale (1 + sqrt(ratio))^2 plus a Tracy-Widom margin of order n^(-2/3)"
)


@dataclass(frozen=True, kw_only=True)
class MarchenkoPasturOutliers(OutlierResult):
    """Eigenvalues above a Marchenko-Pastur bulk (an :class:`~lossgeom.OutlierResult`).

    Attributes:
        values: the outliers, descending.
        bulk_edge: the largest given eigenvalue at or below the threshold (NaN
            when every given eigenvalue is an outlier).
        n_outliers: ``len(values)``.
        gaps: gaps between consecutive outliers and from the last to
            ``bulk_edge``.
        threshold: the cut: the upper edge plus the Tracy-Widom margin.
        upper_edge: the limiting upper edge ``scale (1 + sqrt(ratio))^2``.
        ratio: the bulk's ``p / n`` (fitted with the outliers left out, or given).
        scale: the bulk's ``scale``.
        dimension: ``p``, the bulk's dimension used for the margin.
        confidence: the level of the margin.
        fit: the Marchenko-Pastur fit of the bulk (``None`` when ``ratio`` and
            ``scale`` were given).
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`.
    """

    threshold: float
    upper_edge: float
    ratio: float
    scale: float
    dimension: int
    confidence: float
    fit: MarchenkoPasturFit | None = None
    definition: str = field(default=DEFINITION)
    bulky: ClassVar[tuple[str, ...]] = ()

    def scalars(self) -> dict[str, float]:
        """The count (``value``), the largest eigenvalue, the edges and threshold."""
        out = super().scalars()
        out.update(threshold=float(self.threshold), upper_edge=float(self.upper_edge))
        return out


def tracy_widom_threshold(
    dimension: int, ratio: float, scale: float, confidence: float
) -> float:
    """Johnstone's centring plus the ``TW1`` quantile times his scale."""
    n = dimension / ratio
    m, big = max(min(n, dimension), 1.0), max(n, dimension)
    root = math.sqrt(max(big - 1.0, 1.0)) + math.sqrt(m)
    mu = root**2
    sigma = root * (1 / math.sqrt(max(big - 1.0, 1.0)) + 1 / math.sqrt(m)) ** (1 / 3)
    return scale / n * (mu + TW1_QUANTILES[confidence] * sigma)


def _check_confidence(confidence: float) -> float:
    if confidence not in TW1_QUANTILES:
        raise ValueError(
            f"confidence must be one of {sorted(TW1_QUANTILES)} (the tabulated "
            f"Tracy-Widom quantiles); got {confidence!r}."
        )
    return float(confidence)


def _check_dimension(dimension: int | None, default: int) -> int:
    if dimension is None:
        return default
    if not isinstance(dimension, int) or isinstance(dimension, bool) or dimension < 1:
        raise ValueError(
            "dimension must be a positive integer (p, the size of the matrix "
            f"whose eigenvalues these are); got {dimension!r}."
        )
    if dimension < default:
        raise ValueError(
            f"dimension ({dimension}) is smaller than the number of eigenvalues "
            f"given ({default}); pass the size of the matrix."
        )
    return dimension


def count_outliers(
    eigenvalues: Numbers,
    ratio: float | None = None,
    scale: float | None = None,
    *,
    dimension: int | None = None,
    confidence: float = 0.99,
    zero_tol: float | None = None,
    max_iter: int = 10,
) -> MarchenkoPasturOutliers:
    """Count the eigenvalues above a Marchenko-Pastur bulk.

    The threshold is the upper edge plus a Tracy-Widom margin (see
    :data:`DEFINITION`): a spike-free Marchenko-Pastur spectrum of this size has
    an eigenvalue above it with probability about ``1 - confidence``; a spike
    ``theta`` well above the BBP threshold ``sqrt(ratio)``
    (:func:`bbp_threshold`) lands at :func:`spiked_outliers`, above it.

    * Without ``ratio`` and ``scale``, ``eigenvalues`` must be the whole
      spectrum: the law is fitted (:func:`fit_marchenko_pastur`) to the
      eigenvalues below the threshold, the outliers are counted, and the two
      steps repeat until the count is stable (at most ``max_iter`` times), so
      the outliers do not widen the bulk.
    * With both, ``eigenvalues`` may be just the top ones (from
      ``lg.eigenvalues``), the bulk from elsewhere (e.g. a fit to an SLQ density,
      ``fit_marchenko_pastur(density=...)``); give ``dimension``, the size of the
      matrix, for the margin.

    Args:
        eigenvalues: the spectrum, or its top part when ``ratio`` and ``scale``
            are given.
        ratio: the bulk's ``p / n``.
        scale: the bulk's ``scale``.
        dimension: ``p`` (default: the number of eigenvalues).
        confidence: 0.9, 0.95 or 0.99.
        zero_tol: passed to :func:`fit_marchenko_pastur`.
        max_iter: fit-and-count rounds at most.

    Returns:
        A :class:`MarchenkoPasturOutliers`.

    Raises:
        ValueError: only one of ``ratio`` and ``scale``, a bad ``ratio``,
            ``scale``, ``dimension`` or ``confidence``, non-finite eigenvalues,
            or too few to fit.

    Example:
        >>> import numpy as np
        >>> X = np.random.default_rng(0).standard_normal((2000, 400))
        >>> X[:, 0] *= 3.0                  # one spike: theta = 8 > sqrt(0.2)
        >>> count_outliers(np.linalg.eigvalsh(X.T @ X / 2000)).n_outliers
        1
    """
    confidence = _check_confidence(confidence)
    if (ratio is None) != (scale is None):
        raise ValueError(
            "give both ratio and scale (the bulk's law), or neither (then it is "
            "fitted to the eigenvalues, which must be the whole spectrum)."
        )
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer; got {max_iter!r}.")
    x = np.sort(values_of(eigenvalues, "eigenvalues", min_size=1))[::-1]
    with timed() as meter:
        if ratio is None:
            if dimension is not None and dimension != x.size:
                raise ValueError(
                    f"dimension ({dimension}) must equal the number of eigenvalues "
                    f"({x.size}) when the law is fitted: pass the whole spectrum, "
                    "or give ratio and scale."
                )
            fit, k, how = _fit_bulk(x, confidence, zero_tol, max_iter)
            y, s, p = fit.ratio, fit.scale, x.size - k
        else:
            y, s = check_ratio(ratio), check_scale(scale)
            p = _check_dimension(dimension, x.size)
            fit, how = None, {}
        threshold = tracy_widom_threshold(p, y, s, confidence)
    out = x[x > threshold]
    rest = x[x <= threshold]
    edge = float(rest[0]) if rest.size else math.nan
    chain = np.concatenate([out, rest[:1]])
    return MarchenkoPasturOutliers(
        values=torch.as_tensor(out.copy(), dtype=torch.float64),
        bulk_edge=edge,
        n_outliers=int(out.size),
        gaps=torch.as_tensor(chain[:-1] - chain[1:], dtype=torch.float64),
        threshold=threshold,
        upper_edge=s * (1 + math.sqrt(y)) ** 2,
        ratio=y,
        scale=s,
        dimension=int(p),
        confidence=confidence,
        fit=fit,
        parameters={
            "ratio": ratio,
            "scale": scale,
            "dimension": dimension,
            "confidence": confidence,
            "zero_tol": zero_tol,
            "max_iter": max_iter,
        },
        details={
            "margin": threshold - s * (1 + math.sqrt(y)) ** 2,
            **how,
            "caveats": _caveats(fit, how, int(out.size), max(int(p), x.size)),
        },
        cost=meter.cost,
    )


def _caveats(fit: MarchenkoPasturFit | None, how: dict, k: int, p: int) -> list[str]:
    out = []
    if fit is not None:
        m = fit.n_eigenvalues * (1 - fit.zero_fraction)
        warn = max(KS_WARN, 4 / max(m, 1))
        if fit.ks_statistic > warn:
            out.append(
                f"the bulk is far from Marchenko-Pastur (KS distance "
                f"{fit.ks_statistic:.3g} > {warn:.3g} = max(0.03, 4/m), m non-zero "
                "eigenvalues, which Wishart spectra stay below): the count measures "
                "the distance from a law that does not describe the spectrum"
            )
    if k > OUTLIER_SHARE * p:
        out.append(
            f"{k} of {p} eigenvalues lie above the threshold (more than "
            f"{OUTLIER_SHARE:.0%}): a spectrum with so many is not a bulk with "
            "outliers"
        )
    if how and not how["converged"]:
        out.append(
            f"the fit-and-count iteration did not settle in {how['rounds']} rounds"
        )
    return out


def _fit_bulk(
    x: np.ndarray, confidence: float, zero_tol: float | None, max_iter: int
) -> tuple[MarchenkoPasturFit, int, dict]:
    """Fit the bulk without its outliers (``x`` descending), to a fixed point.

    Returns the last fit, the number of top eigenvalues it left out, and how
    the iteration went.
    """
    k, converged, rounds = 0, False, 0
    while rounds < max_iter:
        rounds += 1
        fit = fit_marchenko_pastur(x[k:], n_bootstrap=0, zero_tol=zero_tol)
        thr = tracy_widom_threshold(x.size - k, fit.ratio, fit.scale, confidence)
        k_new = int(np.count_nonzero(x > thr))
        if k_new == k:
            converged = True
            break
        if x.size - k_new < MIN_EIGENVALUES:
            break
        if rounds < max_iter:  # else the last fit (without k_new) is returned
            k = k_new
    return fit, k, {"rounds": rounds, "converged": converged}
