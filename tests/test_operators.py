"""Hessian, GGN and gradient covariance against dense float64 references."""

import pytest
import torch
from torch import nn

import lossgeom as lg
from lossgeom.testing import exact_ggn, exact_gradient_covariance, exact_hessian

from cases import CASES, DTYPE, rel_err

TOL = 1e-10


def objective(case, device, **kw):
    model, loss_fn, X, y = case.make(device)
    return lg.Objective(model, loss_fn, (X, y), batch_size=case.batch_size, **kw)


def test_hessian_matches_dense_reference(case, device):
    obj = objective(case, device)
    H_ref = exact_hessian(obj)
    assert rel_err(lg.hessian(obj).to_dense(), H_ref) <= TOL
    V = torch.randn(obj.dim, 3, dtype=DTYPE, device=device)
    assert rel_err(obj.hvp(V), H_ref @ V) <= TOL
    assert rel_err(obj.hvp(V[:, 0]), H_ref @ V[:, 0]) <= TOL


@pytest.mark.parametrize("backend", ["forward-over-reverse", "double-backward"])
def test_both_hvp_backends_match_reference(case, backend):
    obj = objective(case, "cpu", hvp_backend=backend)
    V = torch.randn(obj.dim, 4, dtype=DTYPE)
    assert rel_err(obj.hvp(V), exact_hessian(obj) @ V) <= TOL
    assert obj.hvp_backend_used == backend


def test_ggn_matches_dense_reference(case, device):
    obj = objective(case, device)
    G_ref = exact_ggn(obj)
    G = lg.ggn(obj).to_dense()
    assert rel_err(G, G_ref) <= TOL
    # convex losses: positive semi-definite up to round-off
    assert torch.linalg.eigvalsh(G_ref).min() >= -1e-12 * G_ref.norm()


def test_ggn_reverse_only_path_matches_reference(case):
    obj = objective(case, "cpu", hvp_backend="double-backward")
    op = lg.ggn(obj)
    assert rel_err(op.to_dense(), exact_ggn(obj)) <= TOL
    assert op.backend_used == "double-backward"


def test_gradient_covariance_matches_loop_reference(case, device):
    obj = objective(case, device)
    S_ref = exact_gradient_covariance(obj)
    cached = lg.gradient_covariance(obj)
    streamed = lg.gradient_covariance(obj, cache_bytes=None)
    assert cached.cached and not streamed.cached
    V = torch.randn(obj.dim, 3, dtype=DTYPE, device=device)
    assert rel_err(cached.to_dense(), S_ref) <= TOL
    assert rel_err(cached @ V, S_ref @ V) <= TOL
    assert rel_err(streamed @ V, S_ref @ V) <= TOL


def test_gradient_covariance_options():
    obj = objective(CASES[0], "cpu")
    fisher = lg.gradient_covariance(obj, centered=False).to_dense()
    assert rel_err(fisher, exact_gradient_covariance(obj, centered=False)) <= TOL
    unbiased = lg.gradient_covariance(obj, ddof=1).to_dense()
    assert rel_err(unbiased, exact_gradient_covariance(obj, ddof=1)) <= TOL
    # Sigma = Fisher - g g^T
    g = obj.grad()
    assert (
        rel_err(lg.gradient_covariance(obj).to_dense(), fisher - torch.outer(g, g))
        <= 1e-9
    )


def _augment(X):
    return torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)


def _theta_to_wb(obj):
    # nn.Linear flattens as (weight row-major, bias); reorder to [w | b] per output
    return obj.theta


def test_logistic_regression_hessian_closed_form():
    model, loss_fn, X, y = [c for c in CASES if c.name == "logistic_regression"][
        0
    ].make()
    obj = lg.Objective(model, loss_fn, (X, y), batch_size=12)
    Z = _augment(X)  # theta = (w_1..w_4, b) for a Linear(4, 1)
    p = torch.sigmoid(Z @ obj.theta)
    H_closed = Z.T @ (Z * (p * (1 - p))[:, None]) / X.shape[0]
    assert rel_err(lg.hessian(obj).to_dense(), H_closed) <= TOL
    # linear model: the Gauss-Newton matrix is the Hessian
    assert rel_err(lg.ggn(obj).to_dense(), H_closed) <= TOL


