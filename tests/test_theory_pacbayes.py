"""PAC-Bayes and Occam bounds: the scalar algebra against references, the Gaussian
KL and sampling against dense matrices, the Monte Carlo term's coverage, the
curvature posterior against an exact Hessian, and an end-to-end run on digits."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import beta
from torch import nn

import lossgeom as lg
from lossgeom.measures import row_entries
from lossgeom.testing import assert_results_equal, exact_hessian
from lossgeom.theory import (
    DEFAULT_PRIOR_SIGMAS,
    PacBayesResult,
    StructuredCovariance,
    gaussian_kl,
    kl_bernoulli,
    kl_inverse,
    langford_caruana_bound,
    occam_bound,
    pac_bayes_bounds,
    pac_bayes_kl_bound,
    pac_bayes_mc_bound,
)

DTYPE = torch.float64


# ------------------------------------------------------------- scalar algebra
def bisection_inverse(q, c, steps=200):
    """The plain reference: bisection for the largest p in [q, 1] with kl <= c."""
    lo, hi = q, 1.0
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if kl_bernoulli(q, mid) <= c:
            lo = mid
        else:
            hi = mid
    return hi


QS = [0.0, 1e-6, 1e-3, 0.01, 0.1, 0.25, 0.5, 0.8, 0.99, 0.999999, 1.0]
CS = [0.0, 1e-12, 1e-8, 1e-4, 1e-2, 0.1, 0.5, 1.0, 3.0, 10.0, 40.0]


def test_kl_bernoulli_limits_and_values():
    assert kl_bernoulli(0.3, 0.3) == 0.0
    assert kl_bernoulli(0.0, 0.2) == pytest.approx(-math.log(0.8), rel=1e-15)
    assert kl_bernoulli(1.0, 0.2) == pytest.approx(-math.log(0.2), rel=1e-15)
    assert kl_bernoulli(0.0, 0.0) == 0.0 and kl_bernoulli(1.0, 1.0) == 0.0
    assert kl_bernoulli(0.5, 0.0) == math.inf and kl_bernoulli(0.5, 1.0) == math.inf
    q, p = 0.1, 0.4
    by_hand = q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
    assert kl_bernoulli(q, p) == pytest.approx(by_hand, rel=1e-14)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        kl_bernoulli(1.2, 0.5)
    with pytest.raises(TypeError):
        kl_bernoulli("0.1", 0.5)


def test_kl_inverse_matches_bisection_on_a_grid():
    for q in QS:
        for c in CS[1:]:  # c = 0 (p = q exactly) is an edge case, below
            p = kl_inverse(q, c)
            assert q <= p <= 1.0
            assert abs(p - bisection_inverse(q, c)) <= 1e-10, (q, c, p)
            if p < 1.0 and c > 0:  # never below the inverse, up to kl's rounding
                assert kl_bernoulli(q, p) >= c - 1e-14 / (1 - p)


def test_kl_inverse_edges_and_monotonicity():
    assert kl_inverse(0.2, 0.0) == 0.2
    assert kl_inverse(1.0, 5.0) == 1.0
    assert kl_inverse(0.3, math.inf) == 1.0
    assert kl_inverse(0.0, 2.0) == pytest.approx(1 - math.exp(-2.0), rel=1e-15)
    assert kl_inverse(0.5, 500.0) == 1.0  # beyond the last float below 1
    for c in CS:
        ps = [kl_inverse(q, c) for q in QS]
        assert all(a <= b for a, b in zip(ps, ps[1:], strict=False)), c
    for q in QS:
        ps = [kl_inverse(q, c) for c in CS]
        assert all(a <= b for a, b in zip(ps, ps[1:], strict=False)), q
    with pytest.raises(ValueError, match=">= 0"):
        kl_inverse(0.1, -1.0)


def test_closed_form_bounds_by_hand():
    # zero empirical error: kl^-1(0, c) = 1 - exp(-c)
    # PAC-Bayes-kl, KL = 10, n = 100, delta = 0.05:
    #   1 - e^-0.1 * (0.05 / 20)^0.01 = 1 - 0.9048374 * 0.9418452 = 0.1477835
    assert pac_bayes_kl_bound(0.0, 10.0, 100, 0.05) == pytest.approx(
        0.1477835, abs=1e-7
    )
    # Langford-Caruana, m = 100, delta' = 0.02: 1 - 0.01^0.01 = 0.0450074
    lc = langford_caruana_bound(0.0, 100, 0.02)
    assert lc == pytest.approx(0.0450074, abs=1e-7)
    # Occam, L = 50 bits, n = 1000, delta = 0.01: 1 - 2^-0.05 * 0.01^0.001
    assert occam_bound(0.0, 50, 1000, 0.01) == pytest.approx(0.0385017, abs=1e-7)
    # both stages composed: kl(lc || bound) = (10 + ln(2 sqrt(100) / 0.05)) / 100
    b = pac_bayes_mc_bound(0.0, 100, 10.0, 100, delta=0.05, mc_delta=0.02)
    c = (10 + math.log(20 / 0.05)) / 100
    assert kl_bernoulli(lc, b) == pytest.approx(c, rel=1e-12)
    assert b == pytest.approx(0.2557539, abs=1e-7)


def test_langford_caruana_covers_the_mean_over_many_seeds():
    m, delta, reps = 200, 0.1, 1000
    rng = np.random.default_rng(0)
    for p in (0.02, 0.1, 0.3):
        k = rng.binomial(m, p, size=reps)
        bounds = np.array([langford_caruana_bound(x / m, m, delta) for x in k])
        failures = float((bounds < p).mean())
        assert failures <= delta + 3 * math.sqrt(delta * (1 - delta) / reps)
        # not absurdly loose: within 1.6x the exact (Clopper-Pearson) interval
        cp = np.where(k == m, 1.0, beta.ppf(1 - delta / 2, k + 1, m - k))
        assert (bounds - p).mean() <= 1.6 * (cp - p).mean()


def test_combined_bound_tightens_with_data_and_loosens_with_kl():
    kw = {"delta": 0.025, "mc_delta": 0.01}
    by_n = [pac_bayes_mc_bound(0.05, 1000, 50.0, n, **kw) for n in (100, 1000, 10**5)]
    assert by_n[0] > by_n[1] > by_n[2] > 0.05
    by_kl = [pac_bayes_mc_bound(0.05, 1000, kl, 1000, **kw) for kl in (0, 10, 100)]
    assert by_kl[0] < by_kl[1] < by_kl[2] < 1
    by_m = [pac_bayes_mc_bound(0.05, m, 50.0, 1000, **kw) for m in (10, 100, 10**4)]
    assert by_m[0] > by_m[1] > by_m[2]
    by_k = [
        pac_bayes_mc_bound(0.05, 1000, 50.0, 1000, n_priors=k, **kw) for k in (1, 10)
    ]
    assert by_k[0] < by_k[1]
    with pytest.raises(ValueError, match="delta \\+ mc_delta"):
        pac_bayes_mc_bound(0.05, 10, 1.0, 100, delta=0.6, mc_delta=0.5)
    with pytest.raises(ValueError, match="n must be an integer >= 8"):
        pac_bayes_kl_bound(0.0, 1.0, 5, 0.05)


# ------------------------------------------------------------------- Gaussians
def structured(d=7, k=3, seed=0, orthonormal=True):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(d, generator=g, dtype=DTYPE) + 0.2
    V = torch.randn(d, k, generator=g, dtype=DTYPE)
    if orthonormal:
        V = torch.linalg.qr(V)[0]
    lam = torch.rand(k, generator=g, dtype=DTYPE) * 5
    lam[-1] = 0.0  # a zero eigenvalue is allowed
    return a, V, lam


def dense_kl(mq, Sq, mp, Sp):
    Sp_inv = torch.linalg.inv(Sp)
    diff = mp - mq
    d = mq.shape[0]
    return 0.5 * float(
        torch.trace(Sp_inv @ Sq)
        + diff @ Sp_inv @ diff
        - d
        + torch.logdet(Sp)
        - torch.logdet(Sq)
    )


@pytest.mark.parametrize("orthonormal", [True, False], ids=["orthonormal", "any_V"])
def test_structured_covariance_matches_dense(orthonormal):
    a, V, lam = structured(orthonormal=orthonormal)
    cov = StructuredCovariance(a, V, lam, c=0.3)
    S = 0.3 * torch.linalg.inv(torch.diag(a) + V @ torch.diag(lam) @ V.T)
    assert torch.allclose(cov.to_dense(), S, rtol=1e-12, atol=1e-14)
    assert float(cov.trace()) == pytest.approx(float(S.trace()), rel=1e-12)
    assert float(cov.logdet()) == pytest.approx(float(torch.logdet(S)), rel=1e-12)
    Y = torch.randn(7, 4, dtype=DTYPE)
    assert torch.allclose(cov.solve(Y), S @ Y / 0.3, rtol=1e-11, atol=1e-13)
    assert cov.scaled(2.0).c == 2.0 and torch.equal(cov.scaled(2.0).a, cov.a)


@pytest.mark.parametrize("orthonormal", [True, False], ids=["orthonormal", "any_V"])
def test_gaussian_kl_matches_dense_and_torch_distributions(orthonormal):
    from torch.distributions import MultivariateNormal, kl_divergence

    d = 7
    a, V, lam = structured(d, orthonormal=orthonormal, seed=1)
    g = torch.Generator().manual_seed(2)
    mq, mp = (
        torch.randn(d, generator=g, dtype=DTYPE),
        torch.randn(d, generator=g, dtype=DTYPE),
    )
    sp = 0.7
    cov = StructuredCovariance(a, V, lam, c=0.4)
    Sq, Sp = cov.to_dense(), sp**2 * torch.eye(d, dtype=DTYPE)
    ours = gaussian_kl(mq, mp, sp, cov_q=cov)
    assert abs(ours - dense_kl(mq, Sq, mp, Sp)) <= 1e-10
    ref = kl_divergence(MultivariateNormal(mq, Sq), MultivariateNormal(mp, Sp))
    assert abs(ours - float(ref)) <= 1e-10
    iso = gaussian_kl(mq, mp, sp, sigma_q=0.3)
    ref = kl_divergence(
        MultivariateNormal(mq, 0.09 * torch.eye(d, dtype=DTYPE)),
        MultivariateNormal(mp, Sp),
    )
    assert abs(iso - float(ref)) <= 1e-10
    assert gaussian_kl(mq, mp, sp, sigma_q=sp) == pytest.approx(
        float((mq - mp).pow(2).sum()) / (2 * sp**2), rel=1e-14
    )
    with pytest.raises(ValueError, match="exactly one"):
        gaussian_kl(mq, mp, sp)


def test_structured_samples_have_the_covariance():
    a, V, lam = structured(d=5, k=2, seed=3)
    cov = StructuredCovariance(a, V, lam, c=0.5)
    S = cov.to_dense()
    N = 200_000
    X = cov.sample(N, generator=torch.Generator().manual_seed(0))
    assert X.shape == (N, 5) and X.dtype == DTYPE
    emp = X.T @ X / N
    # standard error of each entry of an empirical covariance of Gaussians
    se = ((torch.outer(S.diagonal(), S.diagonal()) + S**2) / N).sqrt()
    assert bool(((emp - S).abs() <= 5 * se).all()), ((emp - S) / se).abs().max()
    assert bool((X.mean(0).abs() <= 5 * (S.diagonal() / N).sqrt()).all())


def test_structured_covariance_refuses_bad_pieces():
    a, V, lam = structured()
    with pytest.raises(ValueError, match="> 0 elementwise"):
        StructuredCovariance(a - 1.0, V, lam)
    with pytest.raises(ValueError, match=">= 0"):
        StructuredCovariance(a, V, -lam - 1)
    with pytest.raises(ValueError, match="shape"):
        StructuredCovariance(a, V.T, lam)
    with pytest.raises(ValueError, match="c must be"):
        StructuredCovariance(a, V, lam, c=0.0)


# ------------------------------------------------- the network-level function
FAST = {
    "mc_samples": 64,
    "selection_samples": 4,
    "prior_sigmas": (0.03, 0.1, 0.3),
    "scale_grid": (1.0, 10.0),
    "eps_grid": (1.0,),
    "bits": (4, 8),
    "diagonal_matvecs": 20,
}


def softmax_regression(seed=0, n=60, p=4, classes=3, steps=200):
    """A float64 linear classifier, trained a little, its init, and its data."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=DTYPE)
    W = torch.randn(p, classes, generator=g, dtype=DTYPE)
    y = (X @ W + 0.5 * torch.randn(n, classes, generator=g, dtype=DTYPE)).argmax(1)
    torch.manual_seed(seed)
    init = nn.Linear(p, classes).double()
    model = copy.deepcopy(init)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model, init, (X, y)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_posterior_uses_the_exact_top_eigenpairs(curvature):
    model, init, data = softmax_regression()
    k = 3
    res = pac_bayes_bounds(
        model,
        nn.CrossEntropyLoss(),
        init,
        data,
        hessian_rank=k,
        curvature=curvature,
        **FAST,
    )
    obj = lg.Objective(model, nn.CrossEntropyLoss(), data)
    H = exact_hessian(obj)  # a linear model: Gauss-Newton = Hessian
    evals, evecs = torch.linalg.eigh(H)
    top, U = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    assert torch.allclose(res.curvature_values.double(), top, rtol=1e-6, atol=1e-9)
    V = res.curvature_vectors
    low_rank = V @ torch.diag(res.curvature_values.double().clamp_min(0)) @ V.T
    assert torch.allclose(low_rank, U @ torch.diag(top) @ U.T, atol=1e-6)
    # the posterior's KL, rebuilt densely from the stored pieces
    post = res.hessian.posterior
    A = torch.diag(res.curvature_diagonal + post["eps"]) + low_rank
    Sq = post["c"] * torch.linalg.inv(A)
    theta, theta0 = obj.theta, lg.Objective(init, nn.CrossEntropyLoss(), data).theta
    Sp = res.hessian.prior_sigma**2 * torch.eye(obj.dim, dtype=DTYPE)
    assert res.hessian.kl == pytest.approx(dense_kl(theta, Sq, theta0, Sp), abs=1e-9)
    s = res.isotropic.prior_sigma
    assert res.isotropic.kl == pytest.approx(
        float((theta - theta0).pow(2).sum()) / (2 * s**2), rel=1e-12
    )


