"""Spectral density (SLQ, KPM) and the summaries built on it, against exact spectra."""

import math

import pytest
import torch

import lossgeom as lg
from lossgeom.linalg import DenseOperator, slq
from lossgeom.zoo import digits, mlp

from cases import DTYPE, rotated


def wasserstein1(quad, exact):
    """W1 between the probe-averaged quadrature measure and the exact spectrum."""
    fin = torch.isfinite(quad.nodes)
    x = torch.cat([quad.nodes[fin], exact])
    w = torch.cat(
        [
            quad.weights[fin] / quad.nodes.shape[0],
            -torch.full_like(exact, 1 / exact.numel()),
        ]
    )
    order = torch.argsort(x)
    x, F = x[order], torch.cumsum(w[order], 0)
    return float((F[:-1].abs() * (x[1:] - x[:-1])).sum())


@pytest.fixture(scope="module")
def trained_mlp_hessian():
    """Dense Hessian of a 64-32-10 tanh MLP trained briefly, on the first 512 digits."""
    torch.manual_seed(0)
    X, y = digits("train")
    model = mlp(64, 10, width=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, X.shape[0], (128,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    obj = lg.Objective(
        model, torch.nn.CrossEntropyLoss(), (X[:512], y[:512]), dtype=torch.float64
    )
    H = lg.hessian(obj).to_dense(chunk_size=256)
    return (H + H.T) / 2


def test_slq_matches_the_exact_spectrum_in_wasserstein_distance(trained_mlp_hessian):
    H = trained_mlp_hessian
    ev = torch.linalg.eigvalsh(H)
    width = (ev.max() - ev.min()).item()
    op = DenseOperator(H)
    small = [wasserstein1(slq(op, 10, 80, seed=s), ev) / width for s in range(8)]
    large = [wasserstein1(slq(op, 40, 200, seed=s), ev) / width for s in range(2)]
    # the target is W1/width <= 1e-3 at 10 probes x 80 steps. It is an expected
    # error, met on average: single runs measure 0.83e-3 to 1.23e-3 (probe noise in
    # the bulk dominates; deflating the top 10 and bottom 5 eigenpairs exactly
    # lowers the mean only to 0.71e-3)
    assert sum(small) / len(small) <= 1e-3, small
    assert max(small) <= 1.5e-3, small
    assert sum(large) / len(large) < 0.8 * sum(small) / len(small)  # converges (slowly)


def test_density_integrates_to_one_and_both_estimators_agree(trained_mlp_hessian):
    op = DenseOperator(trained_mlp_hessian)
    slq_d = lg.density(op, 10, 80)
    kpm_d = lg.density(op, 10, 200, method="kpm", grid=slq_d.grid)
    for d in (slq_d, kpm_d):
        assert abs(torch.trapezoid(d.values, d.grid).item() - 1) < 1e-6
        assert bool((d.values >= 0).all())
    # compare the distributions in W1 (the two smooth differently near the steep
    # bulk at zero, so pointwise values differ)
    cdf = lambda d: torch.cumulative_trapezoid(d.values, d.grid)  # noqa: E731
    gap = torch.trapezoid((cdf(slq_d) - cdf(kpm_d)).abs(), slq_d.grid[1:])
    assert gap / (slq_d.grid[-1] - slq_d.grid[0]) < 5e-3
    q = slq_d.quadrature
    assert torch.allclose(q.weights.sum(1), torch.ones(10, dtype=torch.float64))
    assert slq_d.cost.matvecs == 800


def test_papyan_synthetic_spectrum_has_a_bulk_and_exactly_three_outliers():
    # Papyan (2020): diag(5, 4, 3, 0, ...) + Z Z^T / n, Z Gaussian n x n, n = 2000.
    n = 2000
    gen = torch.Generator().manual_seed(0)
    Z = torch.randn(n, n, generator=gen, dtype=DTYPE)
    A = Z @ Z.T / n
    A[0, 0] += 5
    A[1, 1] += 4
    A[2, 2] += 3
    op = DenseOperator((A + A.T) / 2)
    out = lg.outliers(op)
    assert out.n_outliers == 3
    # spiked Marchenko-Pastur (ratio 1): a spike s > 1 appears at s + 1 + 1/(s - 1)
    # (Benaych-Georges & Nadakuditi 2011); the bulk edge is at 4
    predicted = torch.tensor([5 + 1 + 1 / 4, 4 + 1 + 1 / 3, 3 + 1 + 1 / 2], dtype=DTYPE)
    assert torch.allclose(out.values, predicted, rtol=0.05)
    assert 3.8 < out.bulk_edge < 4.2
    dens = lg.density(op, 10, 80)
    bulk = (dens.grid > -0.2) & (dens.grid < 4.2)
    assert torch.trapezoid(dens.values[bulk], dens.grid[bulk]) > 0.99


def test_logdet_negative_mass_and_effective_rank_against_exact():
    d = 400
    eigs = torch.cat(
        [
            torch.linspace(0.1, 2.0, d - 40, dtype=DTYPE),
            torch.linspace(-0.5, -0.01, 40, dtype=DTYPE),
        ]
    )
    op = rotated(eigs, seed=2)
    shift = 1.0
    ld = lg.logdet(op, shift, n_probes=20, lanczos_steps=60)
    assert abs(ld.value - torch.log(eigs + shift).sum().item()) <= 4 * ld.stderr
    neg = lg.negative_mass(op, n_probes=20, lanczos_steps=60)
    assert abs(neg.value - 40 / d) <= 4 * neg.stderr + 1e-3
    assert neg.details["resolution"] > 0
    below = lg.negative_mass(op, 0.2, n_probes=20, lanczos_steps=60)
    exact_below = (eigs < -0.2).double().mean().item()
    assert abs(below.value - exact_below) <= 4 * below.stderr + 1e-2
    exact_w = eigs[eigs < 0].abs().sum() / eigs.abs().sum()
    assert (
        abs(neg.details["negative_weight"] - exact_w.item())
        <= 4 * neg.details["negative_weight_stderr"] + 1e-3
    )
    er = lg.effective_rank(op, n_probes=20, lanczos_steps=60)
    p = eigs.abs() / eigs.abs().sum()
    exact_er = math.exp(-(p * p.log()).sum().item())
    assert abs(er.value - exact_er) <= 4 * er.stderr + 1e-3 * exact_er
    with pytest.raises(ValueError, match="positive definite.*Use shift >"):
        lg.logdet(op, 0.0)


def test_effective_rank_of_extremes():
    d = 200
    assert lg.effective_rank(
        DenseOperator(torch.eye(d, dtype=DTYPE))
    ).value == pytest.approx(d, rel=1e-6)
    u = torch.randn(d, 1, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    rank_one = DenseOperator(u @ u.T)
    er = lg.effective_rank(rank_one, n_probes=30)
    assert abs(er.value - 1.0) <= 4 * er.stderr


def test_condition_number():
    eigs = torch.linspace(0.5, 50.0, 300, dtype=DTYPE)
    kappa = lg.condition_number(rotated(eigs), tol=1e-10)
    assert kappa.value == pytest.approx(100.0, rel=1e-8)
    indefinite = lg.condition_number(rotated(eigs - 1.0))
    assert math.isinf(indefinite.value) and indefinite.details["lambda_min"] < 0
    assert lg.condition_number(
        rotated(eigs - 1.0), shift=1.0, tol=1e-10
    ).value == pytest.approx(100.0, rel=1e-6)


def test_condition_number_of_the_positive_part():
    # Indefinite, with a cluster near 0 below the threshold: lambda_+ = 0.5.
    eigs = torch.cat(
        [
            torch.linspace(-2.0, -0.1, 40, dtype=DTYPE),
            torch.full((30,), 1e-5, dtype=DTYPE),
            torch.linspace(0.5, 50.0, 100, dtype=DTYPE),
        ]
    )
    kappa = lg.condition_number(rotated(eigs), positive_part=True, tol=1e-10)
    assert kappa.converged
    assert kappa.details["lambda_plus"] == pytest.approx(0.5, rel=1e-8)
    assert kappa.value == pytest.approx(100.0, rel=1e-8)
    assert kappa.bound < 1e-6
    # The threshold decides what "positive" means, and is recorded.
    loose = lg.condition_number(
        rotated(eigs), positive_part=True, threshold=0.095, tol=1e-10
    )
    assert loose.converged
    assert loose.details["lambda_plus"] == pytest.approx(5.0, rel=1e-8)
    assert loose.parameters["threshold"] == 0.095
    # Positive definite: the positive part is the whole spectrum.
    pd = torch.linspace(0.5, 50.0, 200, dtype=DTYPE)
    assert lg.condition_number(
        rotated(pd), positive_part=True, tol=1e-10
    ).value == pytest.approx(100.0, rel=1e-8)
    with pytest.raises(ValueError, match="threshold"):
        lg.condition_number(rotated(pd), positive_part=True, threshold=0.0)


def test_density_of_an_objective_and_bad_input():
    from cases import CASES

    model, loss_fn, X, y = CASES[0].make()
    obj = lg.Objective(model, loss_fn, (X, y))
    d = lg.density(obj, 3, 20)
    assert (
        d.cost.matvecs == 60
        and abs(torch.trapezoid(d.values, d.grid).item() - 1) < 1e-6
    )
    with pytest.raises(ValueError, match="method must be"):
        lg.density(obj, method="magic")
    with pytest.raises(ValueError, match="n_probes must be a positive integer"):
        lg.density(obj, 0)
    with pytest.raises(ValueError, match="sigma must be positive"):
        lg.density(obj, 2, 5, sigma=-1.0)
