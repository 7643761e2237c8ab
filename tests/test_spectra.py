"""Eigenvalues and traces against exact spectra; estimators checked for calibration."""

import math

import pytest
import torch

import lossgeom as lg
from lossgeom.linalg import DenseOperator, SymmetricOperator
from lossgeom.testing import exact_hessian

from cases import CASES, DTYPE, rotated


def assert_close_spectrum(values, truth, scale):
    err = (values - truth).abs()
    assert bool((err <= 1e-8 * truth.abs() + 1e-12 * scale).all()), (values, truth)


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_extreme_eigenvalues_match_the_dense_spectrum(case, which):
    model, loss_fn, X, y = case.make()
    obj = lg.Objective(model, loss_fn, (X, y), batch_size=case.batch_size)
    H = exact_hessian(obj)
    ev = torch.linalg.eigvalsh(H)
    k = min(5, obj.dim // 2)
    truth = ev.flip(0)[:k] if which == "largest" else ev[:k]
    res = lg.eigenvalues(obj, k, which=which, tol=1e-10)
    assert res.all_converged
    assert_close_spectrum(res.values, truth, ev.abs().max())
    # the reported residuals are the true ones, and certify the tolerance
    true_res = (H @ res.vectors - res.vectors * res.values).norm(dim=0)
    assert torch.allclose(res.residuals, true_res, rtol=1e-6, atol=1e-14)
    assert bool((res.residuals <= 1e-10 * res.spectral_scale).all())
    assert torch.allclose(
        res.vectors.T @ res.vectors, torch.eye(k, dtype=DTYPE), atol=1e-8
    )
    assert res.cost.matvecs > 0 and res.cost.seconds > 0


@pytest.mark.parametrize("block_size", [1, 2, 3])
def test_repeated_and_clustered_eigenvalues_without_ghosts(block_size):
    d = 300
    top = torch.tensor(
        [10.0, 9.0, 9.0, 9.0 - 1e-7, 8.0], dtype=DTYPE
    )  # a repeat and a cluster
    eigs = torch.cat([top, torch.linspace(-1, 1, d - 5, dtype=DTYPE)])
    for op in (rotated(eigs), DenseOperator(torch.diag(eigs))):
        res = lg.eigenvalues(op, 5, tol=1e-10, block_size=block_size)
        assert res.all_converged
        assert_close_spectrum(res.values, top, 10.0)
        # a ghost (one eigenvector found twice) shows as a non-orthonormal basis
        assert torch.allclose(
            res.vectors.T @ res.vectors, torch.eye(5, dtype=DTYPE), atol=1e-8
        )


def test_both_ends_and_magnitude():
    eigs = torch.cat(
        [
            torch.tensor([7.0, 6.0, -9.0, -8.0], dtype=DTYPE),
            torch.linspace(-1, 1, 196, dtype=DTYPE),
        ]
    )
    op = rotated(eigs, seed=1)
    both = lg.eigenvalues(op, 2, which="both", tol=1e-10)
    assert_close_spectrum(
        both.values, torch.tensor([7.0, 6.0, -8.0, -9.0], dtype=DTYPE), 9.0
    )
    mag = lg.eigenvalues(op, 3, which="magnitude", tol=1e-10)
    assert_close_spectrum(mag.values, torch.tensor([-9.0, -8.0, 7.0], dtype=DTYPE), 9.0)


def test_warm_start_needs_fewer_products():
    eigs = torch.cat(
        [
            torch.tensor([5.0, 4.0, 3.5], dtype=DTYPE),
            torch.linspace(0, 3, 397, dtype=DTYPE),
        ]
    )
    cold = lg.eigenvalues(rotated(eigs), 3, tol=1e-8)
    nearby = torch.cat([eigs[:3] * 1.001, eigs[3:]])
    for verify in (True, False):
        warm = lg.eigenvalues(
            rotated(nearby), 3, tol=1e-8, v0=cold.vectors, verify=verify
        )
        again_cold = lg.eigenvalues(rotated(nearby), 3, tol=1e-8, verify=verify)
        assert warm.all_converged and again_cold.all_converged
        assert warm.cost.matvecs < again_cold.cost.matvecs
        assert_close_spectrum(warm.values, nearby[:3], 5.0)


def test_non_convergence_is_reported_not_hidden():
    eigs = torch.linspace(0, 1, 400, dtype=DTYPE)  # no gap: slow
    res = lg.eigenvalues(rotated(eigs), 5, tol=1e-12, max_matvecs=30)
    assert not res.all_converged
    assert res.cost.matvecs <= 30 + 5 + 2
    assert res.to_dict()["converged"] == res.converged.tolist()


def test_power_iteration_for_comparison():
    eigs = torch.cat(
        [
            torch.tensor([10.0, -6.0, 3.0], dtype=DTYPE),
            torch.linspace(-1, 1, 97, dtype=DTYPE),
        ]
    )
    res = lg.eigenvalues(rotated(eigs), 3, which="magnitude", method="power", tol=1e-8)
    assert res.method == "power"
    assert torch.allclose(
        res.values, torch.tensor([10.0, -6.0, 3.0], dtype=DTYPE), rtol=1e-4
    )
    assert bool((res.residuals > 0).all())
    with pytest.raises(ValueError, match="which='magnitude'"):
        lg.eigenvalues(rotated(eigs), 3, method="power")


class _Skewed(SymmetricOperator):
    def __init__(self, A):
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A = A

    def _matmat(self, V):
        return self.A @ V


class _NaNOperator(_Skewed):
    def _matmat(self, V):
        return torch.full_like(V, float("nan"))


def test_bad_input_gets_clear_errors():
    op = rotated(torch.linspace(0, 1, 20, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"1 <= k <= d = 20.*k=21"):
        lg.eigenvalues(op, 21)
    with pytest.raises(ValueError, match=r"2k <= d"):
        lg.eigenvalues(op, 11, which="both")
    with pytest.raises(ValueError, match="tol must be a positive number"):
        lg.eigenvalues(op, 2, tol=0)
    with pytest.raises(ValueError, match="which must be one of"):
        lg.eigenvalues(op, 2, which="top")
    A = torch.randn(20, 20, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="not symmetric"):
        lg.eigenvalues(_Skewed(A), 2)
    with pytest.raises(ValueError, match="non-finite"):
        lg.eigenvalues(_NaNOperator(A), 2)
    with pytest.raises(ValueError, match="non-finite"):
        lg.trace(_NaNOperator(A), 10)
    with pytest.raises(TypeError, match="lossgeom operator"):
        lg.eigenvalues(A, 2)
    with pytest.raises(ValueError, match="max_matvecs must be an integer >= 2"):
        lg.trace(op, 1)
    with pytest.raises(ValueError, match="method must be"):
        lg.trace(op, 10, method="xtrace2")


# ---------------------------------------------------------------- trace


def _mlp_hessian():
    model, loss_fn, X, y = CASES[0].make()
    return exact_hessian(lg.Objective(model, loss_fn, (X, y)))


def test_hutchinson_variance_matches_theory():
    H = _mlp_hessian()
    op, m = DenseOperator(H), 10
    values = torch.tensor(
        [lg.trace(op, m, method="hutchinson", seed=s).value for s in range(300)]
    )
    theory = 2 * (H.pow(2).sum() - H.diagonal().pow(2).sum()) / m
    assert abs(values.var().item() / theory.item() - 1) < 0.3  # 300 samples: ~8% noise
    assert abs(values.mean().item() - H.trace().item()) < 4 * math.sqrt(theory / 300)


@pytest.mark.parametrize(
    "method, budget", [("hutchinson", 30), ("hutch++", 30), ("auto", 60)]
)
def test_trace_error_bars_are_calibrated(method, budget):
    # "auto" chooses on sample variances it then reuses, which makes its error bars
    # a little optimistic at tiny budgets (coverage 0.89 at 30 products, 0.93 at 60)
    H = _mlp_hessian()
    op, truth = DenseOperator(H), H.trace().item()
    runs = [lg.trace(op, budget, method=method, seed=s) for s in range(200)]
    inside = [abs(r.value - truth) <= 2 * r.stderr for r in runs]
    coverage = sum(inside) / len(inside)
    assert 0.90 <= coverage <= 0.99, coverage


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_converges_as_the_budget_grows(method):
    H = _mlp_hessian()
    op, truth = DenseOperator(H), H.trace().item()
    errors = []
    for m in (12, 48, 192):
        runs = [lg.trace(op, m, method=method, seed=s) for s in range(30)]
        errors.append(sum(abs(r.value - truth) for r in runs) / len(runs))
        assert all(r.cost.matvecs <= m for r in runs)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] / errors[0] < (0.6 if method == "hutchinson" else 0.25)


def test_auto_picks_hutch_plus_plus_for_a_decaying_spectrum_and_hutchinson_for_a_flat_one():
    d = 300
    decaying = rotated(1.0 / torch.arange(1, d + 1, dtype=DTYPE) ** 2)
    flat = rotated(1 + 0.05 * torch.linspace(-1, 1, d, dtype=DTYPE))
    assert lg.trace(decaying, 60).method == "hutch++"
    assert lg.trace(flat, 60).method == "hutchinson"


def test_rel_tol_stops_early():
    d = 300
    op = rotated(1 + 0.05 * torch.linspace(-1, 1, d, dtype=DTYPE))
    res = lg.trace(op, 1000, method="hutchinson", rel_tol=1e-3)
    assert res.cost.matvecs < 1000
    assert res.stderr <= 1e-3 * abs(res.value)


def test_trace_of_an_objective_is_its_hessian_trace():
    model, loss_fn, X, y = CASES[1].make()
    obj = lg.Objective(model, loss_fn, (X, y), batch_size=5)
    truth = exact_hessian(obj).trace().item()
    res = lg.trace(obj, 90, seed=3)
    assert abs(res.value - truth) <= 4 * res.stderr
    assert res.to_dict()["cost"]["matvecs"] == res.cost.matvecs <= 90


def test_xtrace_is_most_exact_on_a_decaying_spectrum():
    d = 300
    op = rotated(1.0 / torch.arange(1, d + 1, dtype=DTYPE) ** 2)
    truth = (1.0 / torch.arange(1, d + 1, dtype=DTYPE) ** 2).sum().item()
    err = {}
    for method in ("hutchinson", "hutch++", "xtrace"):
        runs = [lg.trace(op, 60, method=method, seed=s) for s in range(40)]
        assert all(r.cost.matvecs <= 60 for r in runs)
        err[method] = sum(abs(r.value - truth) for r in runs) / len(runs)
    assert err["xtrace"] < err["hutch++"] < 0.1 * err["hutchinson"]
    # its error bar is optimistic but not wildly so (measured coverage 0.83-0.89)
    runs = [lg.trace(op, 60, method="xtrace", seed=s) for s in range(200)]
    coverage = sum(abs(r.value - truth) <= 2 * r.stderr for r in runs) / len(runs)
    assert 0.75 <= coverage <= 0.99


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_diagonal_estimates_are_calibrated_per_entry(method):
    d = 300
    op = rotated(1.0 / torch.arange(1, d + 1, dtype=DTYPE))
    D = op.matrix.diagonal()
    coverage = [
        ((r.values - D).abs() <= 2 * r.stderr).double().mean().item()
        for r in (lg.diagonal(op, 60, method=method, seed=s) for s in range(30))
    ]
    assert 0.88 <= sum(coverage) / len(coverage) <= 0.99


def test_diagonal_converges_and_xdiag_wins_on_decaying_spectra():
    d = 300
    op = rotated(1.0 / torch.arange(1, d + 1, dtype=DTYPE) ** 2)
    D = op.matrix.diagonal()

    def err(method, m):
        runs = [lg.diagonal(op, m, method=method, seed=s) for s in range(10)]
        return (
            sum((r.values - D).norm().item() for r in runs)
            / len(runs)
            / D.norm().item()
        )

    assert err("hutchinson", 200) < 0.6 * err("hutchinson", 40)
    assert err("xdiag", 60) < 0.05 * err("hutchinson", 60)
    model, loss_fn, X, y = CASES[0].make()
    obj = lg.Objective(model, loss_fn, (X, y))
    est = lg.diagonal(obj, 40)
    exact = exact_hessian(obj).diagonal()
    assert ((est.values - exact).abs() <= 5 * est.stderr + 1e-12).double().mean() > 0.95


def test_float32_hessian_passes_the_symmetry_test():
    # float32 products are symmetric only to rounding: the free symmetry test on the
    # first Krylov vectors must judge them with float32's epsilon, not float64's
    torch.manual_seed(0)
    X = torch.randn(256, 20)
    y = torch.randint(0, 5, (256,))
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5)
    )
    obj = lg.Objective(model, torch.nn.CrossEntropyLoss(), (X, y))
    for seed in range(5):
        res = lg.eigenvalues(obj, 3, tol=1e-4, seed=seed)
        assert res.all_converged


