"""SGD as an SDE: Euler-Maruyama against Ornstein-Uhlenbeck closed forms, SGD
against its SDE on a quadratic with known noise, the real gradient-noise SDE on a
tiny network, basin occupancy (Gibbs, Laplace, simulated) on the double well and
sharp_flat, Eyring-Kramers against simulated escape rates, and bad input.

Every stochastic check compares with a tolerance of four standard errors (a
false alarm has probability about 6e-5 per comparison) plus, where the
discretization is not exact, the size of its known O(dt) bias; the steps are
chosen so that this bias is below the Monte Carlo error."""

import json
import math

import pytest
import torch
from scipy import stats
from scipy.linalg import expm, solve_continuous_lyapunov, solve_discrete_lyapunov
from torch import nn

import lossgeom as lg
from lossgeom.objective import NonFiniteError
from lossgeom.testing import assert_results_equal
from lossgeom.theory import (
    BasinOccupancy,
    EscapeRate,
    KramersRate,
    SDEPath,
    basin_occupancy,
    batched_loss,
    escape_rate,
    hessian_at,
    kramers_rate,
    sgd_temperature,
    simulate_sde,
    simulate_sgd,
    simulate_sgd_sde,
)

DTYPE = torch.float64
Z = 4.0  # standard errors allowed in a Monte Carlo comparison


def t64(x):
    return torch.tensor(x, dtype=DTYPE)


def double_well(w):
    return (w[:, 0] ** 2 - 1) ** 2 + w[:, 1] ** 2 / 2


def tilted_well(w, c=0.25):
    return double_well(w) + c * w[:, 0]


CS, CF = t64([-3.0, 0.0]), t64([3.0, 0.0])


def sharp_flat(w):
    """lg.zoo's sharp_flat at its defaults (sharp 10, flat 0.5, distance 6)."""
    return (
        1
        - torch.exp(-5.0 * ((w - CS) ** 2).sum(1))
        - torch.exp(-0.25 * ((w - CF) ** 2).sum(1))
    )


def quadratic(H):
    return lambda th: 0.5 * ((th @ H) * th).sum(1)


def sample_cov(X):
    return torch.cov(X.T, correction=1)


def assert_cov(X, C, slack=0.0):
    """The sample covariance of the rows of X is C, to Z standard errors (taken
    from the products of centred rows, whatever their distribution) plus slack."""
    E = X - X.mean(0)
    se = (E[:, :, None] * E[:, None, :]).std(0) / math.sqrt(X.shape[0])
    gap = (sample_cov(X) - C).abs()
    assert (gap <= Z * se + slack).all(), (gap / se).max()


# --------------------------------------------------------- Ornstein-Uhlenbeck
def test_ou_mean_and_covariance_at_time_t():
    # dt H_max = 0.005 * 2.2: the O(dt) bias of the variance is ~0.5%, below the
    # Monte Carlo error (~2.2% of a variance with 4000 chains).
    H = t64([[2.0, 0.5], [0.5, 1.0]])
    T, t, dt, chains = 0.3, 1.0, 0.005, 4000
    theta0 = t64([1.0, -1.0])
    path = simulate_sde(
        quadratic(H),
        theta0,
        temperature=T,
        dt=dt,
        steps=200,
        chains=chains,
        record_every=100,
        seed=1,
    )
    assert path.times.tolist() == [0.0, 0.5, 1.0]
    E = torch.from_numpy(expm(-(H * t).numpy()))
    mean = E @ theta0
    cov = T * torch.linalg.inv(H) @ (torch.eye(2, dtype=DTYPE) - E @ E)
    final = path.states[-1]
    assert torch.allclose(path.mean[-1], final.mean(0))
    se_mean = (torch.diagonal(cov) / chains).sqrt()
    assert ((final.mean(0) - mean).abs() <= Z * se_mean + 0.01 * mean.abs()).all()
    assert_cov(final, cov, 0.01 * cov.abs())
    # the noise's trace per unit time: 2 T d
    assert path.noise_trace.tolist() == pytest.approx([2 * T * 2] * 3)
    assert path.value == pytest.approx(float(path.losses[-1].mean()))


