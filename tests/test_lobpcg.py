"""LOBPCG against exact spectra: ends, clusters, repeats, budgets, product counts."""

import pytest
import torch

import lossgeom as lg
from lossgeom.linalg import DenseOperator, SymmetricOperator, lobpcg
from lossgeom.testing import exact_hessian

from cases import CASES, DTYPE, rotated


def assert_close_spectrum(values, truth, scale):
    err = (values - truth).abs()
    assert bool((err <= 1e-8 * truth.abs() + 1e-12 * scale).all()), (values, truth)


class _Counting(SymmetricOperator):
    """An operator that counts the columns it is applied to, and the calls."""

    def __init__(self, A):
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A, self.columns, self.calls = A, 0, 0

    def _matmat(self, V):
        self.columns += V.shape[1]
        self.calls += 1
        return self.A @ V


def _spectrum(name, d=200):
    """Both ends separated from a bulk; the special structure at each end."""
    top, bottom, bulk = {
        "clustered": (
            [10.0, 10.0 - 1e-6, 10.0 - 2e-6, 9.0, 9.0 - 1e-7],
            [-10.0, -10.0 + 1e-6, -9.0, -9.0 + 1e-7, -8.0],
            (-1.0, 1.0),
        ),
        "degenerate": ([10.0, 9.0, 9.0, 9.0, 8.0], [-5.0] * 3 + [-4.0, -3.0], (-1, 1)),
        "negative": (
            [-2.0, -3.0, -4.0, -4.0, -5.0],
            [-30.0, -29, -28, -27, -26],
            (-12, -7),
        ),
        "indefinite": (
            [7.0, 6.0, 5.0, 4.5, 4.0],
            [-9.0, -8.0, -8.0, -6.0, -5.0],
            (-1, 1),
        ),
    }[name]
    rest = torch.linspace(*bulk, d - 10, dtype=DTYPE)
    return torch.cat([torch.tensor(top + bottom, dtype=DTYPE), rest])


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("name", ["clustered", "degenerate", "negative", "indefinite"])
def test_dense_spectra(name, which):
    eigs = _spectrum(name)
    op = rotated(eigs, seed=3)
    sorted_eigs = eigs.sort(descending=which == "largest").values
    res = lobpcg(op, 4, which=which, tol=1e-10)
    assert res.method == "lobpcg" and res.all_converged
    assert_close_spectrum(res.values, sorted_eigs[:4], eigs.abs().max())
    true_res = (op.matrix @ res.vectors - res.vectors * res.values).norm(dim=0)
    assert torch.allclose(res.residuals, true_res, rtol=1e-6, atol=1e-14)
    assert torch.allclose(
        res.vectors.T @ res.vectors, torch.eye(4, dtype=DTYPE), atol=1e-8
    )


@pytest.mark.parametrize("case", CASES[:3], ids=[c.name for c in CASES[:3]])
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_hessian_of_small_models(case, which):
    model, loss_fn, X, y = case.make()
    obj = lg.Objective(model, loss_fn, (X, y), batch_size=case.batch_size)
    ev = torch.linalg.eigvalsh(exact_hessian(obj))
    truth = ev.flip(0)[:5] if which == "largest" else ev[:5]
    res = lg.eigenvalues(obj, 5, which=which, tol=1e-10, method="lobpcg")
    assert res.method == "lobpcg" and res.all_converged
    assert_close_spectrum(res.values, truth, ev.abs().max())
    assert res.details["verify_rounds"] >= 1


def test_products_are_counted_exactly_and_applied_in_blocks():
    op = _Counting(rotated(_spectrum("degenerate")).matrix)
    for verify in (False, True):
        op.columns = op.calls = 0
        res = lobpcg(op, 3, tol=1e-10, verify=verify)
        assert res.cost.matvecs == op.columns
        assert op.calls < op.columns  # whole blocks per call


def test_converged_flags_are_honest_when_the_budget_is_too_small():
    eigs = torch.linspace(0, 1, 400, dtype=DTYPE)  # no gap: slow
    op = rotated(eigs)
    for budget in (7, 30, 100):
        res = lobpcg(op, 5, tol=1e-12, max_matvecs=budget)
        assert not res.all_converged
        assert res.cost.matvecs <= budget + 5
        true_res = (op.matrix @ res.vectors - res.vectors * res.values).norm(dim=0)
        assert torch.allclose(res.residuals, true_res, rtol=1e-6, atol=1e-14)
        assert torch.equal(res.converged, true_res <= 1e-12 * res.spectral_scale)


