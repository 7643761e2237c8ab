"""Cox regression of censored times: calibration, coverage, separation, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

from lossgeom.analysis import hazard_regression


def _times(seed, n, beta, censor=1.5, strata=3):
    rng = np.random.default_rng(seed)
    x, z = rng.normal(size=n), rng.normal(size=n)
    group = rng.integers(0, strata, n)
    base = np.array([1.0, 2.0, 0.5])[group]  # each stratum its own baseline hazard
    t = rng.exponential(1 / (base * np.exp(beta * x + 0.5 * z)))
    return pd.DataFrame(
        {
            "x": x,
            "z": z,
            "g": group,
            "t": np.minimum(t, censor),
            "e": (t < censor) * 1.0,
        }
    )


def test_null_p_values_are_uniform_and_intervals_cover():
    ps, covered, reps = [], 0, 200
    for seed in range(reps):
        df = _times(seed, 60, 0.0)
        r = hazard_regression(
            df, "t", "e", ["x", "z"], claim="x", strata="g", standardize=False
        )
        ps.append(r.p_value)
        covered += r.ci_low < 0 < r.ci_high
    assert st.kstest(ps, "uniform").pvalue > 0.01
    # 95% coverage: binomial(200, 0.95) lies within 0.95 +- 4 sd
    assert abs(covered / reps - 0.95) < 4 * np.sqrt(0.95 * 0.05 / reps)


def test_a_planted_effect_is_recovered_with_calibrated_intervals():
    covered, reps, estimates = 0, 150, []
    for seed in range(reps):
        df = _times(1000 + seed, 120, 0.7)
        r = hazard_regression(
            df,
            "t",
            "e",
            ["x", "z"],
            claim="x",
            strata="g",
            standardize=False,
            expect="greater",
        )
        estimates.append(r.effect)
        covered += r.ci_low < 0.7 < r.ci_high
        assert r.details["events"] == int(df["e"].sum())
    assert abs(np.mean(estimates) - 0.7) < 0.05
    assert abs(covered / reps - 0.95) < 4 * np.sqrt(0.95 * 0.05 / reps)
    big = hazard_regression(
        _times(7, 2000, 0.7),
        "t",
        "e",
        ["x", "z"],
        claim="x",
        strata="g",
        standardize=False,
        expect="greater",
    )
    assert big.verdict == "supported" and big.p_value < 1e-10
    opposite = hazard_regression(
        _times(7, 2000, 0.7),
        "t",
        "e",
        ["x", "z"],
        claim="x",
        strata="g",
        standardize=False,
        expect="less",
    )
    assert opposite.verdict == "contradicted"


def test_standardized_effect_is_per_standard_deviation():
    df = _times(3, 300, 0.5)
    raw = hazard_regression(df, "t", "e", ["x"], claim="x", standardize=False)
    std = hazard_regression(df, "t", "e", ["x"], claim="x", standardize=True)
    assert std.effect == pytest.approx(raw.effect * df["x"].std(ddof=1), rel=1e-6)
    assert std.p_value == pytest.approx(raw.p_value, rel=1e-6)


def test_separation_keeps_a_valid_likelihood_ratio_p_value():
    # the group with x = 1 always has the event first: the estimate diverges
    n = 20
    x = np.r_[np.ones(n), np.zeros(n)]
    t = np.r_[np.arange(1, n + 1), np.full(n, n + 5.0)]
    e = np.r_[np.ones(n), np.zeros(n)]
    df = pd.DataFrame({"x": x, "t": t, "e": e})
    r = hazard_regression(df, "t", "e", ["x"], claim="x", expect="greater")
    assert r.p_value < 1e-4 and r.verdict == "supported"
    assert any("monotone likelihood" in c for c in r.caveats)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.assign(e=0.0), "no event"),
        (lambda d: d.assign(e=2.0), "must hold 1"),
        (lambda d: d.assign(x=1.0), "constant"),
        (lambda d: d.head(2), "at least 3 rows"),
        (lambda d: d.assign(x=np.nan), "missing values"),
    ],
)
def test_bad_input_is_named(change, message):
    df = change(_times(0, 30, 0.0))
    with pytest.raises(ValueError, match=message):
        hazard_regression(df, "t", "e", ["x"], claim="x")


def test_unknown_columns_and_terms_are_named():
    df = _times(0, 30, 0.0)
    with pytest.raises(ValueError, match="unknown columns"):
        hazard_regression(df, "t", "e", ["nope"], claim="x")
    with pytest.raises(ValueError, match="term must be one of"):
        hazard_regression(df, "t", "e", ["x"], term="z", claim="x")
