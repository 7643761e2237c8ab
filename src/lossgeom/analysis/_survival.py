"""Times to an event, some censored: Cox proportional-hazards regression.

Escape times are durations that a run may not reach within its steps (right
censoring). Least squares on such times would treat "not yet" as a value; the
Cox model (statsmodels ``PHReg``) uses a censored run only for as long as it was
observed. The p-value is the likelihood-ratio test of the term, which stays
valid when the Wald statistic breaks down (a covariate that separates the runs
that escaped from those that did not drives the estimate to infinity).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.duration.hazard_regression import PHReg
from statsmodels.tools.sm_exceptions import ConvergenceWarning

from lossgeom._results import timed
from lossgeom.analysis._base import (
    Expect,
    TestResult,
    _check_alpha,
    _check_expect,
    _low_n,
    _result,
)
from lossgeom.analysis._regression import _columns, _numeric

__all__ = ["hazard_regression"]

_SEPARATED = 10.0  # |log hazard ratio| per standard deviation beyond this: diverged


def _fit(durations, design, events, strata):
    model = PHReg(durations, design, status=events, strata=strata, ties="efron")
    return model.fit(disp=False)


def _null_llf(durations, events, strata) -> float:
    """Log partial likelihood with no covariate (each stratum's risk sets)."""
    # PHReg needs a covariate: a zero column leaves the likelihood at beta = 0
    zero = np.zeros((len(durations), 1))
    model = PHReg(durations, zero, status=events, strata=strata, ties="efron")
    return float(model.loglike(np.zeros(1)))


def hazard_regression(
    frame: pd.DataFrame,
    duration: str,
    event: str,
    x: list[str],
    *,
    claim: str,
    expect: Expect = "two-sided",
    term: str | None = None,
    strata: str | None = None,
    alpha: float = 0.05,
    standardize: bool = True,
) -> TestResult:
    """Cox regression of a censored time on covariates; test one term.

    The hazard of the event at time ``t`` is ``h0(t) exp(sum_k b_k x_k)``
    (``h0`` free, one per stratum when ``strata`` is given); a positive ``b``
    means a higher hazard, so an *earlier* event. The effect is ``b_term`` (the
    log hazard ratio, per standard deviation of ``x_term`` when
    ``standardize``), with its Wald interval; the p-value is the
    likelihood-ratio test against the model without ``term`` (chi-square, one
    degree of freedom). Ties use Efron's method.

    Args:
        frame: one row per unit (run).
        duration: the time column (steps to the event, or to the end of the
            observation when censored).
        event: 1 (or True) where the event happened, 0 where censored.
        x: covariate columns.
        claim: the claim in words.
        expect: the expected sign of ``b_term`` (``"greater"``: earlier events).
        term: the tested covariate (default: ``x[0]``).
        strata: a column whose groups get their own baseline hazard (e.g. the
            seed, when every seed starts from its own point).
        alpha: the significance level.
        standardize: z-score the covariates first.

    Returns:
        A :class:`TestResult`; ``details`` holds every coefficient with its
        interval, the hazard ratio, the likelihood-ratio statistic and the
        number of events.

    Raises:
        ValueError: unknown columns, missing values, a constant covariate, no
            event, or fewer rows than covariates + 2.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=200)
        >>> t = rng.exponential(1 / np.exp(0.8 * x))
        >>> df = pd.DataFrame({"x": x, "t": np.minimum(t, 2.0), "e": t < 2.0})
        >>> r = hazard_regression(df, "t", "e", ["x"], claim="x speeds events",
        ...                       expect="greater", standardize=False)
        >>> r.verdict, bool(r.ci_low < 0.8 < r.ci_high)
        ('supported', True)
    """
    _check_expect(expect)
    _check_alpha(alpha)
    x = [x] if isinstance(x, str) else list(x)
    if not x:
        raise ValueError("x must name at least one covariate column; got [].")
    _columns(frame, [duration, event, *x, *([strata] if strata else [])])
    term = x[0] if term is None else term
    if term not in x:
        raise ValueError(f"term must be one of the covariates {x}; got {term!r}.")
    data = _numeric(frame, [duration, event, *x])
    n = len(data)
    if n < len(x) + 2:
        raise ValueError(
            f"a hazard regression on {len(x)} covariate(s) needs at least "
            f"{len(x) + 2} rows; got {n}."
        )
    events = data[event].to_numpy(float)
    if not set(np.unique(events)) <= {0.0, 1.0}:
        raise ValueError(
            f"column {event!r} must hold 1 (event) or 0 (censored); got values "
            f"{sorted(set(np.unique(events)))[:5]}."
        )
    if events.sum() == 0:
        raise ValueError(
            f"no event in {n} rows (every {duration!r} is censored): there is "
            "nothing to regress. Observe the units for longer."
        )
    sd = data[x].std(ddof=1)
    constant = [c for c in x if not sd[c] > 0]
    if constant:
        raise ValueError(f"covariates {constant} are constant; drop or vary them.")
    covariates = (data[x] - data[x].mean()) / sd if standardize else data[x]
    groups = None if strata is None else frame.loc[data.index, strata].to_numpy()
    times = data[duration].to_numpy(float)
    with timed() as meter, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        fit = _fit(times, covariates.to_numpy(float), events, groups)
        others = [c for c in x if c != term]
        reduced = (
            float(_fit(times, covariates[others].to_numpy(float), events, groups).llf)
            if others
            else _null_llf(times, events, groups)
        )
    i = x.index(term)
    coef, se = float(fit.params[i]), float(fit.bse[i])
    lr = max(0.0, 2.0 * (float(fit.llf) - reduced))
    p = float(stats.chi2.sf(lr, df=1))
    z = float(stats.norm.ppf(1 - alpha / 2))
    caveats = _low_n(n, "rows")
    caveats.append(
        "an association in the data, not a causal effect unless the covariates "
        "were set by design"
    )
    if others:
        caveats.append(f"held fixed (in the hazard): {', '.join(others)}")
    diverged = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    if diverged or not math.isfinite(se) or abs(coef) > _SEPARATED:
        caveats.append(
            "the fit diverges (monotone likelihood: the covariate separates the "
            "units that had the event from those that did not); the estimate and "
            "its Wald interval are not meaningful, the likelihood-ratio p-value is"
        )
    ci = fit.conf_int(alpha=alpha)
    unit = " per standard deviation" if standardize else ""
    return _result(
        claim=claim,
        test="Cox proportional hazards (statsmodels PHReg, Efron ties"
        + (f", strata {strata}" if strata else "")
        + "), likelihood-ratio test of the term, two-sided",
        n=n,
        effect=coef,
        effect_name=f"log hazard ratio of {term}{unit}",
        ci=(coef - z * se, coef + z * se),
        p_value=p,
        alpha=alpha,
        expect=expect,
        stderr=se,
        caveats=caveats,
        definition=(
            f"Cox regression of the time {duration} (event {event}) on "
            f"{', '.join(x)}; likelihood-ratio test of {term}"
        ),
        parameters={
            "duration": duration,
            "event": event,
            "x": x,
            "term": term,
            "strata": strata,
            "expect": expect,
            "alpha": alpha,
            "standardize": standardize,
        },
        details={
            "events": int(events.sum()),
            "lr_statistic": lr,
            "hazard_ratio": math.exp(coef) if abs(coef) < 700 else math.inf,
            "coefficients": dict(zip(x, map(float, fit.params), strict=True)),
            "stderrs": dict(zip(x, map(float, fit.bse), strict=True)),
            "ci": {c: [float(ci[k, 0]), float(ci[k, 1])] for k, c in enumerate(x)},
        },
        cost=meter.cost,
    )
