"""Paired tests, bootstrap intervals and the Holm correction."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import scipy.stats as st
from statsmodels.stats.multitest import multipletests

from lossgeom._results import timed
from lossgeom.analysis._base import (
    _BATCH_ELEMENTS,
    BootstrapCI,
    Expect,
    TestResult,
    _check_alpha,
    _check_expect,
    _low_n,
    _result,
    _same_length,
    _vector,
    decide_verdict,
)

__all__ = [
    "bootstrap_ci",
    "holm",
    "paired_test",
]


# ---------------------------------------------------------------- bootstrap
def _bootstrap(
    data: tuple[np.ndarray, ...],
    statistic: Callable[..., Any],
    *,
    confidence: float,
    n_resamples: int,
    seed: int,
    vectorized: bool | None = True,
    batch: int | None = None,
) -> tuple[float, float, float, str]:
    """``(low, high, stderr, method)`` of scipy's bootstrap: BCa, else percentile."""
    if n_resamples < 2:
        raise ValueError(
            f"n_resamples must be at least 2 (thousands for a stable interval); "
            f"got {n_resamples}."
        )
    kwargs = dict(
        n_resamples=n_resamples,
        confidence_level=confidence,
        vectorized=vectorized,
        batch=batch,
        rng=np.random.default_rng(seed),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        res = st.bootstrap(data, statistic, method="BCa", **kwargs)
        method = "BCa"
        low, high = (float(v) for v in res.confidence_interval)
        if not (math.isfinite(low) and math.isfinite(high)):
            kwargs["n_resamples"] = 0  # reuse the bootstrap distribution
            res = st.bootstrap(
                data, statistic, method="percentile", bootstrap_result=res, **kwargs
            )
            method = "percentile"
            low, high = (float(v) for v in res.confidence_interval)
    return low, high, float(res.standard_error), method


def bootstrap_ci(
    x: Sequence[float] | np.ndarray,
    statistic: Callable[..., Any] = np.mean,
    *,
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
) -> BootstrapCI:
    """A bootstrap confidence interval of ``statistic(x)``.

    Runs ``scipy.stats.bootstrap`` with the bias-corrected and accelerated (BCa)
    interval, and falls back to the percentile interval (same resamples) where
    BCa is undefined (e.g. a degenerate bootstrap distribution).

    Args:
        x: the sample (1-D, finite).
        statistic: a function of the sample; if it takes an ``axis`` keyword
            (as ``np.mean``, ``np.median``) the resamples are evaluated at once.
        confidence: the level of the interval.
        n_resamples: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        A :class:`BootstrapCI`: ``value``, ``stderr``, ``low``, ``high``.

    Raises:
        ValueError: fewer than 2 values, non-finite values or a bad level.

    Example:
        >>> ci = bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0], n_resamples=999)
        >>> ci.value, ci.low < 3.0 < ci.high
        (3.0, True)
    """
    arr = _vector(x, "x")
    if arr.size < 2:
        raise ValueError(
            f"a bootstrap interval needs at least 2 values; got {arr.size}."
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1); got {confidence!r}.")
    with timed() as meter:
        value = float(statistic(arr))
        low, high, se, method = _bootstrap(
            (arr,),
            statistic,
            confidence=confidence,
            n_resamples=n_resamples,
            seed=seed,
            vectorized=None,
        )
    name = getattr(statistic, "__name__", type(statistic).__name__)
    return BootstrapCI(
        value=value,
        stderr=se,
        low=low,
        high=high,
        confidence=float(confidence),
        method=method,
        n=int(arr.size),
        parameters={"statistic": name, "n_resamples": n_resamples, "seed": seed},
        cost=meter.cost,
    )


# ------------------------------------------------------------------- paired
def _hodges_lehmann(d: np.ndarray, axis: int = -1) -> np.ndarray:
    """Median of the Walsh averages ``(d_i + d_j) / 2``, ``i <= j``, along ``axis``."""
    d = np.moveaxis(np.asarray(d, dtype=float), axis, -1)
    i, j = np.triu_indices(d.shape[-1])
    return np.median((d[..., i] + d[..., j]) / 2.0, axis=-1)


def _t_test(
    x: np.ndarray, y: np.ndarray, d: np.ndarray, alpha: float, caveats: list[str]
) -> tuple[dict, dict]:
    """The paired t-test's ``(details, fields)``; appends to ``caveats``."""
    n = d.size
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        p, ci, t = math.nan, (mean, mean), math.nan
        caveats.append(
            "all differences are equal: the t-test is undefined; use "
            "method='wilcoxon' or more varied pairs"
        )
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = st.ttest_rel(x, y)
            ci = tuple(res.confidence_interval(confidence_level=1.0 - alpha))
        p, t = float(res.pvalue), float(res.statistic)
    details = {
        "t": t,
        "df": n - 1,
        "cohens_dz": mean / sd if sd > 0 else math.nan,
        "mean_a": float(x.mean()),
        "mean_b": float(y.mean()),
        "sd_difference": sd,
    }
    out = dict(
        test="paired t-test (scipy.stats.ttest_rel), two-sided",
        effect=mean,
        effect_name="mean difference a - b",
        ci=ci,
        p_value=p,
        stderr=sd / math.sqrt(n),
        definition=(
            "paired t-test of the mean difference a - b (Student 1908); "
            f"{1 - alpha:.0%} interval from the t distribution with n - 1 "
            "degrees of freedom"
        ),
    )
    return details, out


def _wilcoxon(
    d: np.ndarray,
    alpha: float,
    caveats: list[str],
    n_resamples: int,
    seed: int,
) -> tuple[dict, dict]:
    """The Wilcoxon signed-rank test's ``(details, fields)``; appends to ``caveats``."""
    n = d.size
    nonzero = int(np.count_nonzero(d))
    if nonzero == 0:
        p, w = 1.0, 0.0
        caveats.append("all differences are zero")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = st.wilcoxon(d)
        p, w = float(res.pvalue), float(res.statistic)
    if nonzero < n:
        caveats.append(f"{n - nonzero} zero differences dropped (zero_method='wilcox')")
    if 0 < nonzero and 2.0 / 2.0**nonzero >= alpha:
        caveats.append(
            f"with {nonzero} non-zero differences the smallest possible "
            f"p-value is 2/2^{nonzero} = {2.0 / 2.0**nonzero:.3g} >= alpha: "
            "the test cannot find an effect; run more seeds"
        )
    pairs = n * (n + 1) // 2
    low, high, se, ci_method = _bootstrap(
        (d,),
        _hodges_lehmann,
        confidence=1.0 - alpha,
        n_resamples=n_resamples,
        seed=seed,
        batch=max(1, _BATCH_ELEMENTS // pairs),
    )
    details = {
        "w": w,
        "nonzero_differences": nonzero,
        "median_difference": float(np.median(d)),
        "ci_method": ci_method,
    }
    out = dict(
        test="Wilcoxon signed-rank test (scipy.stats.wilcoxon), two-sided",
        effect=float(_hodges_lehmann(d)),
        effect_name="Hodges-Lehmann estimate of a - b",
        ci=(low, high),
        p_value=p,
        stderr=se,
        definition=(
            "Wilcoxon (1945) signed-rank test of the differences a - b; "
            "effect: Hodges-Lehmann (1963) estimate, the median of the "
            "Walsh averages (d_i + d_j) / 2, i <= j; interval: bootstrap "
            f"({ci_method})"
        ),
    )
    return details, out


def paired_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    claim: str,
    expect: Expect = "two-sided",
    alpha: float = 0.05,
    method: Literal["t", "wilcoxon"] = "t",
    n_resamples: int = 9999,
    seed: int = 0,
) -> TestResult:
    """Test whether paired values ``a`` and ``b`` differ (effect: ``a - b``).

    * ``method="t"``: the paired t-test (``scipy.stats.ttest_rel``); the effect
      is the mean difference with its t interval (n - 1 degrees of freedom);
      Cohen's d_z (mean / standard deviation of the differences) is in
      ``details``.
    * ``method="wilcoxon"``: the Wilcoxon signed-rank test
      (``scipy.stats.wilcoxon``; zero differences dropped, exact for small
      samples without ties); the effect is the Hodges-Lehmann estimate (median
      of the Walsh averages of the differences) with a bootstrap interval
      (:func:`bootstrap_ci`'s rule: BCa, else percentile).

    ``expect="less"`` claims ``a`` is lower than ``b``. The verdict rule is in
    the module docstring.

    Args:
        a: one value per unit (e.g. per seed) under the first condition.
        b: the paired values under the second condition, in the same order.
        claim: the claim in words.
        expect: the expected direction of ``a - b``.
        alpha: the significance level (the interval has level ``1 - alpha``).
        method: ``"t"`` or ``"wilcoxon"``.
        n_resamples: bootstrap resamples of the Wilcoxon interval.
        seed: seed of the bootstrap.

    Returns:
        A :class:`TestResult`.

    Raises:
        ValueError: fewer than 2 pairs, unequal lengths, non-finite values, an
            unknown ``method`` or ``expect``.

    Example:
        >>> r = paired_test([1.0, 2.1, 2.9, 4.2], [1.5, 2.6, 3.2, 4.9],
        ...                 claim="a is lower than b", expect="less")
        >>> r.verdict, round(r.effect, 3), r.ci_high < 0
        ('supported', -0.5, True)
    """
    _check_expect(expect)
    _check_alpha(alpha)
    if method not in ("t", "wilcoxon"):
        raise ValueError(f"method must be 't' or 'wilcoxon'; got {method!r}.")
    x, y = _vector(a, "a"), _vector(b, "b")
    _same_length(x, y, "a and b")
    n = x.size
    if n < 2:
        raise ValueError(
            f"a paired test needs at least 2 pairs (more than 5 for a Wilcoxon "
            f"p-value that can fall below 0.05); got {n}. Run more seeds."
        )
    d = x - y
    caveats = _low_n(n, "pairs")
    parameters = {"expect": expect, "alpha": alpha, "method": method}
    with timed() as meter:
        if method == "t":
            details, out = _t_test(x, y, d, alpha, caveats)
        else:
            details, out = _wilcoxon(d, alpha, caveats, n_resamples, seed)
            parameters.update(n_resamples=n_resamples, seed=seed)
    return _result(
        claim=claim,
        n=n,
        alpha=alpha,
        expect=expect,
        caveats=caveats,
        parameters=parameters,
        details=details,
        cost=meter.cost,
        **out,
    )


# --------------------------------------------------------------------- holm
def holm(results: Sequence[TestResult]) -> list[TestResult]:
    """Holm-Bonferroni correction of a family of tests; verdicts recomputed.

    Uses ``statsmodels.stats.multitest.multipletests(method="holm")`` on the raw
    p-values (Holm 1979; controls the family-wise error rate). Each returned
    result is a copy with ``p_adjusted`` set and its verdict decided on the
    adjusted p-value at its own ``alpha``. Results with an undefined (NaN)
    p-value stay out of the family and keep ``p_adjusted`` NaN.

    Args:
        results: the family, e.g. every test of one hypothesis.

    Returns:
        New results in the same order.

    Raises:
        TypeError: an element is not a :class:`TestResult`.

    Example:
        >>> rs = [paired_test([1, 2, 3.1], [2, 3.2, 4.1], claim=c, expect="less")
        ...       for c in ("first", "second")]
        >>> [r.p_adjusted == min(1.0, 2 * r.p_value) for r in holm(rs)]
        [True, True]
    """
    results = list(results)
    for i, r in enumerate(results):
        if not isinstance(r, TestResult):
            raise TypeError(
                f"holm expects TestResults (from paired_test, regression, "
                f"kendall); element {i} is a {type(r).__name__}."
            )
    if not results:
        return []
    p = np.array([r.p_value for r in results], dtype=float)
    ok = ~np.isnan(p)
    adjusted = np.full(p.shape, math.nan)
    if ok.any():
        adjusted[ok] = multipletests(p[ok], method="holm")[1]
    m = int(ok.sum())
    out = []
    for r, q in zip(results, adjusted, strict=True):
        q = float(q)
        note = (
            f"p adjusted by Holm over a family of {m} tests; the interval is not "
            "adjusted"
        )
        caveats = [c for c in r.caveats if not c.startswith("p adjusted by Holm")]
        out.append(
            replace(
                r,
                p_adjusted=q,
                verdict=decide_verdict(r.effect, q, alpha=r.alpha, expect=r.expect),
                caveats=[*caveats, note],
                details={**r.details, "holm_family_size": m},
            )
        )
    return out