def test_union_bound_bookkeeping_adds_up():
    model, init, data = softmax_regression(seed=1)
    res = pac_bayes_bounds(
        model,
        nn.CrossEntropyLoss(),
        init,
        data,
        hessian_rank=2,
        delta=0.04,
        mc_delta=0.02,
        **FAST,
    )
    budget = res.details["delta_budget"]
    assert math.isclose(
        math.fsum(r["delta"] for r in budget), res.delta_total, rel_tol=1e-14
    )
    assert res.delta_total == pytest.approx(0.06, rel=1e-15)
    J = len(FAST["bits"]) + len(FAST["prior_sigmas"])
    assert res.parameter_count.delta == pytest.approx(0.04 / J, rel=1e-15)
    assert (
        res.isotropic.delta_prior
        == res.hessian.delta_prior
        == res.parameter_count.delta
    )
    assert res.isotropic.delta_mc + res.hessian.delta_mc == pytest.approx(
        0.02, rel=1e-15
    )
    n = res.n
    for part in (res.isotropic, res.hessian):  # each bound rebuilt from its parts
        upper = langford_caruana_bound(part.mc_error, part.mc_samples, part.delta_mc)
        assert part.mc_error_bound == upper
        c = (part.kl + math.log(2 * math.sqrt(n) / part.delta_prior)) / n
        assert part.bound == kl_inverse(upper, c)
    pc = res.parameter_count
    assert pc.bound == occam_bound(pc.train_error, pc.description_bits, n, pc.delta)
    assert pc.description_bits == pc.bits * res.d + 32 * 2  # weight and bias


