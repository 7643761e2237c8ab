"""Gradient noise, alignment, gradient fraction, difficulty index: dense references."""

from __future__ import annotations

import json
import math

import pytest
import scipy.linalg
import torch
from torch import nn

import lossgeom as lg
from lossgeom.measures import (
    difficulty_index,
    gradient_fraction,
    gradient_noise,
    noise_alignment,
    noise_scale,
    quadratic_prediction,
)
from lossgeom.testing import (
    exact_gradient,
    exact_gradient_covariance,
    exact_hessian,
)

from cases import CASES

BY_NAME = {c.name: c for c in CASES}
DENSE_CASES = ["tanh_mlp", "cnn_batchnorm", "residual_block", "softmax_regression"]
TIGHT = 1e-10  # Lanczos relative residual tolerance for exact comparisons


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two shared cores: intra-op threads spin against other processes (measured
    # 80x slower Hessian products under load); one thread is faster here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_obj(name: str, **kwargs) -> lg.Objective:
    case = BY_NAME[name]
    model, loss_fn, X, y = case.make()
    return lg.Objective(model, loss_fn, (X, y), batch_size=case.batch_size, **kwargs)


def dense_top(A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    vals, vecs = torch.linalg.eigh(A)
    return vals.flip(0)[:k], vecs.flip(1)[:, :k]


def regression_obj(n: int = 240, seed: int = 0) -> lg.Objective:
    """A small tanh MLP on random regression data (float64), N large enough to sample."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.sin(X[:, :2]) + 0.3 * torch.randn(
        n, 2, generator=gen, dtype=torch.float64
    )
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    return lg.Objective(model, nn.MSELoss(), (X, y))


# ----------------------------------------------------------------- spectrum
@pytest.mark.parametrize("name", DENSE_CASES)
def test_gradient_noise_matches_dense(name):
    obj = make_obj(name)
    S = exact_gradient_covariance(obj)
    g = exact_gradient(obj)
    res = gradient_noise(obj, k=3, tol=TIGHT)
    top, _ = dense_top(S, 3)
    assert res.converged.all()
    torch.testing.assert_close(res.eigenvalues, top, rtol=1e-8, atol=1e-12)
    assert res.trace == pytest.approx(float(S.trace()), rel=1e-10)
    assert res.grad_norm_sq == pytest.approx(float(g @ g), rel=1e-10)
    assert res.noise_scale == pytest.approx(float(S.trace() / (g @ g)), rel=1e-10)
    assert res.top_fraction == pytest.approx(float(top.sum() / S.trace()), rel=1e-8)
    assert res.vectors.shape == (obj.dim, 3)


def test_uncached_per_sample_path_agrees():
    obj = make_obj("tanh_mlp")
    cached = noise_scale(obj)
    streamed = noise_scale(obj, cache_bytes=0)
    assert streamed.value == pytest.approx(cached.value, rel=1e-12)
    assert cached.stderr == 0.0


@pytest.mark.parametrize("name", ["tanh_mlp", "logistic_regression", "least_squares"])
def test_noise_scale_per_sample_matches_dense(name):
    obj = make_obj(name)
    S = exact_gradient_covariance(obj)
    g = exact_gradient(obj)
    res = noise_scale(obj, method="per_sample")
    assert res.value == pytest.approx(float(S.trace() / (g @ g)), rel=1e-10)
    assert res.trace == pytest.approx(float(S.trace()), rel=1e-10)
    json.dumps(res.to_dict())


# ------------------------------------------------------------ two batch sizes
@pytest.mark.parametrize("batch_sizes", [(8, 64), (5, 240)])
def test_two_batch_agrees_with_per_sample_in_expectation(batch_sizes):
    obj = regression_obj()
    exact = noise_scale(obj)
    runs = [
        noise_scale(obj, "two_batch", batch_sizes=batch_sizes, n_repeats=12, seed=s)
        for s in range(24)
    ]
    for attr in ("trace", "grad_norm_sq", "value"):
        vals = torch.tensor([getattr(r, attr) for r in runs], dtype=torch.float64)
        sem = float(vals.std()) / math.sqrt(len(runs))
        gap = abs(float(vals.mean()) - getattr(exact, attr))
        assert gap < 4 * sem + 1e-12 * abs(getattr(exact, attr)), attr
    # the reported standard errors describe the spread over seeds
    for attr, err in (("trace", "trace_stderr"), ("value", "stderr")):
        spread = float(torch.tensor([getattr(r, attr) for r in runs]).std())
        typical = float(torch.tensor([getattr(r, err) for r in runs]).median())
        assert 0.5 < typical / spread < 2.0, (attr, typical, spread)


def test_two_batch_finite_population_correction():
    # B_big = N: the big-batch gradient is exact, so E|G_s|^2 - |g|^2 is
    # tr(Sigma) (N - B) / (B (N - 1)), not tr(Sigma) / B; check the estimator
    # recovers tr(Sigma) and that the naive 1/B factor is distinguishable.
    obj = regression_obj(n=40)
    exact = noise_scale(obj)
    runs = [
        noise_scale(obj, "two_batch", batch_sizes=(20, 40), n_repeats=50, seed=s)
        for s in range(6)
    ]
    tr = torch.tensor([r.trace for r in runs], dtype=torch.float64)
    sem = float(tr.std()) / math.sqrt(len(runs))
    assert abs(float(tr.mean()) - exact.trace) < 4 * sem
    naive = float(tr.mean()) * (40 - 20) / (20 * 39) * 20  # what 1/B would give
    assert abs(naive - exact.trace) > 8 * sem


def test_two_batch_is_seeded():
    obj = regression_obj(n=60)
    a = noise_scale(obj, "two_batch", batch_sizes=(4, 32), n_repeats=3, seed=1)
    b = noise_scale(obj, "two_batch", batch_sizes=(4, 32), n_repeats=3, seed=1)
    c = noise_scale(obj, "two_batch", batch_sizes=(4, 32), n_repeats=3, seed=2)
    assert a.value == b.value and a.value != c.value
    assert a.cost.counters["minibatch_gradients"] == 3 * 8
    assert a.parameters["batch_sizes"] == [4, 32]


# ------------------------------------------------------------------ alignment
@pytest.mark.parametrize("name", ["tanh_mlp", "cnn_batchnorm", "residual_block"])
def test_noise_alignment_matches_scipy(name):
    obj = make_obj(name)
    k = 3
    _, Us = dense_top(exact_gradient_covariance(obj), k)
    _, Uh = dense_top(exact_hessian(obj), k)
    ref = torch.as_tensor(scipy.linalg.subspace_angles(Us.numpy(), Uh.numpy()))
    res = noise_alignment(obj, k=k, tol=TIGHT)
    assert res.converged
    torch.testing.assert_close(res.angles, ref.sort().values, rtol=0, atol=1e-6)
    kappa = float(torch.cos(ref).pow(2).mean())
    assert res.kappa == pytest.approx(kappa, abs=1e-8)
    assert float((Us.T @ Uh).pow(2).sum()) / k == pytest.approx(kappa, abs=1e-10)
    assert 0.0 <= res.kappa <= 1.0
    assert res.kappa_bound < 1e-4
    out = res.to_dict()
    assert "sigma_vectors" not in out and "hessian_vectors" not in out
    json.dumps(out)


def test_kappa_bound_bounds_a_loose_solve():
    obj = make_obj("tanh_mlp")
    k = 3
    _, Us = dense_top(exact_gradient_covariance(obj), k)
    _, Uh = dense_top(exact_hessian(obj), k)
    exact = float((Us.T @ Uh).pow(2).sum()) / k
    for tol in (1e-2, 1e-3, 1e-5):
        res = noise_alignment(obj, k=k, tol=tol, max_matvecs=12)
        assert abs(res.kappa - exact) <= res.kappa_bound + 1e-12, tol


def _regression_mlp():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(60, 4, generator=gen, dtype=torch.float64)
    y = torch.sin(X[:, :2]) + 0.3 * torch.randn(
        60, 2, generator=gen, dtype=torch.float64
    )
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    return lg.Objective(m, nn.MSELoss(), (X, y))


def test_error_bounds_hold_for_unconverged_solves():
    # Before convergence Lanczos can miss an eigenvalue: the gap after the k-th
    # Ritz value is then unknown and no finite bound may be claimed.
    obj = _regression_mlp()
    H, g = exact_hessian(obj), exact_gradient(obj)
    _, U = dense_top(H, 5)
    _, Us = dense_top(exact_gradient_covariance(obj), 5)
    for k in (1, 2, 3):
        exact = float((U[:, :k].T @ g).pow(2).sum() / (g @ g))
        kappa = float((Us[:, :k].T @ U[:, :k]).pow(2).sum()) / k
        for mv in (8, 12, 20):
            for seed in range(3):
                r = gradient_fraction(obj, k=k, max_matvecs=mv, tol=1e-3, seed=seed)
                assert abs(r.value - exact) <= r.bound + 1e-12, (k, mv, seed)
                a = noise_alignment(obj, k=k, max_matvecs=mv, tol=1e-3, seed=seed)
                assert abs(a.kappa - kappa) <= a.kappa_bound + 1e-12, (k, mv, seed)
    with pytest.raises(ValueError, match="max_matvecs"):
        gradient_fraction(obj, k=3, max_matvecs=3)


def test_whole_space_is_fully_aligned():
    obj = make_obj("least_squares")  # d = 12, N = 27
    res = noise_alignment(obj, k=obj.dim, tol=TIGHT)
    assert res.kappa == pytest.approx(1.0, abs=1e-10)
    assert res.kappa_bound == 0.0


# ------------------------------------------------------------ gradient share
@pytest.mark.parametrize("name", ["tanh_mlp", "cnn_batchnorm", "softmax_regression"])
def test_gradient_fraction_matches_dense(name):
    obj = make_obj(name)
    k = 4
    _, U = dense_top(exact_hessian(obj), k)
    g = exact_gradient(obj)
    ref = float((U.T @ g).pow(2).sum() / (g @ g))
    res = gradient_fraction(obj, k=k, tol=TIGHT)
    assert res.value == pytest.approx(ref, abs=1e-8)
    assert float(res.per_direction.sum()) == pytest.approx(ref, abs=1e-8)
    assert res.grad_norm == pytest.approx(float(g.norm()), rel=1e-10)
    assert res.bound < 1e-4


def test_gradient_fraction_whole_space_is_one():
    obj = make_obj("softmax_regression")  # d = 15
    res = gradient_fraction(obj, k=obj.dim)
    assert res.value == pytest.approx(1.0, abs=1e-10)
    assert res.bound == 0.0


# ----------------------------------------------------------------- difficulty
@pytest.mark.parametrize("name", ["tanh_mlp", "cnn_batchnorm"])
def test_difficulty_index_factors_match_dense(name):
    obj = make_obj(name)
    k = 3
    S, H = exact_gradient_covariance(obj), exact_hessian(obj)
    lam_h, Uh = dense_top(H, k)
    _, Us = dense_top(S, k)
    kappa = float((Us.T @ Uh).pow(2).sum()) / k
    res = difficulty_index(obj, k=k, tol=TIGHT, trace_max_matvecs=60)
    assert res.lambda_max == pytest.approx(float(lam_h[0]), rel=1e-8)
    assert res.lambda_max_bound < 1e-8 * abs(res.lambda_max)
    assert res.kappa == pytest.approx(kappa, abs=1e-8)
    T = float(H.trace())
    assert abs(res.hessian_trace - T) <= 4 * res.hessian_trace_stderr + 1e-9 * abs(T)
    assert res.value == pytest.approx(
        res.lambda_max**2 / res.hessian_trace * res.kappa, rel=1e-12
    )
    exact = float(lam_h[0]) ** 2 / T * kappa
    assert abs(res.value - exact) <= 4 * res.bound + 1e-9 * exact
    assert res.alignment["kappa"] == res.kappa
    json.dumps(res.to_dict())


def test_difficulty_trace_error_shrinks_with_budget():
    obj = make_obj("tanh_mlp")
    small = difficulty_index(obj, k=2, trace_max_matvecs=12, seed=3)
    large = difficulty_index(obj, k=2, trace_max_matvecs=120, seed=3)
    assert large.hessian_trace_stderr < small.hessian_trace_stderr
    assert large.bound < small.bound


# ----------------------------------------------------------- quadratic model
def test_quadratic_prediction_exact_for_quadratic_loss():
    obj = make_obj("least_squares")
    etas = [1e-3, 0.05, 0.5, 2.0]
    res = quadratic_prediction(obj, eta=etas)
    torch.testing.assert_close(res.predicted, res.actual, rtol=1e-9, atol=1e-12)
    v = torch.randn(
        obj.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    res = quadratic_prediction(obj, v, eta=etas)
    torch.testing.assert_close(res.predicted, res.actual, rtol=1e-9, atol=1e-12)
    H, g = exact_hessian(obj), exact_gradient(obj)
    assert res.slope == pytest.approx(float(v @ g), rel=1e-10)
    assert res.curvature == pytest.approx(float(v @ H @ v), rel=1e-10)
    assert res.direction == "given"
    # the quadratic's minimiser along v is the best step
    best = quadratic_prediction(obj, v, eta=[res.best_eta, 0.9 * res.best_eta])
    assert best.actual[0] < best.actual[1]


def test_quadratic_prediction_error_is_third_order():
    obj = make_obj("tanh_mlp")
    etas = torch.tensor([0.2, 0.1, 0.05], dtype=torch.float64)
    res = quadratic_prediction(obj, eta=etas)
    assert res.direction == "gradient"
    assert res.slope == pytest.approx(
        float(exact_gradient(obj).pow(2).sum()), rel=1e-10
    )
    err = (res.predicted - res.actual).abs()
    ratios = err[:-1] / err[1:]  # halving eta divides an O(eta^3) error by 8
    assert ((ratios > 6) & (ratios < 10)).all(), ratios
    first_err = (res.first_order - res.actual).abs()
    assert (err < first_err).all()


# -------------------------------------------------------------------- errors
def test_train_mode_batchnorm_is_refused_clearly():
    obj = make_obj("cnn_batchnorm", mode="train")
    for fn in (gradient_noise, noise_alignment, difficulty_index, noise_scale):
        with pytest.raises(ValueError, match="mode='eval'") as info:
            fn(obj)
        assert "BatchNorm" in str(info.value)
    with pytest.raises(ValueError, match="two_batch"):
        noise_scale(obj)
    # what needs no per-sample gradients still works in train mode
    res = noise_scale(obj, "two_batch", batch_sizes=(3, 12), n_repeats=3)
    assert math.isfinite(res.value)
    assert res.parameters["objective"]["mode"] == "train"
    assert 0.0 <= gradient_fraction(obj, k=2).value <= 1.0


def test_bad_k():
    obj = make_obj("tanh_mlp")  # N = 23
    with pytest.raises(ValueError, match="rank at most N - 1 = 22"):
        gradient_noise(obj, k=23)
    with pytest.raises(ValueError, match="1 <= k"):
        noise_alignment(obj, k=0)
    with pytest.raises(ValueError, match=f"d = {obj.dim}"):
        gradient_fraction(obj, k=obj.dim + 1)
    with pytest.raises(ValueError, match="k must be an integer"):
        difficulty_index(obj, k=2.5)
    small = make_obj("least_squares")  # d = 12 < N
    with pytest.raises(ValueError, match="d = 12"):
        gradient_noise(small, k=13)


@pytest.mark.parametrize(
    "batch_sizes, match",
    [
        ((8, 8), "B_small < B_big"),
        ((16, 8), "B_small < B_big"),
        ((0, 8), "B_small < B_big"),
        ((4, 241), "N = 240"),
        ((4,), "pair of integers"),
        ((4.0, 8), "pair of integers"),
    ],
)
def test_bad_batch_sizes(batch_sizes, match):
    obj = regression_obj()
    with pytest.raises(ValueError, match=match):
        noise_scale(obj, "two_batch", batch_sizes=batch_sizes)


def test_other_bad_input():
    obj = make_obj("least_squares")
    with pytest.raises(ValueError, match="n_repeats"):
        noise_scale(obj, "two_batch", batch_sizes=(2, 8), n_repeats=1)
    with pytest.raises(ValueError, match="method"):
        noise_scale(obj, "exact")
    with pytest.raises(TypeError, match="Objective"):
        gradient_noise(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="eta"):
        quadratic_prediction(obj, eta=[])
    with pytest.raises(ValueError, match="eta"):
        quadratic_prediction(obj, eta=float("nan"))
    with pytest.raises(ValueError, match=r"shape \(12,\)"):
        quadratic_prediction(obj, torch.zeros(3, dtype=torch.float64), eta=0.1)


def test_model_is_left_untouched():
    case = BY_NAME["cnn_batchnorm"]
    model, loss_fn, X, y = case.make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    obj = lg.Objective(model, loss_fn, (X, y), batch_size=5)
    difficulty_index(obj, k=2)
    quadratic_prediction(obj, eta=0.1)
    train = lg.Objective(model, loss_fn, (X, y), mode="train")
    noise_scale(train, "two_batch", batch_sizes=(3, 12), n_repeats=2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [m.training for m in model.modules()]