def test_stationary_covariance_with_a_noise_matrix_solves_lyapunov():
    # d theta = -H theta dt + sqrt(s) Sigma^(1/2) dW: H C + C H = s Sigma.
    # dt H_max = 0.01 * 3: bias ~1.5% < Monte Carlo error (~3.2%, 2000 chains).
    H = t64([[1.0, 0.3], [0.3, 3.0]])
    S = t64([[1.0, 0.6], [0.6, 2.0]])
    s, dt, chains = 0.5, 0.01, 2000
    C = torch.from_numpy(solve_continuous_lyapunov(H.numpy(), (s * S).numpy()))
    kw = dict(dt=dt, steps=800, chains=chains, dt_scale=s, record_every=800, seed=2)
    start = torch.zeros(2, dtype=DTYPE)
    bias = 1.5 * dt * 3.0 / 2 * C.abs()  # 1.5 times h_max dt / 2
    by_matrix = simulate_sde(quadratic(H), start, covariance=S, **kw)
    assert_cov(by_matrix.states[-1], C, bias)
    assert by_matrix.noise_trace[-1].item() == pytest.approx(s * 3.0)
    factor = torch.linalg.cholesky(S)
    by_factor = simulate_sde(
        quadratic(H), start, noise_factor=lambda th: factor.expand(len(th), 2, 2), **kw
    )
    assert_cov(by_factor.states[-1], C, bias)
    assert by_factor.noise_trace[-1].item() == pytest.approx(s * 3.0)
    # a state-dependent callable returning the same matrix gives the same path
    short = dict(kw, steps=30, record_every=10)
    a = simulate_sde(quadratic(H), start, covariance=S, **short)
    b = simulate_sde(
        quadratic(H), start, covariance=lambda th: S.expand(len(th), 2, 2), **short
    )
    assert torch.allclose(a.states, b.states, rtol=0, atol=1e-12)


def test_sgd_temperature_is_the_isotropic_sde():
    eta, B, var = 0.1, 8, 3.0
    T = sgd_temperature(eta, B, var)
    assert T == pytest.approx(eta * var / (2 * B))
    H = t64([[2.0, 0.0], [0.0, 0.5]])
    kw = dict(dt=eta, steps=5, chains=3, seed=4)
    iso = simulate_sde(quadratic(H), torch.ones(2, dtype=DTYPE), temperature=T, **kw)
    cov = simulate_sde(
        quadratic(H),
        torch.ones(2, dtype=DTYPE),
        covariance=var * torch.eye(2, dtype=DTYPE),
        dt_scale=eta / B,
        **kw,
    )
    assert torch.allclose(iso.states, cov.states, atol=1e-12)
    assert torch.allclose(iso.noise_trace, cov.noise_trace)


def test_batched_loss_of_a_zoo_surface_matches_the_closed_form():
    loss = batched_loss(lg.zoo.surface("double_well"))
    pts = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    assert torch.allclose(loss(pts), double_well(pts), atol=1e-13)
    sf = batched_loss(lg.Objective(*lg.zoo.surface("sharp_flat")))
    assert torch.allclose(sf(3 * pts), sharp_flat(3 * pts), atol=1e-13)
    H = hessian_at(loss, t64([1.0, 0.0]))
    assert torch.allclose(H, torch.diag(t64([8.0, 1.0])), atol=1e-12)
    kw = dict(temperature=0.3, dt=0.01, steps=20, chains=8, record_every=5, seed=3)
    a = simulate_sde(loss, t64([-1.0, 0.0]), **kw)
    b = simulate_sde(double_well, t64([-1.0, 0.0]), **kw)
    assert torch.allclose(a.states, b.states, atol=1e-12)
    assert torch.allclose(a.losses, b.losses, atol=1e-12)


# ----------------------------------------------------- SGD vs its SDE, exactly
class Centre(nn.Module):
    """Outputs s * theta for every sample: with targets s * x_i and MSELoss,
    L = (1/(2N)) sum_i |s * (theta - x_i)|^2 (d = 2), H = diag(s^2), and the
    per-sample gradients' covariance Sigma = diag(s^2) Cov(x) diag(s^2) does not
    depend on theta."""

    def __init__(self, s):
        super().__init__()
        self.s = s
        self.theta = nn.Parameter(torch.zeros(2, dtype=DTYPE))

    def forward(self, x):
        return torch.zeros_like(x) + self.s * self.theta