@pytest.fixture(scope="module")
def digits_mlp():
    X, y = lg.zoo.dataset("digits", split="train", subset=300)
    Xt, yt = lg.zoo.dataset("digits", split="test", subset=200)
    torch.manual_seed(0)
    init = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    model = copy.deepcopy(init)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model, init, (X, y), (Xt, yt)


def test_end_to_end_on_a_small_digits_mlp(digits_mlp, tmp_path):
    model, init, train, test = digits_mlp
    before = copy.deepcopy(model.state_dict())
    model.train()
    res = pac_bayes_bounds(
        model, nn.CrossEntropyLoss(), init, train, test, mc_samples=300, hessian_rank=10
    )
    assert model.training  # the flag is restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert (
        isinstance(res, PacBayesResult) and res.n == 300 and res.d == 64 * 16 + 16 + 170
    )
    assert res.train_error < 0.05 and res.test_error < 0.5
    assert len(res.isotropic.candidates) == len(DEFAULT_PRIOR_SIGMAS)
    pc, iso, hes = res.parameter_count, res.isotropic, res.hessian
    assert 0 <= pc.train_error <= pc.bound <= 1
    for part in (iso, hes):
        assert 0 <= part.mc_error <= part.mc_error_bound <= part.bound <= 1
        assert part.kl >= 0 and 0 <= part.mc_test_error <= 1
    assert res.curvature_converged
    # strict JSON, and an exact round trip
    json.dumps(res.to_dict(), allow_nan=False)
    assert "curvature_vectors" not in res.to_dict()
    back = lg.load_result(lg.save_result(res, tmp_path / "pb"))
    assert_results_equal(res, back)
    # headline numbers reach a results row
    row = row_entries(res, "pac_bayes")
    assert row["pac_bayes_hessian"] == hes.bound and "pac_bayes_test_error" in row


