"""Eigenvalue error bounds (Kato-Temple from the Ritz gaps) and the 'value' criterion."""

import math

import pytest
import torch
from torch import nn

import lossgeom as lg
from lossgeom.linalg import DenseOperator
from lossgeom.linalg._eigen import gap_bounds
from lossgeom.testing import exact_hessian

from cases import DTYPE, rotated


def test_the_bound_is_exact_on_a_two_by_two_rotation():
    # u = cos(phi) e1 + sin(phi) e2 on diag(l1, l2): theta - l1 = (l2 - l1) sin^2,
    # r = |l1 - l2| |sin cos|, gap to l2 = |l1 - l2| cos^2: r^2 / gap is the error.
    l1, l2 = 3.0, 1.0
    for phi in (1e-4, 1e-2, 0.1, 0.3):
        c, s = math.cos(phi), math.sin(phi)
        theta = l1 * c * c + l2 * s * s
        r = abs(l1 - l2) * s * c
        bound = gap_bounds(
            torch.tensor([theta], dtype=DTYPE),
            torch.tensor([r], dtype=DTYPE),
            torch.tensor([l2], dtype=DTYPE),
            torch.zeros(1, dtype=DTYPE),
        )
        assert float(bound) == pytest.approx(abs(theta - l1), rel=1e-9)
        assert float(bound) < r  # the quadratic bound is the better one here


def test_without_a_gap_the_bound_is_the_residual():
    values = torch.tensor([2.0, 1.9], dtype=DTYPE)
    residuals = torch.tensor([0.2, 0.2], dtype=DTYPE)  # overlapping intervals
    none = torch.zeros(0, dtype=DTYPE)
    assert torch.equal(gap_bounds(values, residuals, none, none), residuals)
    alone = gap_bounds(values[:1], residuals[:1], none, none)
    assert torch.equal(alone, residuals[:1])  # nothing known: no gap
    floored = gap_bounds(values[:1], torch.zeros(1, dtype=DTYPE), none, none, 1e-9)
    assert float(floored) == 1e-9


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_value_criterion_bounds_hold_on_dense_spectra(which):
    # many seeds and gap structures: every reported bound covers the true error
    checked = 0
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        top = 10.0 - torch.cumsum(torch.rand(6, generator=gen, dtype=DTYPE), 0)
        bulk = 3 * torch.rand(194, generator=gen, dtype=DTYPE) - 2
        eigs = torch.cat([top, bulk])
        if which == "smallest":
            eigs = -eigs
        op = rotated(eigs, seed=seed)
        ordered = eigs[torch.argsort(-eigs.abs() if which == "magnitude" else eigs)]
        truth = ordered[:4] if which != "largest" else eigs.sort(descending=True)[0][:4]
        if which == "smallest":
            truth = eigs.sort()[0][:4]
        for tol in (1e-4, 1e-7):
            res = lg.eigenvalues(op, 4, which=which, tol=tol, criterion="value")
            assert res.criterion == "value" and res.all_converged
            err = (res.values - truth).abs()
            assert bool((err <= res.error_bounds + 1e-13).all()), (
                err,
                res.error_bounds,
            )
            assert bool((res.error_bounds <= tol * res.spectral_scale).all())
            checked += 1
    assert checked == 24


def test_value_criterion_needs_fewer_products_at_equal_accuracy():
    gen = torch.Generator().manual_seed(0)
    eigs = torch.cat(
        [
            torch.tensor([5.0, 4.6, 4.3, 4.1], dtype=DTYPE),
            4 * torch.rand(496, generator=gen, dtype=DTYPE) - 1,
        ]
    )
    op = rotated(eigs)
    truth = eigs.sort(descending=True)[0][:3]
    by_value = lg.eigenvalues(op, 3, tol=1e-8, criterion="value")
    by_residual = lg.eigenvalues(op, 3, tol=1e-8)
    for res in (by_value, by_residual):
        assert res.all_converged
        assert float((res.values - truth).abs().max()) <= 1e-8 * 5.0
    assert by_value.cost.matvecs < by_residual.cost.matvecs
    # the residual criterion's bounds are at least as tight (its residuals are)
    assert bool((by_residual.error_bounds <= by_value.error_bounds + 1e-15).all())


def test_hessian_bounds_in_float64_and_float32():
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(200, 10, generator=gen)
    y = torch.randint(0, 4, (200,), generator=gen)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))
    loss = nn.CrossEntropyLoss()
    obj64 = lg.Objective(model, loss, (X, y), dtype=torch.float64)
    truth = torch.linalg.eigvalsh(exact_hessian(obj64)).flip(0)[:5]
    for obj in (obj64, lg.Objective(model, loss, (X, y))):
        res = lg.eigenvalues(obj, 5, tol=1e-6, criterion="value")
        assert res.all_converged, res.details["stopped"]
        err = (res.values.double() - truth).abs()
        # the float64 reference's own rounding: a few units of 1e-16
        slack = 64 * torch.finfo(torch.float64).eps * float(truth.abs().max())
        assert bool((err <= res.error_bounds.double() + slack).all())
        assert res.details["stopped"] == "tolerance met"
    # float32 cannot push the residual to 1e-9: the result says why it stopped
    tight = lg.eigenvalues(lg.Objective(model, loss, (X, y)), 3, tol=1e-9)
    assert not tight.all_converged
    assert tight.details["stopped"].startswith("rounding floor")
    assert "criterion='value'" in tight.details["stopped"]  # the remedy named
    assert tight.cost.matvecs < 600  # stopped at the floor, not at the budget
    # below the bounds' own floor (2 eps of the scale) the value criterion
    # stops at the rounding floor too, and does not suggest itself
    floor = lg.eigenvalues(
        lg.Objective(model, loss, (X, y)), 3, tol=1e-8, criterion="value"
    )
    assert not floor.all_converged
    assert floor.details["stopped"].startswith("rounding floor")
    assert "criterion=" not in floor.details["stopped"]
    assert "float64" in floor.details["stopped"]


def test_lobpcg_and_saved_results_carry_the_bounds(tmp_path):
    eigs = torch.cat(
        [
            torch.tensor([6.0, 5.0, 4.5], dtype=DTYPE),
            torch.linspace(-1, 3, 197, dtype=DTYPE),
        ]
    )
    op = rotated(eigs, seed=2)
    res = lg.eigenvalues(op, 3, tol=1e-9, method="lobpcg")
    err = (res.values - eigs[:3]).abs()
    assert res.error_bounds is not None
    assert bool((err <= res.error_bounds + 1e-13).all())
    lan = lg.eigenvalues(
        DenseOperator(torch.diag(eigs)), 3, tol=1e-6, criterion="value"
    )
    back = lg.load_result(lan.save(tmp_path / "eig"))
    assert torch.equal(back.error_bounds, lan.error_bounds)
    assert back.criterion == "value"


def test_an_unknown_criterion_is_refused():
    op = rotated(torch.linspace(0, 1, 50, dtype=DTYPE))
    with pytest.raises(ValueError, match="criterion must be one of"):
        lg.eigenvalues(op, 2, criterion="eigenvalue")