@pytest.fixture(scope="module")
def centre():
    gen = torch.Generator().manual_seed(5)
    s = t64([1.0, 2.0])
    x = torch.randn(20, 2, generator=gen, dtype=DTYPE) @ t64([[1.0, 0.5], [0.0, 0.7]])
    obj = lg.Objective(Centre(s), nn.MSELoss(), (x, s * x))
    H = torch.diag(s**2)
    xc = x - x.mean(0)
    Sigma = torch.diag(s**2) @ (xc.T @ xc / 20) @ torch.diag(s**2)
    return obj, H, Sigma, x.mean(0)


def test_the_centre_problem_has_the_stated_curvature_and_noise(centre):
    obj, H, Sigma, opt = centre
    assert torch.allclose(lg.hessian(obj).to_dense(), H, atol=1e-12)
    assert torch.allclose(lg.gradient_covariance(obj).to_dense(), Sigma, atol=1e-12)
    assert torch.allclose(obj.grad(opt), torch.zeros(2, dtype=DTYPE), atol=1e-12)


@pytest.mark.parametrize("eta", [0.1, 0.025])
def test_sgd_and_its_sde_share_two_moments_to_order_eta(centre, eta):
    obj, H, Sigma, opt = centre
    B, chains = 4, 1000
    Q = eta * Sigma / B  # the SDE's diffusion: Cov(g_B) = Sigma / B with replacement
    A = torch.eye(2, dtype=DTYPE) - eta * H
    C_sgd = torch.from_numpy(solve_discrete_lyapunov(A.numpy(), (eta * Q).numpy()))
    C_sde = torch.from_numpy(solve_continuous_lyapunov(H.numpy(), Q.numpy()))
    # the exact gap is O(eta): C_sgd / C_sde = 2 / (2 - eta h) on each axis
    gap = (C_sgd - C_sde).abs() / C_sde.abs()
    assert gap.max() <= eta * H.max() * 0.7
    steps = round(12 / eta)  # time 12: (1 - eta h_min)^(2k) < 1e-9
    start = opt + t64([1.0, -0.5])
    sgd = simulate_sgd(
        obj,
        start,
        lr=eta,
        batch_size=B,
        steps=steps,
        chains=chains,
        replacement=True,
        record_every=round(1 / eta),
        seed=6,
    )
    assert_cov(sgd.states[-1], C_sgd)
    # means: SGD (I - eta H)^k against the SDE's exp(-H t), both from start
    k = round(1 / eta)
    m_sgd = torch.linalg.matrix_power(A, k) @ (start - opt) + opt
    m_sde = torch.from_numpy(expm(-H.numpy())) @ (start - opt) + opt
    assert (m_sgd - m_sde).abs().max() <= eta * 2.0
    se = (torch.diagonal(C_sgd) / chains).sqrt()
    assert ((sgd.mean[1] - m_sgd).abs() <= Z * se).all()
    # the noise's trace per unit time: eta tr(Sigma) / B along the whole path
    assert torch.allclose(
        sgd.noise_trace, torch.full_like(sgd.noise_trace, float(Q.trace()))
    )


def test_sgd_sde_with_the_per_sample_noise_factor_has_the_lyapunov_covariance(centre):
    obj, H, Sigma, opt = centre
    eta, B, chains = 0.1, 4, 1000
    dt = eta / 5  # dt h_max = 0.08: bias ~4% (corrected below) < MC error ~4.5%
    Q = eta * Sigma / B
    C_sde = torch.from_numpy(solve_continuous_lyapunov(H.numpy(), Q.numpy()))
    C_em = torch.from_numpy(  # Euler-Maruyama's exact stationary covariance
        solve_discrete_lyapunov(
            (torch.eye(2, dtype=DTYPE) - dt * H).numpy(), (dt * Q).numpy()
        )
    )
    assert ((C_em - C_sde).abs() / C_sde.abs()).max() <= dt * 4 * 0.7
    path = simulate_sgd_sde(
        obj,
        opt,
        lr=eta,
        batch_size=B,
        steps=500,
        chains=chains,
        dt=dt,
        replacement=True,
        record_every=500,
        seed=7,
    )
    assert_cov(path.states[-1], C_em)
    # isotropic noise of the same trace: H C + C H = (tr Q / d) I
    iso = simulate_sgd_sde(
        obj,
        opt,
        lr=eta,
        batch_size=B,
        steps=500,
        chains=chains,
        dt=dt,
        noise="isotropic",
        replacement=True,
        record_every=500,
        seed=8,
    )
    Q_iso = float(Q.trace()) / 2 * torch.eye(2, dtype=DTYPE)
    C_iso = torch.from_numpy(
        solve_discrete_lyapunov(
            (torch.eye(2, dtype=DTYPE) - dt * H).numpy(), (dt * Q_iso).numpy()
        )
    )
    assert_cov(iso.states[-1], C_iso)
    assert iso.noise_trace.tolist() == pytest.approx(path.noise_trace.tolist())