def test_init_as_a_flat_vector_gives_the_same_bounds(digits_mlp):
    model, init, train, _ = digits_mlp
    theta0 = torch.cat([p.detach().reshape(-1) for p in init.parameters()])
    a = pac_bayes_bounds(
        model, nn.CrossEntropyLoss(), init, train, **FAST, hessian_rank=2
    )
    b = pac_bayes_bounds(
        model, nn.CrossEntropyLoss(), theta0, train, **FAST, hessian_rank=2
    )
    assert a.isotropic.kl == b.isotropic.kl and a.hessian.bound == b.hessian.bound


# ----------------------------------------------------------------- bad input
def bad_calls():
    model, init, data = softmax_regression(steps=0)
    X, y = data
    return (
        model,
        init,
        data,
        [
            ({"delta": 0.0}, ValueError, "delta must be a probability in"),
            ({"delta": 1.5}, ValueError, "delta must be a probability in"),
            (
                {"delta": 0.6, "mc_delta": 0.5},
                ValueError,
                "delta \\+ mc_delta must be < 1",
            ),
            ({"prior_sigmas": ()}, ValueError, "prior_sigmas must be a non-empty"),
            ({"prior_sigmas": (0.1, -0.1)}, ValueError, "finite numbers > 0"),
            ({"scale_grid": []}, ValueError, "scale_grid must be a non-empty"),
            ({"eps_grid": (0.0,)}, ValueError, "eps_grid must hold finite numbers > 0"),
            ({"bits": ()}, ValueError, "bits must be"),
            ({"bits": (1, 8)}, ValueError, "in \\[2, 32\\]"),
            ({"curvature": "fisher"}, ValueError, "'hessian' or 'ggn'"),
            ({"mc_samples": 0}, ValueError, "mc_samples must be an integer >= 1"),
            ({"hessian_rank": 100}, ValueError, "at most the number of parameters"),
            (
                {"init": nn.Linear(5, 3).double()},
                ValueError,
                "shape \\(3, 5\\) in init",
            ),
            ({"init": torch.zeros(7, dtype=DTYPE)}, ValueError, "shape \\(15,\\)"),
            ({"init": "init"}, TypeError, "init must be the network at initialization"),
            ({"model": "model"}, TypeError, "model must be a trained torch.nn.Module"),
            (
                {
                    "train_data": (X, torch.randn(60, 3, dtype=DTYPE)),
                    "loss_fn": nn.MSELoss(),
                },
                ValueError,
                "integer class labels",
            ),
            ({"train_data": (X[:5], y[:5])}, ValueError, "n >= 8"),
        ],
    )


def test_bad_input_is_refused_with_the_fix():
    model, init, data, cases = bad_calls()
    loss = nn.CrossEntropyLoss()
    for change, error, message in cases:
        kw = {"model": model, "loss_fn": loss, "init": init, "train_data": data}
        kw.update(change)
        with pytest.raises(error, match=message):
            pac_bayes_bounds(**kw)


def test_batchnorm_statistics_are_refused():
    torch.manual_seed(0)
    init = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    model = copy.deepcopy(init)
    X = torch.randn(40, 4, dtype=DTYPE)
    model.train()
    model(X)  # running statistics learned from the data
    model.eval()
    y = torch.randint(0, 3, (40,))
    with pytest.raises(ValueError, match="BatchNorm running statistics"):
        pac_bayes_bounds(model, nn.CrossEntropyLoss(), init, (X, y), **FAST)


def test_every_public_name_is_importable():
    import lossgeom.theory as theory

    for name in theory.__all__:
        assert getattr(theory, name) is not None, name
