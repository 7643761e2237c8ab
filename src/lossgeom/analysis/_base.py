"""The statistics core of :mod:`lossgeom.analysis`: tests with verdicts.

Every test here returns a :class:`TestResult`: the claim in words, the test that
ran, the effect with its confidence interval, the raw and (after :func:`holm`)
adjusted p-value, a verdict and the caveats a reader should keep in mind.
Distributions and tests come from ``scipy.stats`` and ``statsmodels``; nothing
here writes its own distribution.

**The verdict rule.** Every test is two-sided, so that an effect *opposite* to
the expectation can be seen; the expected direction (``expect``) only decides
the verdict. With ``p`` the adjusted p-value when there is one (else the raw
one):

* ``"supported"`` -- ``p < alpha`` and the effect has the expected sign
  (``expect="less"``: negative, ``"greater"``: positive; ``"two-sided"``: any
  non-zero effect);
* ``"contradicted"`` -- ``p < alpha`` and the effect has the opposite sign
  (never under ``"two-sided"``);
* ``"inconclusive"`` -- otherwise, including an undefined (NaN) p-value.

The confidence interval has level ``1 - alpha``, so for the t-based tests it
excludes zero exactly when the raw p-value is below ``alpha``; it is never
adjusted for multiplicity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lossgeom._results import Result

__all__ = [
    "BootstrapCI",
    "GranulatedKendall",
    "Score",
    "TestResult",
    "VERDICT_RULE",
    "decide_verdict",
]

Expect = Literal["two-sided", "less", "greater"]
_EXPECT = ("two-sided", "less", "greater")
_LOW_N = 10  # below this many units, a caveat about power
_BATCH_ELEMENTS = 4_000_000  # elements per bootstrap batch, to bound memory

VERDICT_RULE = (
    "two-sided test; verdict 'supported' when p (Holm-adjusted when part of a "
    "family) < alpha and the effect has the expected sign, 'contradicted' when "
    "p < alpha and the sign is opposite, 'inconclusive' otherwise"
)


# ------------------------------------------------------------------- results
@dataclass(frozen=True, kw_only=True, eq=False)
class TestResult(Result):
    """A statistical test of a claim, with its effect, interval and verdict.

    Attributes:
        claim: what is tested, in words ("lambda_max is lower with small
            batches").
        test: the test that ran, e.g. ``"paired t-test (scipy.stats.ttest_rel),
            two-sided"``.
        n: the sample size (pairs, runs, cells).
        effect: the effect (mean difference, slope, tau, ...); also ``value``.
        effect_name: what ``effect`` is ("mean difference a - b", ...).
        ci_low: lower end of the confidence interval of the effect.
        ci_high: upper end of the confidence interval of the effect.
        confidence: the level of the interval (``1 - alpha``).
        p_value: the raw two-sided p-value (NaN when the test is undefined).
        p_adjusted: the Holm-adjusted p-value when part of a family
            (:func:`holm`), else ``None``.
        alpha: the significance level.
        expect: the expected direction of the effect: ``"less"`` (negative),
            ``"greater"`` (positive) or ``"two-sided"`` (any).
        verdict: ``"supported"``, ``"contradicted"`` or ``"inconclusive"`` (see
            the module docstring for the rule).
        stderr: the standard error of ``effect`` (NaN where not meaningful).
        caveats: what to keep in mind reading the verdict.
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`; ``details`` holds the test statistic and
            further numbers (effect sizes, all coefficients of a regression).
    """

    __test__ = False  # not a pytest test class, despite its name

    claim: str
    test: str
    n: int
    effect: float
    effect_name: str
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float
    p_adjusted: float | None = None
    alpha: float = 0.05
    expect: str = "two-sided"
    verdict: str = "inconclusive"
    stderr: float = math.nan
    caveats: list[str] = field(default_factory=list)

    @property
    def value(self) -> float:
        """The effect (the headline number)."""
        return self.effect

    @property
    def p(self) -> float:
        """The p-value the verdict uses: adjusted when set, else raw."""
        return self.p_value if self.p_adjusted is None else self.p_adjusted

    def scalars(self) -> dict[str, float]:
        """Effect, interval, p-values (adjusted NaN when unset), n and stderr."""
        return {
            "value": float(self.effect),
            "stderr": float(self.stderr),
            "effect": float(self.effect),
            "ci_low": float(self.ci_low),
            "ci_high": float(self.ci_high),
            "p_value": float(self.p_value),
            "p_adjusted": math.nan
            if self.p_adjusted is None
            else float(self.p_adjusted),
            "n": float(self.n),
        }

    def summary(self) -> str:
        """One line: claim, verdict, effect with interval, p-value(s)."""
        adj = "" if self.p_adjusted is None else f", Holm p = {self.p_adjusted:.3g}"
        return (
            f"{self.claim}: {self.verdict} ({self.effect_name} = {self.effect:.4g}, "
            f"{self.confidence:.0%} CI [{self.ci_low:.4g}, {self.ci_high:.4g}], "
            f"p = {self.p_value:.3g}{adj}, n = {self.n}; {self.test})"
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class BootstrapCI(Result):
    """A bootstrap confidence interval of a statistic.

    Attributes:
        value: the statistic on the data.
        stderr: the bootstrap standard error (standard deviation of the
            bootstrap distribution).
        low: lower end of the interval.
        high: upper end of the interval.
        confidence: the level of the interval.
        method: ``"BCa"``, or ``"percentile"`` where BCa is undefined.
        n: the sample size.
    """

    value: float
    stderr: float
    low: float
    high: float
    confidence: float
    method: str
    n: int
    definition: str = (
        "bootstrap confidence interval via scipy.stats.bootstrap: bias-corrected "
        "and accelerated (BCa, Efron 1987), percentile where BCa is undefined"
    )

    def scalars(self) -> dict[str, float]:
        """Value, standard error and the interval's ends."""
        return {
            "value": self.value,
            "stderr": self.stderr,
            "low": self.low,
            "high": self.high,
        }


@dataclass(frozen=True, kw_only=True, eq=False)
class GranulatedKendall(Result):
    """Jiang et al.'s granulated Kendall coefficient of a measure and a target.

    Attributes:
        value: Psi, the mean of the per-axis coefficients.
        per_axis: psi_i of each hyper-parameter axis.
        n_groups: the groups that entered each axis's mean.
        n: the cells (distinct hyper-parameter settings) after averaging
            replicates.
    """

    value: float
    per_axis: dict[str, float]
    n_groups: dict[str, int]
    n: int
    definition: str = (
        "granulated Kendall coefficient Psi (Jiang, Neyshabur, Mobahi, Krishnan "
        "and Bengio 2020, 'Fantastic generalization measures and where to find "
        "them', ICLR): for each axis i, the mean over groups in which every other "
        "axis is fixed of Kendall's tau between measure and target; Psi is the "
        "mean over axes"
    )

    def scalars(self) -> dict[str, float]:
        """Psi and every axis's psi (``psi_<axis>``)."""
        out = {"value": self.value}
        out.update({f"psi_{k}": v for k, v in self.per_axis.items()})
        return out


@dataclass(frozen=True, kw_only=True, eq=False)
class Score(Result):
    """A predictive score (out-of-fold R^2, AUROC) with a rough error bar.

    Attributes:
        name: what the score is ("out-of-fold R^2", "AUROC").
        value: the score.
        stderr: its standard error (how it is estimated is in ``definition``).
        n: the sample size.
    """

    name: str
    value: float
    stderr: float
    n: int


# ---------------------------------------------------------------- the verdict
def _check_expect(expect: str) -> None:
    if expect not in _EXPECT:
        raise ValueError(
            f"expect must be one of {_EXPECT} (the expected direction of the "
            f"effect); got {expect!r}."
        )


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), e.g. 0.05; got {alpha!r}.")


def decide_verdict(effect: float, p: float, *, alpha: float, expect: str) -> str:
    """The verdict on a claim from its effect and (adjusted) p-value.

    Args:
        effect: the estimated effect.
        p: the two-sided p-value (Holm-adjusted when part of a family).
        alpha: the significance level.
        expect: ``"less"`` (negative effect expected), ``"greater"``
            (positive) or ``"two-sided"`` (any non-zero effect).

    Returns:
        ``"supported"`` when ``p < alpha`` and the effect has the expected sign,
        ``"contradicted"`` when ``p < alpha`` and it has the opposite sign,
        ``"inconclusive"`` otherwise (also for a NaN p-value or zero effect).

    Example:
        >>> decide_verdict(-0.3, 0.01, alpha=0.05, expect="less")
        'supported'
        >>> decide_verdict(-0.3, 0.01, alpha=0.05, expect="greater")
        'contradicted'
        >>> decide_verdict(-0.3, 0.2, alpha=0.05, expect="less")
        'inconclusive'
    """
    _check_expect(expect)
    if not (p < alpha) or not (effect != 0) or math.isnan(effect):
        return "inconclusive"
    if expect == "two-sided":
        return "supported"
    expected_sign = -1.0 if expect == "less" else 1.0
    return (
        "supported" if math.copysign(1.0, effect) == expected_sign else "contradicted"
    )


def _result(
    *,
    claim: str,
    test: str,
    n: int,
    effect: float,
    effect_name: str,
    ci: tuple[float, float],
    p_value: float,
    alpha: float,
    expect: str,
    stderr: float,
    caveats: list[str],
    definition: str,
    parameters: dict[str, Any],
    details: dict[str, Any],
    cost: Any,
) -> TestResult:
    effect, p_value = float(effect), float(p_value)
    return TestResult(
        claim=claim,
        test=test,
        n=int(n),
        effect=effect,
        effect_name=effect_name,
        ci_low=float(ci[0]),
        ci_high=float(ci[1]),
        confidence=1.0 - alpha,
        p_value=p_value,
        p_adjusted=None,
        alpha=float(alpha),
        expect=expect,
        verdict=decide_verdict(effect, p_value, alpha=alpha, expect=expect),
        stderr=float(stderr),
        caveats=caveats,
        definition=f"{definition}; {VERDICT_RULE}",
        parameters=parameters,
        details=details,
        cost=cost,
    )


# ------------------------------------------------------------------- inputs
def _vector(x: Any, name: str) -> np.ndarray:
    """``x`` as a 1-D float array, refusing NaN/infinite values with a count."""
    try:
        arr = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name} must be a sequence of numbers; got {type(x).__name__} ({err})."
        ) from None
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be one-dimensional (one number per unit); got shape "
            f"{arr.shape}. Flatten it or pass one column."
        )
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        nan = int(np.count_nonzero(np.isnan(arr)))
        raise ValueError(
            f"{name} has {bad} non-finite values ({nan} NaN, {bad - nan} "
            f"infinite) among {arr.size}; the test needs finite numbers. Drop the "
            "incomplete units (for pairs, both members) before testing."
        )
    return arr


def _same_length(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.size != b.size:
        raise ValueError(
            f"{names} must have the same length (one value per unit, in the same "
            f"order); got {a.size} and {b.size}. Align them first, e.g. by seed."
        )


def _low_n(n: int, unit: str) -> list[str]:
    if n < _LOW_N:
        return [
            f"n = {n} {unit} < {_LOW_N}: low power; an inconclusive verdict is "
            "weak evidence of no effect"
        ]
    return []