# ------------------------------------------------ the real noise on a network
@pytest.fixture(scope="module")
def tiny():
    gen = torch.Generator().manual_seed(9)
    X = torch.randn(32, 3, generator=gen, dtype=DTYPE)
    y = torch.randn(32, 1, generator=gen, dtype=DTYPE)
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DTYPE)
    return lg.Objective(model, nn.MSELoss(), (X, y))


def _one_step_noise(path, theta0, g, lr, dt):
    """The noise of the first step, as a gradient (so its covariance is Cov(g_B))."""
    return (theta0 - path.states[1] - dt * g) / lr


def test_one_step_of_sgd_and_of_its_sde_has_the_minibatch_covariance(tiny):
    obj, lr, B, chains = tiny, 0.05, 4, 4000
    theta0, g = obj.theta, obj.grad()
    f = (32 - B) / (B * 31)  # without replacement
    op = lg.gradient_covariance(obj)
    cov = f * op.to_dense()
    d = obj.dim

    def check(noise, target):
        assert_cov(noise, target, 1e-12)
        sq = (noise - noise.mean(0)).pow(2).sum(1)  # the trace, on its own
        se = float(sq.std()) / math.sqrt(chains)
        assert abs(float(sq.mean()) - float(target.trace())) <= Z * se

    sgd = simulate_sgd(obj, lr=lr, batch_size=B, steps=1, chains=chains, seed=10)
    gb = (theta0 - sgd.states[1]) / lr  # the minibatch gradients
    se_mean = (torch.diagonal(cov) / chains).sqrt()
    assert ((gb.mean(0) - g).abs() <= Z * se_mean).all()
    check(gb - g, cov)
    sde = simulate_sgd_sde(obj, lr=lr, batch_size=B, steps=1, chains=chains, seed=11)
    check(_one_step_noise(sde, theta0, g, lr, lr), cov)
    iso_target = f * op.trace() / d * torch.eye(d, dtype=DTYPE)
    for fn in (simulate_sgd, simulate_sgd_sde):
        iso = fn(
            obj, lr=lr, batch_size=B, steps=1, chains=chains, seed=12, noise="isotropic"
        )
        check(_one_step_noise(iso, theta0, g, lr, 0.0) - g, iso_target)
    # equal traces by construction, at the same point
    expected = lr * f * op.trace()
    for path in (sgd, sde, iso):
        assert path.noise_trace[0].item() == pytest.approx(expected, rel=1e-10)


def test_real_noise_and_isotropic_sde_runs_on_a_network(tiny):
    before = [p.detach().clone() for p in tiny.model.parameters()]
    kw = dict(lr=0.1, batch_size=4, steps=40, chains=16, record_every=10, seed=13)
    real = simulate_sgd_sde(tiny, **kw)
    iso = simulate_sgd_sde(tiny, noise="isotropic", **kw)
    assert real.noise_trace[0].item() == pytest.approx(iso.noise_trace[0].item())
    for path in (real, iso):
        assert path.states.shape == (5, 16, tiny.dim)
        assert torch.isfinite(path.noise_trace).all() and (path.noise_trace > 0).all()
        assert path.mean_loss[-1] < path.mean_loss[0]  # it still descends
        assert path.cost.counters["per_sample_grad"] == 16 * 41
    # the model is never changed
    for p, q in zip(tiny.model.parameters(), before, strict=True):
        assert torch.equal(p, q)


