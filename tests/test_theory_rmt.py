"""Random-matrix theory: the Marchenko-Pastur law, its fit, spikes and outliers.

Every check samples Wishart matrices in float64 from fixed seeds and compares
with the limit law at tolerances calibrated to the finite-size fluctuations
(bulk eigenvalues are rigid to O(log p / p), the top edge fluctuates by
O(n^-2/3), a separated spike by O(n^-1/2)); none pins a random output.
"""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

import lossgeom as lg
from lossgeom.linalg import DenseOperator, kpm_density
from lossgeom.theory import (
    MarchenkoPasturFit,
    MarchenkoPasturOutliers,
    bbp_threshold,
    count_outliers,
    fit_marchenko_pastur,
    marchenko_pastur,
    marchenko_pastur_cdf,
    mp_edges,
    spiked_outliers,
)
from lossgeom.theory._rmt import wishart_eigenvalues
from lossgeom.theory._rmt_outliers import TW1_QUANTILES, tracy_widom_threshold

RATIOS = [0.1, 0.5, 1.0, 2.0, 5.0]


def _wishart(n, p, scale=1.0, seed=0, spikes=()):
    """Eigenvalues (ascending) of (1/n) Y^T Y, rows of Y ~ N(0, scale (I + diag))."""
    X = np.random.default_rng(seed).standard_normal((n, p))
    std = np.full(p, math.sqrt(scale))
    for i, theta in enumerate(spikes):
        std[i] = math.sqrt(scale * (1 + theta))
    Y = X * std
    return np.linalg.eigvalsh(Y.T @ Y / n)


# ------------------------------------------------------------------ the law
@pytest.mark.parametrize("ratio", RATIOS)
def test_density_with_point_mass_integrates_to_one_and_has_the_moments(ratio):
    scale = 1.7
    lo, hi = mp_edges(ratio, scale)

    def f(x):
        return marchenko_pastur(x, ratio, scale).item()

    points = [lo, hi] if lo > 0 else [hi]
    mass = quad(f, 0, hi * 1.1, points=points, limit=400)[0]
    atom = marchenko_pastur_cdf(0.0, ratio, scale).item()
    assert atom == pytest.approx(max(0.0, 1 - 1 / ratio), abs=1e-15)
    assert mass + atom == pytest.approx(1.0, abs=1e-8)
    mean = quad(lambda x: x * f(x), 0, hi * 1.1, points=points, limit=400)[0]
    second = quad(lambda x: x * x * f(x), 0, hi * 1.1, points=points, limit=400)[0]
    assert mean == pytest.approx(scale, rel=1e-8)
    assert second == pytest.approx(scale**2 * (1 + ratio), rel=1e-8)
    # the closed-form CDF is the integral of the density
    for x in np.linspace(lo, hi, 9)[1:]:
        integral = quad(f, 0, x, points=[p for p in points if p < x], limit=400)[0]
        assert marchenko_pastur_cdf(x, ratio, scale).item() == pytest.approx(
            atom + integral, abs=1e-9
        )


def test_density_keeps_shape_device_and_dtype_and_vanishes_outside_the_bulk():
    x = torch.tensor([[-1.0, 0.5], [2.0, 9.0]], dtype=torch.float32)
    out = marchenko_pastur(x, 0.5)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out[0, 0] == 0 and out[1, 1] == 0 and out[0, 1] > 0
    assert marchenko_pastur([0.1, 1.0], 0.5).dtype == torch.float64
    assert mp_edges(1.0, 2.0) == (0.0, 8.0)


@pytest.mark.parametrize(("n", "p"), [(2000, 1000), (500, 1000)])
def test_density_matches_a_histogram_of_a_wishart_spectrum(n, p):
    ratio, scale = p / n, 0.8
    ev = wishart_eigenvalues(p, n, scale, np.random.default_rng(1))
    zeros = np.abs(ev) < 1e-9 * ev.max()
    assert zeros.mean() == pytest.approx(max(0.0, 1 - 1 / ratio), abs=1e-12)
    lo, hi = mp_edges(ratio, scale)
    edges = np.linspace(lo, hi, 31)
    counts = np.histogram(ev[~zeros], bins=edges)[0] / p
    F = marchenko_pastur_cdf(edges, ratio, scale).numpy()
    # bin masses agree to 0.005 (each bin holds about 1/30, fluctuations ~ 1/p)
    assert np.abs(counts - np.diff(F)).max() < 5e-3


