"""Ordinary least squares with one term tested (statsmodels)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import statsmodels.api as sm

from lossgeom._results import timed
from lossgeom.analysis._base import (
    Expect,
    TestResult,
    _check_alpha,
    _check_expect,
    _low_n,
    _result,
)

__all__ = [
    "regression",
]


# ---------------------------------------------------------------- regression
def _columns(frame: Any, names: list[str]) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(
            f"expected a pandas DataFrame (e.g. lossgeom.study.load(path)); got "
            f"{type(frame).__name__}."
        )
    missing = [c for c in names if c not in frame.columns]
    if missing:
        raise ValueError(
            f"unknown columns {missing}; the frame has {list(frame.columns)}. "
            "Check the spelling (config paths look like 'optim.lr')."
        )


def _numeric(frame: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """The columns as floats, refusing text columns and missing values."""
    out = {}
    for c in names:
        col = frame[c]
        if col.dtype == bool:
            col = col.astype(float)
        if not pd.api.types.is_numeric_dtype(col):
            raise ValueError(
                f"column {c!r} is not numeric (dtype {col.dtype}); regression "
                "needs numbers. Encode categories first, e.g. with pd.get_dummies."
            )
        out[c] = col.astype(float)
    data = pd.DataFrame(out, index=frame.index)
    bad = data.isna().sum()
    if bad.any():
        counts = {k: int(v) for k, v in bad.items() if v}
        raise ValueError(
            f"missing values in {counts} (of {len(data)} rows); drop those rows "
            "first, e.g. frame.dropna(subset=[...])."
        )
    return data


def regression(
    frame: pd.DataFrame,
    y: str,
    x: list[str],
    *,
    claim: str,
    expect: Expect = "two-sided",
    term: str | None = None,
    alpha: float = 0.05,
    robust: bool = False,
    standardize: bool = False,
) -> TestResult:
    """Ordinary least squares of ``y`` on ``x`` (with an intercept); test one term.

    Fits ``y = b0 + sum_k b_k x_k + e`` with ``statsmodels.OLS`` and tests
    ``b_term = 0`` with a two-sided t-test (robust: HC3 standard errors,
    MacKinnon and White 1985). The result's effect is ``b_term``, with its
    interval and p-value; ``details`` holds R^2, adjusted R^2 and every
    coefficient with its interval and p-value.

    Args:
        frame: one row per unit (run, setting).
        y: the response column.
        x: the regressor columns (numbers; encode categories first).
        claim: the claim in words.
        expect: the expected sign of ``b_term``.
        term: the tested regressor (default: ``x[0]``).
        alpha: the significance level (the intervals have level ``1 - alpha``).
        robust: use heteroscedasticity-consistent (HC3) standard errors.
        standardize: z-score ``y`` and ``x`` first, so coefficients are in
            standard deviations of ``y`` per standard deviation of ``x``.

    Returns:
        A :class:`TestResult` for ``term``.

    Raises:
        TypeError: ``frame`` is not a DataFrame.
        ValueError: unknown or non-numeric columns, missing values, a constant
            or collinear regressor, or too few rows.

    Example:
        >>> df = pd.DataFrame({"lr": [0.1, 0.2, 0.3, 0.4, 0.5],
        ...                    "sharp": [9.0, 7.1, 5.2, 2.9, 1.0]})
        >>> r = regression(df, "sharp", ["lr"], claim="lr lowers sharpness",
        ...                expect="less")
        >>> r.verdict, round(r.effect, 2)
        ('supported', -20.2)
    """
    _check_expect(expect)
    _check_alpha(alpha)
    if isinstance(x, str):
        x = [x]
    x = list(x)
    if not x:
        raise ValueError("x must name at least one regressor column; got [].")
    _columns(frame, [y, *x])
    if y in x:
        raise ValueError(f"the response {y!r} is also among the regressors {x}.")
    if len(set(x)) != len(x):
        raise ValueError(f"x names a column twice: {x}.")
    term = x[0] if term is None else term
    if term not in x:
        raise ValueError(
            f"term must be one of the regressors {x}; got {term!r}. Add it to x."
        )
    data = _numeric(frame, [y, *x])
    n, k = len(data), len(x)
    if n < k + 2:
        raise ValueError(
            f"a regression on {k} regressor(s) with an intercept needs at least "
            f"{k + 2} rows (for one residual degree of freedom); got {n}."
        )
    sd = data.std(ddof=1)
    constant = [c for c in [y, *x] if not sd[c] > 0]
    if constant:
        raise ValueError(
            f"columns {constant} are constant; a constant regressor cannot be "
            "told apart from the intercept (a constant response has nothing to "
            "explain). Drop it or vary it."
        )
    if standardize:
        data = (data - data.mean()) / sd
    design = sm.add_constant(data[x], has_constant="add")
    if np.linalg.matrix_rank(design.to_numpy()) < k + 1:
        raise ValueError(
            f"the regressors {x} are collinear (with each other or the "
            "intercept); their effects cannot be separated. Drop one of them."
        )
    with timed() as meter:
        model = sm.OLS(data[y], design)
        fit = model.fit(cov_type="HC3", use_t=True) if robust else model.fit()
        ci = fit.conf_int(alpha=alpha)
    names = list(design.columns)
    others = [c for c in x if c != term]
    caveats = _low_n(n, "rows")
    caveats.append(
        "an association in the data, not a causal effect unless the regressors "
        "were set by design"
    )
    if others:
        caveats.append(f"held fixed (linearly): {', '.join(others)}")
    if robust:
        caveats.append("HC3 robust standard errors")
    se_kind = "HC3 robust" if robust else "classical"
    unit = "standardised " if standardize else ""
    return _result(
        claim=claim,
        test=(
            f"OLS t-test of the coefficient (statsmodels.OLS, {se_kind} "
            "standard errors), two-sided"
        ),
        n=n,
        effect=float(fit.params[term]),
        effect_name=f"{unit}coefficient of {term}",
        ci=(float(ci.loc[term, 0]), float(ci.loc[term, 1])),
        p_value=float(fit.pvalues[term]),
        alpha=alpha,
        expect=expect,
        stderr=float(fit.bse[term]),
        caveats=caveats,
        definition=(
            f"ordinary least squares of {y} on {', '.join(x)} with an intercept; "
            f"t-test of the coefficient of {term} with {se_kind} standard errors"
        ),
        parameters={
            "y": y,
            "x": x,
            "term": term,
            "expect": expect,
            "alpha": alpha,
            "robust": robust,
            "standardize": standardize,
        },
        details={
            "r2": float(fit.rsquared),
            "r2_adjusted": float(fit.rsquared_adj),
            "df_resid": float(fit.df_resid),
            "coefficients": {c: float(fit.params[c]) for c in names},
            "stderrs": {c: float(fit.bse[c]) for c in names},
            "ci": {c: [float(ci.loc[c, 0]), float(ci.loc[c, 1])] for c in names},
            "p_values": {c: float(fit.pvalues[c]) for c in names},
        },
        cost=meter.cost,
    )