# ----------------------------------------------------------- basin occupancy
def _within(res):
    gap = (res.simulated - res.gibbs).abs()
    return bool((gap <= Z * res.simulated_stderr + res.gibbs_bound).all())


def test_double_well_chains_from_one_minimum_mix_to_half_and_half():
    # T = 0.5: the relaxation time 1/(2k) is about 4, burn-in 10, run 60.
    # dt h = 0.08, and by symmetry the discretization cannot bias the halves.
    res = basin_occupancy(
        double_well,
        t64([[-1.0, 0.0], [1.0, 0.0]]),
        0.5,
        bounds=((-2.5, 2.5), (-4, 4)),
        dt=0.01,
        steps=6000,
        burn_in=1000,
        chains=400,
        start=t64([-1.0, 0.0]),
        grid=200,
        seed=14,
    )
    assert res.gibbs.tolist() == pytest.approx([0.5, 0.5], abs=1e-9)
    assert res.laplace.tolist() == pytest.approx([0.5, 0.5], abs=1e-12)
    assert res.details["mixed_fraction"] > 0.95
    assert res.simulated_stderr.max() < 0.02
    assert _within(res)
    assert (res.ci_low <= 0.5).all() and (res.ci_high >= 0.5).all()
    by_sign = basin_occupancy(
        double_well,
        res.minima,
        0.5,
        bounds=((-2.5, 2.5), (-4, 4)),
        dt=0.01,
        steps=0,
        grid=200,
        partition=lambda w: (w[:, 0] > 0).long(),
    )
    assert torch.allclose(by_sign.gibbs, res.gibbs, atol=1e-12)
    assert by_sign.simulated.isnan().all()


def test_tilted_double_well_occupancy_matches_gibbs():
    # Unequal wells, so the answer depends on T through the noise's scale.
    # dt h = 0.09: the O(dt) bias of the occupancy was measured below 0.001
    # (dt = 0.01 and 0.005 agree to 1e-4), under the Monte Carlo error ~0.008.
    res = basin_occupancy(
        tilted_well,
        t64([[-1.0, 0.0], [1.0, 0.0]]),
        0.4,
        bounds=((-3, 3), (-5, 5)),
        dt=0.01,
        steps=7000,
        burn_in=2000,
        chains=400,
        start="minima",
        grid=300,
        seed=15,
    )
    assert 0.2 < float(res.gibbs[1]) < 0.3  # the shallow well holds a quarter
    assert res.details["mixed_fraction"] > 0.95
    assert res.simulated_stderr.max() < 0.015
    assert _within(res)


def test_sharp_flat_flat_basin_holds_more_mass_and_simulation_agrees():
    # T = 0.1 (barrier / T ~ 10): no chain crosses in a run, so the chains start
    # from the Gibbs measure; the check is that they stay in it.
    res = basin_occupancy(
        batched_loss(lg.zoo.surface("sharp_flat")),
        torch.stack([CS, CF]),
        0.1,
        bounds=((-6, 8), (-6, 6)),
        dt=0.005,
        steps=600,
        chains=400,
        grid=400,
        seed=16,
    )
    dets = torch.linalg.det(res.hessians)
    ratio = math.sqrt(float(dets[0] / dets[1]))  # sqrt(det H_sharp / det H_flat)
    assert ratio == pytest.approx(20.0, rel=1e-3)
    # the sharp minimum lies 1.2e-4 lower (the flat basin's tail): exp(1.2e-3)
    assert float(res.laplace[1] / res.laplace[0]) == pytest.approx(ratio, rel=3e-3)
    assert float(res.gibbs[1] / res.gibbs[0]) == pytest.approx(ratio, rel=0.01)
    assert res.gibbs[1] > 0.94 and res.details["edge_mass"] < 1e-3
    assert _within(res)


