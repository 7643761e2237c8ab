"""Power-law fits: recovery, interval coverage, calibrated p-values, bad input."""

import math

import numpy as np
import pytest
import scipy.stats as st

import lossgeom as lg
from lossgeom.analysis import PowerLawFit, TestResult, fit_power_law, holm

WIDTHS = np.repeat([16.0, 32.0, 64.0, 128.0, 256.0], 3)  # 5 widths x 3 seeds


def _planted(seed, b=-0.5, a=2.0, noise=0.3, x=WIDTHS):
    rng = np.random.default_rng(seed)
    return a * x**b * np.exp(noise * rng.standard_normal(x.size))


def test_recovers_a_planted_power_law():
    y = _planted(0, b=-0.7, a=3.0, noise=0.02)
    fit = fit_power_law(WIDTHS, y, n_resamples=999)
    assert isinstance(fit, PowerLawFit) and isinstance(fit, TestResult)
    assert abs(fit.exponent + 0.7) < 4 * fit.stderr < 0.02
    assert fit.prefactor == pytest.approx(3.0, rel=0.05)
    assert fit.ci_low < fit.exponent < fit.ci_high and fit.ci_high - fit.ci_low < 0.03
    assert fit.prefactor_ci_low < fit.prefactor < fit.prefactor_ci_high
    assert fit.r_squared > 0.99 and fit.verdict == "supported"
    assert fit.n == 15 and fit.n_distinct_x == 5
    assert fit.predict([16.0, 256.0]) == pytest.approx(
        3.0 * np.array([16, 256]) ** -0.7, rel=0.05
    )
    lo, hi = fit.details["t_interval"]
    assert lo < fit.exponent < hi


@pytest.mark.parametrize("design", ["5x3", "8x2"])
def test_intervals_cover_at_the_nominal_rate(design):
    # 400 planted laws with log-normal noise: the 95% intervals of b and a cover
    # the truth in 95% of them (binomial sd 1.1%; tolerance 3.3 sd)
    x = WIDTHS if design == "5x3" else np.repeat(2.0 ** np.arange(3, 11), 2)
    hits_b = hits_a = 0
    reps = 400
    for seed in range(reps):
        fit = fit_power_law(x, _planted(seed, x=x), n_resamples=499, seed=seed)
        hits_b += fit.ci_low <= -0.5 <= fit.ci_high
        hits_a += fit.prefactor_ci_low <= 2.0 <= fit.prefactor_ci_high
    for hits in (hits_b, hits_a):
        assert abs(hits / reps - 0.95) < 0.037, hits / reps


def test_without_a_trend_p_values_are_uniform():
    p = np.array(
        [
            fit_power_law(WIDTHS, _planted(s, b=0.0), n_resamples=100).p_value
            for s in range(400)
        ]
    )
    assert st.kstest(p, "uniform").pvalue > 0.01
    assert abs(np.mean(p < 0.05) - 0.05) < 0.035
    fit = fit_power_law(WIDTHS, _planted(3, b=0.0), n_resamples=100)
    assert fit.verdict in ("inconclusive", "supported")


def test_verdict_follows_the_expected_direction_and_holm():
    y = _planted(1, b=-0.5, noise=0.05)
    assert fit_power_law(WIDTHS, y, expect="less").verdict == "supported"
    assert fit_power_law(WIDTHS, y, expect="greater").verdict == "contradicted"
    flat = fit_power_law(WIDTHS, _planted(2, b=0.0), n_resamples=200)
    family = holm([fit_power_law(WIDTHS, y, n_resamples=200), flat])
    assert all(isinstance(f, PowerLawFit) for f in family)
    assert family[0].p_adjusted >= family[0].p_value
    assert "Holm" in family[1].caveats[-1]


def test_accepts_repeated_x_lists_and_an_exact_law(tmp_path):
    x = [1, 2, 4, 8]
    fit = fit_power_law(x, [5.0 * v**1.5 for v in x], n_resamples=200)
    assert fit.exponent == pytest.approx(1.5) and fit.prefactor == pytest.approx(5.0)
    assert fit.ci_low == fit.ci_high == fit.exponent
    assert any("exactly on a power law" in c for c in fit.caveats)
    assert any("cover too rarely" in c for c in fit.caveats)
    back = lg.load_result(fit.save(tmp_path / "fit"))
    assert isinstance(back, PowerLawFit) and back.exponent == fit.exponent
    assert all(isinstance(v, float) for v in fit.scalars().values())
    assert "x^" in fit.summary() and "log-log" in fit.definition


def test_same_seed_same_interval():
    y = _planted(4)
    a = fit_power_law(WIDTHS, y, n_resamples=300, seed=7)
    b = fit_power_law(WIDTHS, y, n_resamples=300, seed=7)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        ([1, 2, 0, 4], [1, 2, 3, 4], "x must be positive"),
        ([1, 2, 3, 4], [1, -2, 3, 4], "y must be positive"),
        ([1, 2, 3, math.nan], [1, 2, 3, 4], "x has 1 non-finite"),
        ([1, 2, 3, 4], [1, 2, math.inf, 4], "y has 1 non-finite"),
        ([1, 1, 2, 2, 2], [1, 2, 3, 4, 5], "at least 3 distinct x"),
        ([1, 2, 3], [1, 2], "same length"),
    ],
)
def test_bad_input_is_refused(x, y, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(x, y)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="n_resamples"):
        fit_power_law([1, 2, 3], [1, 2, 3], n_resamples=10)
    with pytest.raises(ValueError, match="alpha"):
        fit_power_law([1, 2, 3], [1, 2, 3], alpha=1.5)
    with pytest.raises(ValueError, match="expect"):
        fit_power_law([1, 2, 3], [1, 2, 3], expect="up")