def test_softmax_regression_hessian_closed_form():
    model, loss_fn, X, y = [c for c in CASES if c.name == "softmax_regression"][
        0
    ].make()
    obj = lg.Objective(model, loss_fn, (X, y))
    n, k, f = X.shape[0], 3, X.shape[1]
    P = torch.softmax(X @ model.weight.detach().T + model.bias.detach(), 1)
    # parameters: W (k x f, row-major) then b (k); Jacobian of logits per sample
    H = torch.zeros(obj.dim, obj.dim, dtype=DTYPE)
    for i in range(n):
        A = torch.diag(P[i]) - torch.outer(P[i], P[i])  # k x k
        J = torch.zeros(k, obj.dim, dtype=DTYPE)
        for c in range(k):
            J[c, c * f : (c + 1) * f] = X[i]
            J[c, k * f + c] = 1
        H += J.T @ A @ J
    assert rel_err(lg.hessian(obj).to_dense(), H / n) <= TOL


def test_least_squares_hessian_closed_form():
    model, loss_fn, X, y = [c for c in CASES if c.name == "least_squares"][0].make()
    obj = lg.Objective(model, loss_fn, (X, y), batch_size=10)
    Z = _augment(X)
    n, k = X.shape[0], 2
    # MSELoss averages over n * k entries; each output has its own (w, b) block
    block = 2 * Z.T @ Z / (n * k)
    H = torch.zeros(obj.dim, obj.dim, dtype=DTYPE)
    f = X.shape[1]
    idx = [list(range(c * f, (c + 1) * f)) + [k * f + c] for c in range(k)]
    for c in range(k):
        H[torch.tensor(idx[c])[:, None], torch.tensor(idx[c])[None, :]] = block
    assert rel_err(lg.hessian(obj).to_dense(), H) <= TOL


def test_operator_interface(device):
    obj = objective(CASES[0], device)
    for op in (lg.hessian(obj), lg.ggn(obj), lg.gradient_covariance(obj)):
        assert op.shape == (obj.dim, obj.dim)
        assert op.dtype == DTYPE and op.device == torch.device(device)
        v = torch.randn(obj.dim, dtype=DTYPE, device=device)
        V = torch.randn(obj.dim, 5, dtype=DTYPE, device=device)
        assert (op @ v).shape == (obj.dim,)
        assert (op @ V).shape == (obj.dim, 5)
        assert rel_err(op @ V[:, 2], (op @ V)[:, 2]) <= 1e-12
        A = op.to_dense()
        assert rel_err(A, A.T) <= 1e-12
        n_before = op.n_matvecs
        op @ V
        assert op.n_matvecs == n_before + 5


def test_operator_is_frozen_at_its_parameters():
    model, loss_fn, X, y = CASES[0].make()
    obj = lg.Objective(model, loss_fn, (X, y))
    H = lg.hessian(obj)
    before = H.to_dense()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    assert torch.equal(H.to_dense(), before)
    assert not torch.equal(lg.hessian(obj).to_dense(), before)


def test_hessian_is_ggn_plus_residual_for_linear_model_only():
    # for a nonlinear model the Hessian and GGN differ; a check that GGN is not
    # accidentally the Hessian
    obj = objective(CASES[0], "cpu")
    assert rel_err(lg.ggn(obj).to_dense(), exact_hessian(obj)) > 1e-3


def test_dense_operator_rejects_asymmetric():
    with pytest.raises(ValueError, match="symmetric"):
        lg.DenseOperator(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))


def test_to_dense_refuses_huge_dimension():
    model = nn.Linear(200, 200)
    obj = lg.Objective(model, nn.MSELoss(), (torch.randn(4, 200), torch.randn(4, 200)))
    with pytest.raises(ValueError, match="max_dim"):
        lg.hessian(obj).to_dense()