def test_laplace_approaches_gibbs_as_the_temperature_falls():
    mins = t64([[-1.0, 0.0], [1.0, 0.0]])
    errors = []
    for T in (0.2, 0.1, 0.05, 0.02):
        res = basin_occupancy(
            tilted_well,
            mins,
            T,
            bounds=((-2.5, 2.5), (-2, 2)),
            dt=0.01,
            steps=0,
            grid=500,
        )
        rel = abs(float(res.laplace[1] / res.gibbs[1]) - 1)
        assert rel <= 0.2 * T  # the relative error of the minority basin is O(T)
        assert float(res.gibbs_bound[1]) < 1e-3 * float(res.gibbs[1])
        errors.append(rel)
    assert errors == sorted(errors, reverse=True)
    sf = [
        basin_occupancy(
            sharp_flat,
            torch.stack([CS, CF]),
            T,
            bounds=((-7, 9), (-8, 8)),
            dt=0.01,
            steps=0,
            grid=400,
        )
        for T in (0.2, 0.1, 0.05)
    ]
    gaps = [float((r.laplace - r.gibbs).abs().max()) for r in sf]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-4


# -------------------------------------------------------------- escape rates
def test_kramers_rate_by_hand():
    k = kramers_rate(
        1.0, torch.diag(t64([8.0, 1.0])), torch.diag(t64([-4.0, 1.0])), 0.2
    )
    prefactor = 4 / (2 * math.pi) * math.sqrt(8 * 1 / (4 * 1))
    assert k.prefactor == pytest.approx(prefactor, rel=1e-14)
    assert k.value == pytest.approx(prefactor * math.exp(-5), rel=1e-14)
    assert k.saddle_eigenvalue == -4.0 and k.mean_time == pytest.approx(1 / k.value)
    # rotation-invariant: the same rate for rotated Hessians
    R = t64([[0.6, -0.8], [0.8, 0.6]])
    k2 = kramers_rate(
        1.0,
        R @ torch.diag(t64([8.0, 1.0])) @ R.T,
        R @ torch.diag(t64([-4.0, 1.0])) @ R.T,
        0.2,
    )
    assert k2.value == pytest.approx(k.value, rel=1e-12)


def test_simulated_escape_rate_is_within_20_percent_of_kramers():
    # barrier / T = 5. dt = 0.01 and 0.0025 gave rates within 2% of each other
    # (each with a 4.7% standard error): the discretization bias is below the
    # Monte Carlo error. The target is the ball of radius 0.5 around (1, 0).
    loss = double_well
    T = 0.2
    Hm, Hs = hessian_at(loss, t64([-1.0, 0.0])), hessian_at(loss, t64([0.0, 0.0]))
    k = kramers_rate(1.0, Hm, Hs, T)
    res = escape_rate(
        loss,
        t64([-1.0, 0.0]),
        t64([1.0, 0.0]),
        T,
        dt=0.01,
        max_time=40.0,
        chains=3000,
        seed=17,
    )
    assert res.events > 300 and res.parameters["radius"] == pytest.approx(0.5)
    assert abs(res.value / k.value - 1) < 0.2
    assert res.ci_low < res.value < res.ci_high
    assert res.stderr == pytest.approx(math.sqrt(res.events) / res.exposure)
    observed = res.first_passage_times[torch.isfinite(res.first_passage_times)]
    assert observed.numel() == res.events and float(observed.max()) <= 40.0
    assert res.exposure == pytest.approx(
        float(observed.sum()) + (3000 - res.events) * 40.0, rel=1e-9
    )


def test_escape_rate_interval_is_the_exact_poisson_interval():
    # A region every chain enters at its first step (all but the start itself):
    # events = chains and exposure = chains * dt, known exactly.
    start = t64([-1.0, 0.0])
    res = escape_rate(
        double_well,
        start,
        lambda th: (th - start).norm(dim=1) > 0,
        0.3,
        dt=0.01,
        max_time=1.0,
        chains=50,
    )
    assert res.events == 50 and res.exposure == pytest.approx(0.5)
    assert res.value == pytest.approx(100.0)
    assert res.ci_low == pytest.approx(stats.chi2.ppf(0.025, 100) / 2 / 0.5)
    assert res.ci_high == pytest.approx(stats.chi2.ppf(0.975, 102) / 2 / 0.5)