def test_bidiagonal_sampler_has_the_dense_wishart_distribution():
    rng = np.random.default_rng(0)
    for n, p in [(60, 30), (20, 50)]:
        dense = np.array(
            [np.linalg.eigvalsh(X.T @ X / n) for X in rng.standard_normal((400, n, p))]
        )
        fast = np.array([wishart_eigenvalues(p, n, 1.0, rng) for _ in range(400)])
        for col in (0, -1, p // 2):
            se = math.hypot(dense[:, col].std(), fast[:, col].std()) / math.sqrt(400)
            assert abs(dense[:, col].mean() - fast[:, col].mean()) < 4 * se + 1e-12
        assert fast[:, -1].std() == pytest.approx(dense[:, -1].std(), rel=0.2)


def test_tracy_widom_margin_has_its_false_alarm_rate():
    # the top eigenvalue of a spike-free Wishart spectrum exceeds the threshold
    # with probability 1 - confidence (Johnstone 2001): 2,000 spectra
    rng = np.random.default_rng(3)
    p, n = 100, 250
    top = np.array([wishart_eigenvalues(p, n, 1.0, rng)[-1] for _ in range(2000)])
    for conf in TW1_QUANTILES:
        rate = np.mean(top > tracy_widom_threshold(p, p / n, 1.0, conf))
        se = math.sqrt((1 - conf) * conf / 2000)
        assert abs(rate - (1 - conf)) < 4 * se + 0.01, (conf, rate)


# -------------------------------------------------------------------- fits
@pytest.mark.parametrize(
    ("n", "p", "dense"),
    [
        (2000, 200, True),
        (1000, 300, True),
        (500, 400, True),
        (200, 500, True),
        (1200, 1000, False),
        (400, 2000, False),
    ],
)
def test_fit_recovers_ratio_and_scale_within_two_percent(n, p, dense):
    # dense: eigenvalues of X^T X; else the bidiagonal model of the same law
    scale = 2.5
    if dense:
        ev = _wishart(n, p, scale, seed=n + p)
    else:
        ev = wishart_eigenvalues(p, n, scale, np.random.default_rng(n + p))
    fit = fit_marchenko_pastur(ev, n_bootstrap=10)
    assert fit.converged and fit.source == "eigenvalues" and fit.dimension == p
    assert fit.ratio == pytest.approx(p / n, rel=0.02)
    assert fit.scale == pytest.approx(scale, rel=0.02)
    assert 0 < fit.ratio_stderr < 0.02 * fit.ratio and 0 < fit.scale_stderr
    assert fit.upper_edge == pytest.approx(mp_edges(fit.ratio, fit.scale)[1])
    assert fit.point_mass == pytest.approx(max(0.0, 1 - n / p), abs=0.01)
    assert fit.ks_statistic < 0.03


def test_fit_standard_errors_match_the_spread_of_fits():
    # 16 independent spectra: the spread of the fitted ratio is the bootstrap
    # standard error (within the chi-square scatter of 16 draws)
    rng = np.random.default_rng(5)
    p, n, scale = 150, 300, 1.0
    fits = [
        fit_marchenko_pastur(wishart_eigenvalues(p, n, scale, rng), n_bootstrap=20)
        for _ in range(16)
    ]
    spread = np.std([f.ratio for f in fits], ddof=1)
    reported = np.median([f.ratio_stderr for f in fits])
    assert 0.5 < reported / spread < 2.0
    spread = np.std([f.scale for f in fits], ddof=1)
    reported = np.median([f.scale_stderr for f in fits])
    assert 0.5 < reported / spread < 2.0
    # the goodness-of-fit p-values of true Marchenko-Pastur spectra are not small
    assert np.median([f.ks_pvalue for f in fits]) > 0.1


def test_fit_rejects_a_spectrum_that_is_not_marchenko_pastur():
    rng = np.random.default_rng(0)
    ev = np.concatenate([rng.uniform(0.5, 1.0, 300), rng.uniform(3.0, 4.0, 100)])
    fit = fit_marchenko_pastur(ev, n_bootstrap=20)
    assert fit.ks_statistic > 0.05 and fit.ks_pvalue < 0.05


@pytest.mark.parametrize(("n", "p"), [(1000, 300), (200, 400)])
def test_fit_to_an_slq_density_of_a_wishart_operator(n, p):
    # the SLQ quadrature (30 probes x 30 nodes) recovers the law to 6%, within
    # 3 jackknife standard errors: the probes' randomness dominates (a
    # Rademacher probe's Rayleigh quotient of W scatters by scale sqrt(2 / n),
    # its weight in the null space by about sqrt(2 / p))
    scale = 1.5
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(n, p, generator=gen, dtype=torch.float64)
    dens = lg.density(DenseOperator(scale * X.T @ X / n), 30, 30, seed=0)
    fit = fit_marchenko_pastur(density=dens)
    assert fit.source == "density" and fit.dimension == p
    for got, true, se in [
        (fit.ratio, p / n, fit.ratio_stderr),
        (fit.scale, scale, fit.scale_stderr),
    ]:
        assert got == pytest.approx(true, rel=0.06)
        assert abs(got - true) < 3 * se + 0.01 * true
    assert fit.zero_fraction == pytest.approx(max(0.0, 1 - n / p), abs=0.05)
    assert fit.ks_statistic < 0.05


def test_fit_to_a_kpm_density_on_its_grid():
    n, p, scale = 1000, 400, 1.0
    gen = torch.Generator().manual_seed(8)
    X = torch.randn(n, p, generator=gen, dtype=torch.float64)
    # KPM's own error dominates: its CDF is within 0.015 of the law with 240
    # moments (0.04 with 120)
    dens = kpm_density(DenseOperator(X.T @ X / n), 10, 240, seed=0)
    fit = fit_marchenko_pastur(density=dens)
    assert fit.source == "density-grid" and fit.dimension is None
    assert fit.ratio == pytest.approx(p / n, rel=0.1)
    assert fit.scale == pytest.approx(scale, rel=0.05)
    assert math.isnan(fit.ratio_stderr)


def test_fit_result_reads_back_and_evaluates_its_law(tmp_path):
    fit = fit_marchenko_pastur(_wishart(400, 200, seed=2), n_bootstrap=5)
    back = lg.load_result(fit.save(tmp_path / "fit"))
    assert isinstance(back, MarchenkoPasturFit) and back.ratio == fit.ratio
    assert all(isinstance(v, float) for v in fit.scalars().values())
    assert fit.n_samples == pytest.approx(200 / fit.ratio)
    assert torch.equal(
        fit.cdf([1.0]), marchenko_pastur_cdf([1.0], fit.ratio, fit.scale)
    )
    assert "ratio" in fit.summary() and "Marchenko" in fit.definition


# ------------------------------------------------------------------ spikes
def test_bbp_threshold_and_spike_positions_are_continuous_at_the_threshold():
    for ratio in RATIOS:
        crit = bbp_threshold(ratio)
        assert crit == pytest.approx(math.sqrt(ratio))
        at = spiked_outliers([crit, crit * (1 + 1e-9), 0.5 * crit], ratio, 2.0)
        edge = mp_edges(ratio, 2.0)[1]
        assert at.tolist() == pytest.approx([edge] * 3, rel=1e-8)
    # below the lower edge for a negative spike beyond -sqrt(ratio), ratio < 1
    low = spiked_outliers([-0.8, -0.2], 0.25).tolist()
    assert low[0] == pytest.approx(0.2 * (1 + 0.25 / -0.8)) and low[0] < 0.25
    assert low[1] == pytest.approx(mp_edges(0.25)[0])


def test_spikes_above_the_threshold_land_at_the_predicted_positions():
    n, p, scale = 2000, 320, 1.3
    ratio = p / n
    spikes = [1.0, 3.0, 6.0]  # threshold sqrt(0.16) = 0.4
    predicted = spiked_outliers(spikes, ratio, scale).numpy()
    top = _wishart(n, p, scale, seed=11, spikes=spikes)[-3:]
    # the fluctuation of a separated eigenvalue (Paul 2007, Thm. 3, real case):
    # sd = scale * sqrt(2 l^2 (1 - ratio / theta^2) / n), l = 1 + theta
    theta = np.asarray(spikes)
    sd = scale * np.sqrt(2 * (1 + theta) ** 2 * (1 - ratio / theta**2) / n)
    assert np.all(np.abs(top - predicted) < 4 * sd), (top, predicted, sd)
    assert np.all(top > mp_edges(ratio, scale)[1])


def test_spikes_below_the_threshold_do_not_separate():
    n, p, scale = 1200, 300, 1.0
    ratio = p / n
    for seed in range(2):
        ev = _wishart(n, p, scale, seed=seed, spikes=[0.25, 0.4])  # < 0.5
        res = count_outliers(ev, ratio, scale)
        assert res.n_outliers == 0
        assert count_outliers(ev).n_outliers == 0


@pytest.mark.parametrize(("n", "p"), [(1000, 400), (300, 600)])
def test_count_outliers_finds_the_planted_number(n, p):
    ratio, scale = p / n, 0.7
    crit = bbp_threshold(ratio)
    spikes = [2 * crit + 0.5, 4 * crit + 1, 8 * crit + 2]
    ev = _wishart(n, p, scale, seed=4, spikes=spikes)
    fitted = count_outliers(ev)
    assert isinstance(fitted, MarchenkoPasturOutliers)
    assert fitted.n_outliers == 3 and fitted.details["converged"]
    assert fitted.ratio == pytest.approx((p - 3) / n, rel=0.03)
    assert fitted.scale == pytest.approx(scale, rel=0.03)
    assert fitted.values.tolist() == sorted(ev[-3:].tolist(), reverse=True)
    assert fitted.bulk_edge == ev[-4] < fitted.threshold
    # with the law given, from the top eigenvalues only
    given = count_outliers(ev[-20:], ratio, scale, dimension=p)
    assert given.n_outliers == 3 and given.dimension == p
    assert given.threshold > given.upper_edge
    assert fitted.scalars()["value"] == 3.0


def test_count_outliers_rarely_finds_one_in_spike_free_spectra():
    rng = np.random.default_rng(9)
    p, n = 300, 600
    found = [
        count_outliers(wishart_eigenvalues(p, n, 1.0, rng)).n_outliers
        for _ in range(40)
    ]
    assert sum(f > 0 for f in found) <= 3  # expected about 1% (plus fit error)


def test_count_outliers_warns_when_the_bulk_is_not_marchenko_pastur():
    rng = np.random.default_rng(0)
    two_bulks = np.concatenate([rng.uniform(0.5, 1, 300), rng.uniform(3, 4, 200)])
    res = count_outliers(two_bulks)
    assert any("far from Marchenko-Pastur" in c for c in res.details["caveats"])
    heavy = count_outliers(rng.lognormal(sigma=2.0, size=500))
    assert any("not a bulk with outliers" in c for c in heavy.details["caveats"])
    clean = count_outliers(_wishart(600, 300, seed=3))
    assert clean.details["caveats"] == []


# -------------------------------------------------------------- bad input
@pytest.mark.parametrize("ratio", [0, -1.0, math.inf, math.nan])
def test_bad_ratio_is_refused_naming_it(ratio):
    for call in (
        lambda: marchenko_pastur([1.0], ratio),
        lambda: mp_edges(ratio),
        lambda: bbp_threshold(ratio),
        lambda: spiked_outliers([1.0], ratio),
        lambda: count_outliers([1.0, 2.0], ratio, 1.0),
    ):
        with pytest.raises(ValueError, match="ratio must lie in"):
            call()
    with pytest.raises(TypeError, match="ratio must be a number"):
        mp_edges("half")


@pytest.mark.parametrize("scale", [0.0, -2.0, math.inf])
def test_bad_scale_is_refused_naming_it(scale):
    with pytest.raises(ValueError, match="scale must be positive"):
        marchenko_pastur_cdf([1.0], 0.5, scale)
    with pytest.raises(ValueError, match="scale must be positive"):
        count_outliers([1.0], 0.5, scale)


def test_bad_eigenvalues_and_options_are_refused():
    ev = _wishart(400, 100)
    with pytest.raises(ValueError, match="eigenvalues holds 1 non-finite"):
        fit_marchenko_pastur(np.append(ev, np.nan))
    with pytest.raises(ValueError, match="x holds 1 non-finite"):
        marchenko_pastur([1.0, math.nan], 0.5)
    with pytest.raises(ValueError, match="at least 10 non-zero eigenvalues"):
        fit_marchenko_pastur(ev[:5])
    with pytest.raises(ValueError, match="at least 10 non-zero eigenvalues"):
        fit_marchenko_pastur(np.concatenate([np.zeros(50), ev[:4]]))
    with pytest.raises(ValueError, match="either eigenvalues .* or density"):
        fit_marchenko_pastur()
    with pytest.raises(ValueError, match="not both"):
        fit_marchenko_pastur(ev, density=object())
    with pytest.raises(TypeError, match="density must be a DensityResult"):
        fit_marchenko_pastur(density=ev)
    with pytest.raises(ValueError, match="n_bootstrap"):
        fit_marchenko_pastur(ev, n_bootstrap=-1)
    with pytest.raises(ValueError, match="zero_tol"):
        fit_marchenko_pastur(ev, zero_tol=2.0)
    with pytest.raises(ValueError, match="mean is not positive"):
        fit_marchenko_pastur(-ev)
    with pytest.raises(ValueError, match="both ratio and scale"):
        count_outliers(ev, 0.25)
    with pytest.raises(ValueError, match="confidence must be one of"):
        count_outliers(ev, confidence=0.5)
    with pytest.raises(ValueError, match="dimension .* smaller"):
        count_outliers(ev, 0.25, 1.0, dimension=10)
    with pytest.raises(ValueError, match="dimension .* must equal"):
        count_outliers(ev, dimension=1000)
    with pytest.raises(ValueError, match="spikes must be relative spikes"):
        spiked_outliers([-1.5], 0.5)
