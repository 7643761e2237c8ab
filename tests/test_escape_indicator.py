"""The escaping indicator tr(H Sigma): dense references, sampling, minibatch factor."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import lossgeom as lg
from lossgeom.measures import (
    CALLBACKS,
    NoiseCurvatureResult,
    check_options,
    default_key,
    noise_curvature,
    run_measure,
)
from lossgeom.testing import (
    assert_results_equal,
    exact_gradient_covariance,
    exact_hessian,
)

from cases import CASES

BY_NAME = {c.name: c for c in CASES}
DTYPE = torch.float64
REL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two shared cores: one intra-op thread is faster than two fighting others.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def per_sample_grads(model: nn.Module, loss_fn, X, y) -> torch.Tensor:
    """Per-sample gradients ``(N, D)`` by ``torch.func`` (eval mode), independently."""
    model = copy.deepcopy(model).eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in model.named_parameters() if p.requires_grad]
    sizes = [math.prod(s) for s in shapes]
    buffers = dict(model.named_buffers())
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_i(t, xi, yi):
        params = {
            n: chunk.reshape(s)
            for n, chunk, s in zip(names, t.split(sizes), shapes, strict=True)
        }
        out = functional_call(model, (params, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    return vmap(grad(loss_i), in_dims=(None, 0, 0))(theta, X, y)


def dense_reference(H: torch.Tensor, G: torch.Tensor) -> dict[str, float]:
    """The formulas, from the dense Hessian and the per-sample gradients."""
    C = G - G.mean(0)
    S = C.T @ C / G.shape[0]
    D = H.shape[0]
    value = float((C @ H * C).sum(1).mean())
    iso = float(H.trace() * S.trace()) / D
    return {
        "value": value,
        "trace_sigma": float(S.trace()),
        "trace_h": float(H.trace()),
        "isotropic": iso,
        "ratio": value / iso,
        "value_by_matrix": float((H * S).sum()),
    }


def make(name: str, **kwargs):
    model, loss_fn, X, y = BY_NAME[name].make()
    obj = lg.Objective(
        model, loss_fn, (X, y), batch_size=BY_NAME[name].batch_size, **kwargs
    )
    return obj, model, loss_fn, X, y


# ------------------------------------------------------------ dense reference
@pytest.mark.parametrize("name", ["tanh_mlp", "cnn_batchnorm", "softmax_regression"])
def test_matches_dense_formulas(name):
    obj, model, loss_fn, X, y = make(name)
    G = per_sample_grads(model, loss_fn, X, y)
    H = exact_hessian(obj)
    ref = dense_reference(H, G)
    assert ref["value"] == pytest.approx(ref["value_by_matrix"], rel=1e-12)
    n, d = G.shape
    res = noise_curvature(obj, trace_probes=d, batch_size=4, chunk_size=5)
    for field in ("value", "trace_sigma", "trace_h", "isotropic", "ratio"):
        assert getattr(res, field) == pytest.approx(ref[field], rel=REL), field
    assert res.stderr == 0.0 and res.trace_h_stderr == 0.0
    assert res.ratio_stderr == 0.0 and res.trace_h_method == "exact"
    assert (res.samples, res.n_samples, res.dim) == (n, n, d)
    # minibatch versions: the factor times each
    c = (n - 4) / (4 * (n - 1))
    assert res.batch_factor == pytest.approx(c, rel=1e-15)
    assert res.value_batch == pytest.approx(c * ref["value"], rel=REL)
    assert res.trace_sigma_batch == pytest.approx(c * ref["trace_sigma"], rel=REL)
    assert res.isotropic_batch == pytest.approx(c * ref["isotropic"], rel=REL)
    # one product per sample, d for the exact trace; two data passes
    assert res.cost.counters["noise_hvps"] == n
    assert res.cost.counters["trace_hvps"] == d
    assert res.cost.matvecs == n + d
    assert res.cost.counters["per_sample_grad"] == 1
    assert res.cost.data_passes == 2  # the kept graph, the per-sample gradients
    q_ref = ((G - G.mean(0)) @ H * (G - G.mean(0))).sum(1)
    torch.testing.assert_close(res.quadratic_forms, q_ref, rtol=1e-9, atol=1e-12)
    assert res.parameters["objective"]["mode"] == "eval"
    assert "Zhu" in res.definition


def test_class_weighted_loss_matches_dense_and_refuses_a_batch_factor():
    model, _, X, y = BY_NAME["softmax_regression"].make()
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 0.5], dtype=DTYPE))
    obj = lg.Objective(model, loss_fn, (X, y), batch_size=10)
    S, H = exact_gradient_covariance(obj), exact_hessian(obj)
    res = noise_curvature(obj, trace_probes=obj.dim)
    assert res.value == pytest.approx(float((H * S).sum()), rel=REL)
    assert res.trace_sigma == pytest.approx(float(S.trace()), rel=REL)
    with pytest.raises(ValueError, match="weighted mean"):
        noise_curvature(obj, batch_size=4)


def test_hutchinson_trace_carries_its_error_into_the_ratio():
    obj, model, loss_fn, X, y = make("tanh_mlp")
    H = exact_hessian(obj)
    res = noise_curvature(obj, trace_probes=30, seed=2)
    assert res.trace_h_method in ("hutchinson", "hutch++")
    assert res.trace_h_stderr > 0
    T = float(H.trace())
    assert abs(res.trace_h - T) < 4 * res.trace_h_stderr
    assert res.isotropic_stderr == pytest.approx(
        res.trace_sigma / obj.dim * res.trace_h_stderr, rel=1e-12
    )
    # delta method with an exact value: the relative errors of ratio and tr(H) agree
    assert res.ratio_stderr / abs(res.ratio) == pytest.approx(
        res.trace_h_stderr / abs(res.trace_h), rel=1e-12
    )
    assert res.cost.counters["trace_hvps"] <= 30


# --------------------------------------------------------- sampled estimator
def regression_obj(n: int = 160) -> lg.Objective:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, generator=gen, dtype=DTYPE)
    y = torch.sin(X[:, :1]) + 0.3 * torch.randn(n, 1, generator=gen, dtype=DTYPE)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    return lg.Objective(model, nn.MSELoss(), (X, y), batch_size=64)


def classification_obj(n: int) -> lg.Objective:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, 4, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 3, (n,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return lg.Objective(model, nn.CrossEntropyLoss(), (X, y))


def test_subsampled_estimator_is_unbiased_and_its_stderr_calibrated():
    # The z-scores are near normal only when the mean of n quadratic forms is: their
    # skewness here is about 0.9, and n = 100 of N = 400 (at n = 24 the sd of z is
    # about 1.1 and the 95% interval covers about 0.93; see docs/gradient_noise.md).
    obj = classification_obj(400)
    N = obj.n_samples
    exact = noise_curvature(obj, trace_probes=2)
    n, seeds = 100, 200
    q = exact.quadratic_forms
    # the estimator's true standard deviation (sampling without replacement)
    sigma = math.sqrt((1 - n / N) * float(q.var()) / n)
    runs = [
        noise_curvature(obj, samples=n, trace_probes=2, seed=s) for s in range(seeds)
    ]
    est = torch.tensor([r.value for r in runs], dtype=DTYPE)
    err = torch.tensor([r.stderr for r in runs], dtype=DTYPE)
    for r in runs[:5]:
        assert r.samples == n and r.indices.unique().numel() == n
        torch.testing.assert_close(r.quadratic_forms, q[r.indices])
    # unbiased: the mean over seeds is within 4 of its standard errors
    assert abs(float(est.mean()) - exact.value) < 4 * sigma / math.sqrt(seeds)
    # the spread over seeds is the predicted one (normal theory, 4 sd)
    band = 4 / math.sqrt(2 * (seeds - 1))
    assert abs(float(est.std()) / sigma - 1) < band
    # s^2 is unbiased for the population variance: mean stderr^2 ~ sigma^2
    sq = err.pow(2)
    assert abs(float(sq.mean()) - sigma**2) < 4 * float(sq.std()) / math.sqrt(seeds)
    # z-scores: mean ~0, sd ~1, coverage of the 95% interval ~0.95
    z = (est - exact.value) / err
    assert abs(float(z.mean())) < 4 / math.sqrt(seeds)
    assert abs(float(z.std()) - 1) < band
    coverage = float((z.abs() < 1.96).double().mean())
    assert abs(coverage - 0.95) < 4 * math.sqrt(0.95 * 0.05 / seeds)


def test_all_samples_is_exact_and_seeds_differ():
    obj = regression_obj(60)
    exact = noise_curvature(obj, trace_probes=2)
    full = noise_curvature(obj, samples=60, trace_probes=2, seed=5)
    assert full.value == pytest.approx(exact.value, rel=1e-14) and full.stderr == 0
    a = noise_curvature(obj, samples=10, trace_probes=2, seed=1)
    b = noise_curvature(obj, samples=10, trace_probes=2, seed=1)
    c = noise_curvature(obj, samples=10, trace_probes=2, seed=2)
    assert a.value == b.value and a.value != c.value
    assert a.cost.counters["noise_hvps"] == 10


# --------------------------------------------------------- minibatch factor
@pytest.mark.parametrize("B", [1, 2, 3, 6, 7])
def test_batch_factor_against_all_minibatches(B):
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(7, 3, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 2, (7,), generator=gen)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    loss_fn = nn.CrossEntropyLoss()
    obj = lg.Objective(model, loss_fn, (X, y))
    G = per_sample_grads(model, loss_fn, X, y)
    H = exact_hessian(obj)
    # the covariance of the minibatch mean over every subset of size B
    means = torch.stack(
        [G[list(s)].mean(0) for s in itertools.combinations(range(7), B)]
    )
    dev = means - means.mean(0)
    cov_b = dev.T @ dev / means.shape[0]
    torch.testing.assert_close(means.mean(0), G.mean(0))
    C = G - G.mean(0)
    S = C.T @ C / 7
    torch.testing.assert_close(cov_b, (7 - B) / (B * 6) * S, rtol=1e-10, atol=1e-14)
    res = noise_curvature(obj, batch_size=B, trace_probes=obj.dim)
    d = obj.dim
    scale = max(float((H * S).sum()), 1e-300)
    assert res.value_batch == pytest.approx(
        float((H * cov_b).sum()), rel=REL, abs=REL * scale
    )
    assert res.trace_sigma_batch == pytest.approx(
        float(cov_b.trace()), rel=REL, abs=REL * float(S.trace())
    )
    assert res.isotropic_batch == pytest.approx(
        float(H.trace() * cov_b.trace()) / d, rel=REL, abs=REL * abs(res.isotropic)
    )
    # the naive 1/B would be wrong unless B = 1
    if B > 1:
        assert abs(res.trace_sigma_batch - res.trace_sigma / B) > 0.1 * (
            res.trace_sigma / B
        )


# --------------------------------------------- the ratio on a controlled case
class Quadratic(nn.Module):
    """``out = (theta - x) R``: with MSE to zero, H = (2/D) R R^T for every theta."""

    def __init__(self, root: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(root.shape[0], dtype=DTYPE))
        self.register_buffer("root", root)

    def forward(self, x):
        return (self.theta - x) @ self.root


def quadratic_obj(eigs: torch.Tensor, noise: torch.Tensor, n: int = 40):
    """A quadratic whose Hessian and noise covariance share eigenvectors ``Q``.

    ``A = Q diag(eigs) Q^T``, ``H = (2/D) A``, ``g_i = (2/D) A (theta - x_i)``;
    with ``M = Q diag(noise) Q^T``, inputs ``x_i = A^{-1} M^{1/2} z_i`` and ``z``
    exactly whitened (mean 0, covariance I), ``Sigma = (4/D^2) M``.
    """
    D = eigs.numel()
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=DTYPE))
    A = Q @ torch.diag(eigs) @ Q.T
    M = Q @ torch.diag(noise) @ Q.T
    Z = torch.randn(n, D, generator=gen, dtype=DTYPE)
    Z, _ = torch.linalg.qr(Z - Z.mean(0))
    Z = Z * math.sqrt(n)
    w, V = torch.linalg.eigh(M)
    M_half = V @ torch.diag(w.clamp_min(0).sqrt()) @ V.T
    X = Z @ M_half @ torch.linalg.inv(A)
    root = Q @ torch.diag(eigs.sqrt())
    model = Quadratic(root)
    obj = lg.Objective(model, nn.MSELoss(), (X, torch.zeros(n, D, dtype=DTYPE)))
    return obj


def test_ratio_reads_the_alignment_of_noise_and_curvature():
    eigs = torch.tensor([10.0, 3.0, 1.0, 1.0, 0.5], dtype=DTYPE)
    D = eigs.numel()
    e = torch.eye(D, dtype=DTYPE)
    # noise along the top Hessian eigenvector: ratio = D lambda_max / tr(A)
    top = noise_curvature(quadratic_obj(eigs, e[0]), trace_probes=D)
    assert top.trace_sigma == pytest.approx(4 / D**2, rel=1e-10)
    assert top.ratio == pytest.approx(D * 10.0 / float(eigs.sum()), rel=1e-10)
    assert top.ratio > 3
    # noise along the flattest direction: ratio = D lambda_min / tr(A) < 1
    flat = noise_curvature(quadratic_obj(eigs, e[-1]), trace_probes=D)
    assert flat.ratio == pytest.approx(D * 0.5 / float(eigs.sum()), rel=1e-10)
    assert flat.ratio < 1
    # isotropic noise: ratio 1 whatever the Hessian
    iso = noise_curvature(
        quadratic_obj(eigs, torch.ones(D, dtype=DTYPE)), trace_probes=D
    )
    assert iso.ratio == pytest.approx(1.0, rel=1e-10)
    assert iso.value == pytest.approx(iso.isotropic, rel=1e-10)
    assert iso.trace_h == pytest.approx(2 / D * float(eigs.sum()), rel=1e-10)


def test_ratio_is_large_for_noise_like_sgd_on_least_squares():
    # Least squares with noise independent of the inputs: Sigma ~ sigma^2 E[x x^T],
    # proportional to H, so ratio ~ D tr(H^2) / tr(H)^2 > 1 (Zhu et al.'s case).
    gen = torch.Generator().manual_seed(1)
    scales = torch.tensor([3.0, 1.0, 1.0, 0.5], dtype=DTYPE)
    X = torch.randn(400, 4, generator=gen, dtype=DTYPE) * scales
    y = torch.randn(400, 1, generator=gen, dtype=DTYPE)
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    obj = lg.Objective(model, nn.MSELoss(), (X, y))
    res = noise_curvature(obj, trace_probes=4)
    s2 = scales**2
    predicted = 4 * float((s2**2).sum()) / float(s2.sum()) ** 2
    assert res.ratio == pytest.approx(predicted, rel=0.3)
    assert res.ratio > 2


# ------------------------------------------------------------ saving, training
def test_save_load_round_trip(tmp_path):
    obj = regression_obj(60)
    for res in (
        noise_curvature(obj, samples=20, batch_size=8, trace_probes=10, seed=3),
        noise_curvature(obj, trace_probes=4),
    ):
        assert isinstance(res, NoiseCurvatureResult)
        folder = lg.save_result(res, tmp_path / f"r{res.samples}")
        assert_results_equal(res, lg.load_result(folder))
        out = res.to_dict()
        assert "quadratic_forms" not in out and "indices" not in out
        json.dumps(out, allow_nan=False)
    assert res.batch_size is None and res.value_batch is None
    assert "value_batch" not in res.scalars()


def test_registered_as_a_measure():
    assert CALLBACKS["noise_curvature"] is noise_curvature
    assert default_key("noise_curvature", {}) == "noise_curvature"
    check_options("noise_curvature", {"batch_size": 8, "samples": 16})
    with pytest.raises(ValueError, match="no options"):
        check_options("noise_curvature", {"batchsize": 8})
    row = run_measure(
        "noise_curvature", regression_obj(40), {"batch_size": 8, "trace_probes": 4}, 0
    )
    for col in (
        "noise_curvature",
        "noise_curvature_stderr",
        "noise_curvature_ratio",
        "noise_curvature_trace_h",
        "noise_curvature_trace_sigma",
        "noise_curvature_isotropic",
        "noise_curvature_value_batch",
        "noise_curvature_seconds",
    ):
        assert col in row, col


def test_runs_as_a_training_measure(tmp_path):
    cfg = {
        "model": {"name": "mlp", "options": {"width": 8}},
        "data": {"name": "digits", "subset": 128},
        "steps": 4,
        "batch_size": 16,
        "metrics": {
            "every": 2,
            "sharpness": False,
            "probe_samples": 32,
            "measures": [
                {"name": "noise_curvature"},
                {
                    "name": "noise_curvature",
                    "key": "escape",
                    "options": {"samples": 8, "batch_size": 16, "trace_probes": 10},
                },
            ],
        },
    }
    res = lg.train(cfg, tmp_path / "run")
    assert res.status == "finished"
    rows = {r["step"]: r for r in res.metrics}
    assert sorted(rows) == [0, 2, 4]
    for row in rows.values():
        assert row["noise_curvature"] > 0 and row["noise_curvature_stderr"] == 0
        assert math.isfinite(row["noise_curvature_ratio"])
        assert row["noise_curvature_trace_sigma"] > 0
        assert row["escape_stderr"] > 0 and "escape_value_batch" in row
        assert "noise_curvature_failed" not in row and "escape_failed" not in row


# ------------------------------------------------------------------- errors
def test_bad_input_is_refused_clearly():
    obj = regression_obj(40)
    with pytest.raises(TypeError, match="Objective"):
        noise_curvature(nn.Linear(2, 2))
    for b in (0, 41, 2.0, True):
        with pytest.raises(ValueError, match=r"batch_size must be an integer.*N = 40"):
            noise_curvature(obj, batch_size=b)
    for s in (1, 41, 3.5):
        with pytest.raises(ValueError, match=r"samples must be an integer.*2 <= "):
            noise_curvature(obj, samples=s)
    with pytest.raises(ValueError, match="trace_probes"):
        noise_curvature(obj, trace_probes=1)
    with pytest.raises(ValueError, match="chunk_size"):
        noise_curvature(obj, chunk_size=0)
    train, *_ = make("cnn_batchnorm", mode="train")
    with pytest.raises(ValueError, match="mode='eval'"):
        noise_curvature(train)


def test_a_loss_that_couples_samples_is_refused():
    def coupled(out, y):  # the square of the batch mean: no per-sample terms
        return (out - y).mean() ** 2

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(12, 3, generator=gen, dtype=DTYPE)
    y = torch.randn(12, 1, generator=gen, dtype=DTYPE)
    obj = lg.Objective(nn.Linear(3, 1).double(), coupled, (X, y))
    with pytest.raises(ValueError, match="sum of per-sample terms"):
        noise_curvature(obj)

    def mean_sq(out, y):  # a plain mean over samples: fine
        return ((out - y) ** 2).mean()

    obj = lg.Objective(nn.Linear(3, 1).double(), mean_sq, (X, y))
    H = exact_hessian(obj)
    S = exact_gradient_covariance(obj)
    assert noise_curvature(obj).value == pytest.approx(float((H * S).sum()), rel=REL)


def test_model_is_left_untouched():
    model, loss_fn, X, y = BY_NAME["cnn_batchnorm"].make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    flags = [m.training for m in model.modules()]
    obj = lg.Objective(model, loss_fn, (X, y), batch_size=5)
    noise_curvature(obj, samples=6, batch_size=3, trace_probes=8)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [m.training for m in model.modules()]
    assert all(p.grad is None for p in model.parameters())