# ----------------------------------------------------------------- bad input
def test_bad_input_gets_clear_errors():
    start = t64([-1.0, 0.0])
    H = torch.diag(t64([8.0, 1.0]))
    with pytest.raises(ValueError, match="temperature"):
        simulate_sde(double_well, start, temperature=0.0, dt=0.01, steps=5)
    with pytest.raises(ValueError, match="temperature"):
        simulate_sde(double_well, start, temperature=-1.0, dt=0.01, steps=5)
    with pytest.raises(ValueError, match="dt"):
        simulate_sde(double_well, start, temperature=0.1, dt=0.0, steps=5)
    with pytest.raises(ValueError, match="steps"):
        simulate_sde(double_well, start, temperature=0.1, dt=0.01, steps=0)
    with pytest.raises(ValueError, match="exactly one"):
        simulate_sde(double_well, start, temperature=0.1, covariance=H, dt=0.1, steps=2)
    with pytest.raises(ValueError, match="covariance"):
        simulate_sde(
            double_well, start, covariance=torch.eye(3, dtype=DTYPE), dt=0.1, steps=2
        )
    with pytest.raises(ValueError, match="positive semi-definite"):
        simulate_sde(double_well, start, covariance=-H, dt=0.1, steps=2)
    with pytest.raises(ValueError, match="theta0 holds 3 chains"):
        simulate_sde(
            double_well,
            torch.zeros(3, 2, dtype=DTYPE),
            temperature=0.1,
            dt=0.1,
            steps=2,
            chains=4,
        )
    with pytest.raises(ValueError, match="loss must map"):
        simulate_sde(lambda th: th, start, temperature=0.1, dt=0.1, steps=2)
    with pytest.raises(NonFiniteError, match="diverged"):
        simulate_sde(double_well, t64([3.0, 0.0]), temperature=0.1, dt=1.0, steps=50)
    # Kramers: no saddle, so no second basin
    with pytest.raises(ValueError, match="hessian_saddle.*one negative"):
        kramers_rate(1.0, H, H, 0.2)
    with pytest.raises(ValueError, match="hessian_saddle must have shape"):
        kramers_rate(1.0, H, torch.eye(3, dtype=DTYPE), 0.2)
    with pytest.raises(ValueError, match="hessian_min must be positive definite"):
        kramers_rate(1.0, -H, torch.diag(t64([-4.0, 1.0])), 0.2)
    with pytest.raises(ValueError, match="temperature"):
        kramers_rate(1.0, H, torch.diag(t64([-4.0, 1.0])), 0.0)
    with pytest.raises(ValueError, match="barrier"):
        kramers_rate(-1.0, H, torch.diag(t64([-4.0, 1.0])), 0.2)
    # escape: a target that is not a second minimum, or in start's own basin
    rosenbrock = batched_loss(lg.zoo.surface("rosenbrock"))
    with pytest.raises(ValueError, match="second basin"):
        escape_rate(
            rosenbrock, t64([1.0, 1.0]), t64([-1.0, 1.0]), 0.2, dt=1e-3, max_time=1.0
        )
    with pytest.raises(ValueError, match="same basin.*second basin"):
        escape_rate(double_well, start, t64([-0.9, 0.1]), 0.2, dt=0.01, max_time=1)
    with pytest.raises(ValueError, match="start.*not near a minimum"):
        escape_rate(
            double_well, t64([0.0, 0.0]), t64([1.0, 0.0]), 0.2, dt=0.01, max_time=1
        )
    with pytest.raises(ValueError, match="target must have shape"):
        escape_rate(double_well, start, t64([1.0, 0.0, 0.0]), 0.2, dt=0.01, max_time=1)
    with pytest.raises(ValueError, match="max_time"):
        escape_rate(double_well, start, t64([1.0, 0.0]), 0.2, dt=0.01, max_time=0)
    # occupancy
    mins = t64([[-1.0, 0.0], [1.0, 0.0]])
    kw = dict(bounds=((-2, 2), (-2, 2)), dt=0.01, steps=10, grid=50)
    with pytest.raises(ValueError, match="temperature"):
        basin_occupancy(double_well, mins, 0.0, **kw)
    with pytest.raises(ValueError, match="minima must be"):
        basin_occupancy(double_well, mins[:1], 0.2, **kw)
    with pytest.raises(ValueError, match="outside bounds"):
        basin_occupancy(double_well, mins, 0.2, **dict(kw, bounds=((0, 2), (-2, 2))))
    with pytest.raises(ValueError, match=r"minima\[0\].*not near a minimum"):
        basin_occupancy(double_well, t64([[0.0, 0.0], [1.0, 0.0]]), 0.2, **kw)
    with pytest.raises(ValueError, match="bounds"):
        basin_occupancy(double_well, mins, 0.2, **dict(kw, bounds=(1, 2)))
    # SGD on an objective
    obj = lg.Objective(*lg.zoo.surface("double_well"))
    with pytest.raises(ValueError, match="batch_size"):
        simulate_sgd(obj, lr=0.1, batch_size=2, steps=2)
    with pytest.raises(ValueError, match="noise"):
        simulate_sgd(obj, lr=0.1, batch_size=1, steps=2, noise="pink")
    with pytest.raises(ValueError, match="lr"):
        simulate_sgd_sde(obj, lr=0.0, batch_size=1, steps=2)
    with pytest.raises(TypeError, match="Objective"):
        simulate_sgd(double_well, lr=0.1, batch_size=1, steps=2)