def test_residuals_from_the_lanczos_relation_match_explicit_ones(monkeypatch):
    from lossgeom.linalg import _krylov

    op = rotated(torch.linspace(-1, 3, 200, dtype=DTYPE) ** 3)
    for tol in (1e-3, 1e-8):
        a = lg.eigenvalues(op, 3, tol=tol, verify=False)
        b = lg.eigenvalues(op, 3, tol=tol, verify=False, explicit_residuals=False)
        # explicit residuals from the kept products A Q: no further products
        assert b.cost.matvecs == a.cost.matvecs
        assert torch.equal(a.values, b.values)
        assert torch.allclose(a.residuals, b.residuals, rtol=1e-6, atol=1e-12)
        assert b.details["residuals"] == "from the Lanczos relation"
        with monkeypatch.context() as m:  # a basis too large to keep A Q beside
            m.setattr(_krylov, "_KEEP_PRODUCTS_BYTES", 0)
            c = lg.eigenvalues(op, 3, tol=tol, verify=False)
        assert c.cost.matvecs == a.cost.matvecs + 3  # A u recomputed
        assert torch.equal(c.values, a.values)
        true = (op @ a.vectors - a.vectors * a.values).norm(dim=0)
        # A u formed two ways differs by rounding, a few eps of ||A|| (27 here):
        # against residuals near 1e-9 that is a relative 1e-6, whatever the
        # number of threads the sums run on
        slack = 64 * torch.finfo(DTYPE).eps * a.spectral_scale
        for res in (a, c):
            assert torch.allclose(res.residuals, true, rtol=1e-6, atol=slack)