def test_small_space_and_ill_conditioned_spectrum():
    # 3 m > d: the [X, R, P] basis must shrink instead of failing
    eigs = torch.arange(1.0, 9.0, dtype=DTYPE)
    res = lobpcg(rotated(eigs), 4, tol=1e-10)
    assert_close_spectrum(res.values, eigs.flip(0)[:4], 8.0)
    # eigenvalues over 16 decades and an exact null space
    eigs = torch.cat(
        [
            torch.tensor([1e8, 1e4, 1.0], dtype=DTYPE),
            torch.logspace(-8, -1, 97, dtype=DTYPE),
            torch.zeros(20, dtype=DTYPE),
        ]
    )
    res = lobpcg(rotated(eigs, seed=2), 3, tol=1e-12)
    assert res.all_converged
    assert_close_spectrum(res.values, eigs[:3], 1e8)
    # a 20-dimensional null space under a 1e8 top: guard vectors (block_size 5)
    # converge in 32 iterations
    diag = DenseOperator(torch.diag(eigs))
    diag = lobpcg(diag, 3, which="smallest", tol=1e-12, verify=False, block_size=5)
    assert diag.all_converged and bool((diag.values.abs() <= 1e-3).all())


@pytest.mark.parametrize("method", ["lanczos", "lobpcg"])
def test_the_verification_search_keeps_its_certificates_on_a_null_space(method):
    """The search adds copies of the null space; what it reports stays true.

    Every pair flagged converged has a true eigenvalue within its residual, and
    no value leaves the spectrum (the search once grew its own scale by the
    deflation's shift each round and returned values near -1e14 flagged
    converged).
    """
    eigs = torch.cat(
        [
            torch.tensor([1e8, 1e4, 1.0], dtype=DTYPE),
            torch.logspace(-8, -1, 97, dtype=DTYPE),
            torch.zeros(20, dtype=DTYPE),
        ]
    )
    op = DenseOperator(torch.diag(eigs))
    res = lg.eigenvalues(op, 3, which="smallest", tol=1e-12, method=method)
    assert res.spectral_scale <= 1.01e8
    assert bool((res.values >= -1e-6).all()) and bool((res.values <= 1e-3).all())
    for value, r, ok in zip(res.values, res.residuals, res.converged, strict=True):
        gap = float((eigs - value).abs().min())
        assert gap <= float(r) * (1 + 1e-9) + 1e-12, (method, value, r)
        if ok:
            assert float(r) <= 1e-12 * res.spectral_scale * (1 + 1e-9)
    # the vectors stay orthonormal
    gram = res.vectors.T @ res.vectors
    assert torch.allclose(gram, torch.eye(3, dtype=DTYPE), atol=1e-8)


def test_warm_start_needs_fewer_products():
    eigs = torch.cat(
        [torch.tensor([5.0, 4.0, 3.5], dtype=DTYPE), torch.linspace(0, 3, 297)]
    ).to(DTYPE)
    cold = lobpcg(rotated(eigs), 3, tol=1e-8, verify=False)
    warm = lobpcg(rotated(eigs), 3, tol=1e-8, v0=cold.vectors, verify=False)
    assert warm.all_converged and warm.cost.matvecs < cold.cost.matvecs


def test_bad_input_gets_clear_errors():
    op = rotated(torch.linspace(0, 1, 20, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"1 <= k <= d = 20.*k=0"):
        lobpcg(op, 0)
    with pytest.raises(ValueError, match=r"k=21"):
        lg.eigenvalues(op, 21, method="lobpcg")
    with pytest.raises(ValueError, match="tol must be a positive number"):
        lobpcg(op, 2, tol=-1e-6)
    with pytest.raises(ValueError, match="which must be 'largest' or 'smallest'"):
        lg.eigenvalues(op, 2, which="both", method="lobpcg")
    with pytest.raises(ValueError, match=r"block_size .* k = 3"):
        lobpcg(op, 3, block_size=2)
    with pytest.raises(ValueError, match="max_matvecs must be"):
        lobpcg(op, 3, max_matvecs=2)
    with pytest.raises(ValueError, match="'lobpcg'"):
        lg.eigenvalues(op, 2, method="arnoldi")
    A = torch.randn(20, 20, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    for k in (1, 2):
        with pytest.raises(ValueError, match="not symmetric"):
            lobpcg(_Counting(A), k)