# --------------------------------------------------------------- the results
def test_results_round_trip_exactly_and_write_strict_json(tmp_path):
    results = [
        simulate_sde(
            double_well,
            t64([-1.0, 0.0]),
            temperature=0.2,
            dt=0.01,
            steps=10,
            chains=4,
            record_every=5,
        ),
        basin_occupancy(
            double_well,
            t64([[-1.0, 0.0], [1.0, 0.0]]),
            0.3,
            bounds=((-2, 2), (-2, 2)),
            dt=0.01,
            steps=20,
            chains=4,
            grid=40,
        ),
        kramers_rate(
            1.0, torch.diag(t64([8.0, 1.0])), torch.diag(t64([-4.0, 1.0])), 0.3
        ),
        escape_rate(
            double_well,
            t64([-1.0, 0.0]),
            t64([1.0, 0.0]),
            0.3,
            dt=0.01,
            max_time=2.0,
            chains=10,
        ),
    ]
    types = [SDEPath, BasinOccupancy, KramersRate, EscapeRate]
    for i, (res, cls) in enumerate(zip(results, types, strict=True)):
        assert type(res) is cls and res.definition
        json.dumps(res.to_dict(), allow_nan=False)
        assert_results_equal(lg.load_result(res.save(tmp_path / str(i))), res)
    assert "states" not in results[0].to_dict()
    assert set(results[1].scalars()) >= {"gibbs_0", "laplace_1", "simulated_0"}


# ------------------------------------------------------------------ longer
@pytest.mark.slow
def test_sharp_flat_in_a_reflecting_box_mixes_to_the_gibbs_occupancy():
    # T = 0.4 in the box [-5, 5]^2 with reflecting walls: the stationary law is the
    # Gibbs measure on the box; chains start half in each basin (far from the 8%
    # the sharp basin holds) and mix through the plateau.
    res = basin_occupancy(
        sharp_flat,
        torch.stack([CS, CF]),
        0.4,
        bounds=((-5, 5), (-5, 5)),
        dt=0.005,
        steps=80000,
        burn_in=30000,
        chains=500,
        start="minima",
        boundary="reflect",
        grid=400,
        seed=18,
    )
    # (a chain may stay in the flat basin, which holds 92%, for the whole run)
    assert res.details["mixed_fraction"] > 0.8
    assert res.details["outside_fraction"] == 0
    assert res.laplace[0] < 0.05 < res.gibbs[0]  # the plateau's mass: not Laplace
    assert _within(res)


@pytest.mark.slow
def test_kramers_rate_at_a_lower_temperature():
    T = 0.15  # barrier / T = 6.7
    k = kramers_rate(1.0, torch.diag(t64([8.0, 1.0])), torch.diag(t64([-4.0, 1.0])), T)
    res = escape_rate(
        double_well,
        t64([-1.0, 0.0]),
        t64([1.0, 0.0]),
        T,
        dt=0.01,
        max_time=100.0,
        chains=6000,
        seed=19,
    )
    assert res.events > 400
    assert abs(res.value / k.value - 1) < 0.2
