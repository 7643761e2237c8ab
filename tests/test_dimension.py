"""Dimensionality: projections, effective dimension, subspace training (fast)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import lossgeom as lg
from lossgeom.linalg import (
    DenseProjection,
    FastfoodProjection,
    SparseProjection,
    fwht,
    random_projection,
)
from lossgeom.measures import (
    TrajectoryRecorder,
    effective_dimension,
    intrinsic_dimension,
    subspace_train,
)
from lossgeom.objective import minimize

F64 = torch.float64
KINDS = ["dense", "sparse", "fastfood"]
SIZES = [(1, 1), (5, 5), (37, 6), (64, 16), (100, 3), (300, 33)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train faster on one thread (and a busy shared machine much faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ Walsh-Hadamard
@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 256])
def test_fwht_matches_scipy_hadamard(n):
    x = torch.randn(3, n, generator=_gen(n), dtype=F64)
    H = torch.from_numpy(scipy.linalg.hadamard(n)).to(F64)
    torch.testing.assert_close(fwht(x), x @ H.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fwht(x[0]), H @ x[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fwht(fwht(x)), n * x)  # H H = n I


@pytest.mark.parametrize("n", [0, 3, 6, 12])
def test_fwht_refuses_other_lengths(n):
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(2, n))


# -------------------------------------------------------------------- projections
def _fastfood_reference(P: FastfoodProjection) -> torch.Tensor:
    """The Fastfood matrix built explicitly from its factors with scipy's Hadamard."""
    n = P.block_size
    H = torch.from_numpy(scipy.linalg.hadamard(n)).to(F64)
    blocks = []
    for b in range(P.num_blocks):
        Pi = torch.eye(n, dtype=F64)[P.perm[b]]  # (Pi x)_i = x[perm_i]
        blocks.append(
            torch.diag(P.scale[b])
            @ H
            @ torch.diag(P.gauss[b])
            @ Pi
            @ H
            @ torch.diag(P.signs[b])
        )
    return torch.cat(blocks)[: P.num_params, : P.dim]


@pytest.mark.parametrize("D,d", SIZES, ids=[f"D{D}-d{d}" for D, d in SIZES])
def test_fastfood_is_its_explicit_matrix(D, d):
    P = FastfoodProjection(D, d, seed=3, dtype=F64)
    M = _fastfood_reference(P)
    assert P.block_size >= d and P.block_size & (P.block_size - 1) == 0
    assert P.num_blocks * P.block_size >= D
    torch.testing.assert_close(P.to_dense(), M, rtol=1e-10, atol=1e-12)
    Z = torch.randn(d, 4, generator=_gen(1), dtype=F64)
    V = torch.randn(D, 4, generator=_gen(2), dtype=F64)
    torch.testing.assert_close(P(Z), M @ Z, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(P.transpose(V), M.T @ V, rtol=1e-10, atol=1e-12)


def test_dense_columns_have_unit_norm():
    P = DenseProjection(500, 40, seed=1, dtype=F64)
    norms = P.to_dense().norm(dim=0)
    torch.testing.assert_close(norms, torch.ones(40, dtype=F64))


def test_sparse_projection_structure():
    D, d = 10_000, 30
    P = SparseProjection(D, d, seed=0, dtype=F64)
    dense = P.to_dense()
    torch.testing.assert_close(dense.norm(dim=0), torch.ones(d, dtype=F64))
    torch.testing.assert_close(P.to_sparse_coo().to_dense(), dense)
    density = (dense != 0).double().mean().item()
    assert abs(density - 1 / math.sqrt(D)) < 0.2 / math.sqrt(D)
    # a column's nonzeros share one magnitude and have random signs
    col = dense[:, 0][dense[:, 0] != 0]
    torch.testing.assert_close(col.abs(), col.abs()[0].expand_as(col))
    assert (col > 0).any() and (col < 0).any()
    # tiny maps still reach every coordinate of z
    tiny = SparseProjection(3, 3, seed=5, dtype=F64).to_dense()
    assert (tiny.norm(dim=0) > 0.99).all()


@pytest.mark.parametrize("kind", KINDS)
def test_projection_is_linear_and_batched(kind):
    D, d = 150, 12
    P = random_projection(kind, D, d, seed=2, dtype=F64)
    x, y = torch.randn(2, d, generator=_gen(3), dtype=F64)
    torch.testing.assert_close(P(2 * x - 3 * y), 2 * P(x) - 3 * P(y))
    Z = torch.randn(d, 5, generator=_gen(4), dtype=F64)
    block = P(Z)
    assert block.shape == (D, 5) and P(x).shape == (D,)
    torch.testing.assert_close(block, torch.stack([P(z) for z in Z.T], 1))
    torch.testing.assert_close(P @ Z, block)


@pytest.mark.parametrize("kind", KINDS)
def test_transpose_product_is_consistent(kind):
    D, d = 333, 20
    P = random_projection(kind, D, d, seed=7, dtype=F64)
    Z = torch.randn(d, 3, generator=_gen(5), dtype=F64)
    V = torch.randn(D, 4, generator=_gen(6), dtype=F64)
    torch.testing.assert_close(P(Z).T @ V, Z.T @ P.transpose(V))  # <Pz, v> = <z, P^T v>
    torch.testing.assert_close(P.transpose(V), P.to_dense().T @ V)


@pytest.mark.parametrize("kind", KINDS)
def test_projection_gradients(kind):
    P = random_projection(kind, 40, 6, seed=1, dtype=F64)
    z = torch.randn(6, generator=_gen(0), dtype=F64, requires_grad=True)
    v = torch.randn(40, generator=_gen(1), dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(P, (z,))
    assert torch.autograd.gradcheck(P.transpose, (v,))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("D,d", [(256, 8), (300, 10)], ids=["n-divides-D", "cut"])
def test_expected_squared_norm_is_preserved(kind, D, d):
    """E ||P z||^2 = ||z||^2 over seeds (unit columns, exactly or in expectation)."""
    z = torch.randn(d, generator=_gen(9), dtype=F64)
    ratios = torch.tensor(
        [
            random_projection(kind, D, d, seed=s, dtype=F64)(z).square().sum()
            / z.square().sum()
            for s in range(300)
        ]
    )
    se = ratios.std() / math.sqrt(len(ratios))
    assert abs(ratios.mean() - 1) < 4 * se + 1e-3, (ratios.mean(), se)
    # and the columns: E ||P e_j||^2 = 1
    col = torch.stack(
        [
            random_projection(kind, D, d, seed=s, dtype=F64).to_dense().square().sum(0)
            for s in range(100)
        ]
    )
    assert abs(col.mean() - 1) < 4 * col.std() / math.sqrt(col.numel()) + 1e-3


def test_fastfood_memory_is_linear_in_D():
    D, d = 200_000, 1000
    P = FastfoodProjection(D, d, seed=0)
    held = sum(t.numel() for t in P.buffers().values())
    assert held < 10 * D, held
    assert max(t.numel() for t in P.buffers().values()) < 2 * D  # no D x d anything
    assert P.nbytes < 10 * D * 8
    z = torch.randn(d, generator=_gen(0))
    out = P(z)
    assert out.shape == (D,) and torch.isfinite(out).all()
    v = torch.randn(D, generator=_gen(1))
    rel = (out @ v - z @ P.transpose(v)).abs() / (out.norm() * v.norm())
    assert rel < 1e-5
    with pytest.raises(ValueError, match="max_entries"):
        P.to_dense()


def test_dense_projection_refused_for_large_models():
    with pytest.raises(ValueError, match="fastfood") as err:
        DenseProjection(100_001, 10)
    assert "allow_large" in str(err.value)
    with pytest.raises(ValueError, match="fastfood"):
        DenseProjection(50_000, 5_000)  # 2.5e8 entries
    P = DenseProjection(100_001, 1, allow_large=True)
    assert P.matrix.shape == (100_001, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_projections_are_seeded(kind):
    a = random_projection(kind, 500, 30, seed=4)
    b = random_projection(kind, 500, 30, seed=4)
    c = random_projection(kind, 500, 30, seed=5)
    z = torch.randn(30, generator=_gen(0))
    assert torch.equal(a(z), b(z))
    assert not torch.allclose(a(z), c(z))
    # same map in float32 and float64 (drawn once, then cast)
    d64 = random_projection(kind, 500, 30, seed=4, dtype=F64)
    torch.testing.assert_close(a(z).double(), d64(z.double()), rtol=1e-4, atol=1e-5)
    assert d64(z.double()).dtype == F64


@pytest.mark.parametrize("kind", KINDS)
def test_projection_bad_input(kind):
    with pytest.raises(ValueError, match="exceeds the parameter count D=10"):
        random_projection(kind, 10, 11)
    with pytest.raises(ValueError, match="at least 1"):
        random_projection(kind, 10, 0)
    P = random_projection(kind, 10, 3)
    with pytest.raises(ValueError, match="dtype"):
        P(torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        P(torch.zeros(4))


@pytest.mark.parametrize("kind", KINDS)
def test_projection_on_device(kind, device):
    """The map lives where it is asked to, and is the same map on every device."""
    cpu = random_projection(kind, 200, 9, seed=3, dtype=F64)
    P = random_projection(kind, 200, 9, seed=3, dtype=F64, device=device)
    assert all(t.device.type == device for t in P.buffers().values())
    z = torch.randn(9, generator=_gen(0), dtype=F64)
    v = torch.randn(200, generator=_gen(1), dtype=F64)
    out, back = P(z.to(device)), P.transpose(v.to(device))
    assert out.device.type == device and back.device.type == device
    torch.testing.assert_close(out.cpu(), cpu(z))
    torch.testing.assert_close(back.cpu(), cpu.transpose(v))


def test_unknown_projection():
    with pytest.raises(ValueError, match="unknown projection 'gaussian'"):
        random_projection("gaussian", 10, 3)


# ---------------------------------------------------------- effective dimension
def _low_rank(T=60, D=200, rank=3, noise=1e-4, seed=0):
    g = _gen(seed)
    basis = torch.linalg.qr(torch.randn(D, rank, generator=g, dtype=F64))[0].T
    scales = torch.tensor([3.0, 2.0, 1.0, 0.7, 0.5][:rank], dtype=F64)
    coeff = torch.randn(T, rank, generator=g, dtype=F64) * scales
    return coeff @ basis + noise * torch.randn(T, D, generator=g, dtype=F64)


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_effective_dimension_finds_the_rank(rank):
    V = _low_rank(rank=rank)
    res = effective_dimension(V, threshold=0.999)
    assert res.dimension == rank
    assert effective_dimension(V, threshold=1.0 - 1e-12).dimension > rank  # noise
    assert res.cumulative[-1].item() == pytest.approx(1.0)
    assert (res.explained_variance_ratio[:-1] >= res.explained_variance_ratio[1:]).all()
    assert res.n_vectors == 60 and res.num_params == 200
    json.dumps(res.to_dict())


def test_effective_dimension_matches_covariance_eigenvalues():
    V = torch.randn(30, 12, generator=_gen(1), dtype=F64) * torch.linspace(3, 0.1, 12)
    res = effective_dimension(V, threshold=0.9)
    cov = np.cov(V.numpy(), rowvar=False)
    ev = np.sort(np.linalg.eigvalsh(cov))[::-1]
    ratio = ev / ev.sum()
    np.testing.assert_allclose(res.explained_variance_ratio.numpy(), ratio, atol=1e-12)
    assert res.dimension == int(np.searchsorted(np.cumsum(ratio), 0.9) + 1)


def test_effective_dimension_inputs():
    V = _low_rank(T=20, D=30, rank=2)
    checkpoints = torch.cat([torch.zeros(1, 30, dtype=F64), V.cumsum(0)])
    a = effective_dimension(checkpoints, 0.99, differences=True)
    b = effective_dimension(V, 0.99)
    assert a.dimension == b.dimension == 2 and a.source == "checkpoint differences"
    torch.testing.assert_close(a.explained_variance_ratio, b.explained_variance_ratio)
    states = [
        {"w": v[:20].view(4, 5), "b": v[20:], "steps": torch.tensor(1)} for v in V
    ]
    torch.testing.assert_close(
        effective_dimension(states, 0.99).explained_variance_ratio,
        b.explained_variance_ratio,
    )
    c = effective_dimension(list(V), 0.99, keys=None)
    assert c.dimension == 2
    only_w = effective_dimension(states, 0.99, keys=["w"])
    assert only_w.num_params == 20
    # a constant drift: one direction uncentred, none centred
    drift = torch.ones(10, 30, dtype=F64)
    assert effective_dimension(drift, center=False).dimension == 1
    assert effective_dimension(drift).dimension == 0


def test_effective_dimension_bad_input():
    V = torch.randn(5, 4)
    for bad in (0, -0.1, 1.5, True, "0.9"):
        with pytest.raises(
            ValueError, match=r"threshold must be a fraction in \(0, 1\]"
        ):
            effective_dimension(V, threshold=bad)
    with pytest.raises(ValueError, match="at least 2 vectors"):
        effective_dimension(V[:1])
    with pytest.raises(ValueError, match="different lengths"):
        effective_dimension([torch.zeros(3), torch.zeros(4)])
    with pytest.raises(ValueError, match="lacks entries"):
        effective_dimension([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}])
    with pytest.raises(ValueError, match="expected vectors"):
        effective_dimension(42)


def test_trajectory_recorder():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    updates, grads = TrajectoryRecorder(net), TrajectoryRecorder(net, what="gradients")
    every2 = TrajectoryRecorder(net, every=2, max_vectors=2)
    thetas, gs = [torch.cat([p.detach().flatten() for p in net.parameters()])], []
    x = torch.randn(16, 3, generator=_gen(0), dtype=F64)
    for _ in range(6):
        opt.zero_grad()
        net(x).square().mean().backward()
        gs.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        opt.step()
        thetas.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
        grads()
        updates(step=1)
        every2()
    T = torch.stack(thetas)
    torch.testing.assert_close(updates.vectors(), T[1:] - T[:-1])
    torch.testing.assert_close(grads.vectors(), torch.stack(gs))
    torch.testing.assert_close(updates.vectors(), -0.1 * grads.vectors())
    torch.testing.assert_close(every2.vectors(), T[[4, 6]] - T[[2, 4]])
    assert updates.result().dimension >= 1
    with pytest.raises(ValueError, match="nothing recorded"):
        TrajectoryRecorder(net).vectors()


# --------------------------------------------------------------- subspace training
def test_adam_matches_torch_optim():
    A = torch.randn(8, 5, generator=_gen(0), dtype=F64)
    b = torch.randn(8, generator=_gen(1), dtype=F64)

    def loss_of(z):
        return (A @ z - b).square().sum() + z.abs().pow(3).sum()

    z = torch.zeros(5, dtype=F64)
    log = minimize(z, lambda _, z: loss_of(z), steps=40, lr=0.05, log_every=8)
    w = torch.zeros(5, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        ref_loss = loss_of(w)
        losses.append(float(ref_loss.detach()))
        ref_loss.backward()
        opt.step()
    torch.testing.assert_close(z, w.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log.last_loss, ref_loss.detach())
    # the log holds the mean loss of each window of 8 steps
    assert log.steps == [8, 16, 24, 32, 40] and log.steps_taken == 40
    windows = [sum(losses[i : i + 8]) / 8 for i in range(0, 40, 8)]
    assert log.losses == pytest.approx(windows, rel=1e-12)


def test_minimize_stops_at_a_nonfinite_window():
    z = torch.ones(2, dtype=F64)
    log = minimize(
        z,
        lambda t, z: z.sum() * (math.inf if t == 7 else 1.0),
        steps=50,
        lr=0.1,
        log_every=5,
    )
    assert log.steps == [5, 10] and log.steps_taken == 10 and not log.finite
    assert log.window() == (6, 10)


@pytest.fixture(scope="module")
def blobs():
    kw = {"n": 300, "dim": 6, "classes": 3, "margin": 3.0}
    train = lg.zoo.dataset("gaussian_mixture", split="train", seed=0, **kw)
    test = lg.zoo.dataset("gaussian_mixture", split="test", seed=0, **kw)
    return train, test


def _net(seed=0):
    return lg.zoo.model(
        "mlp", in_features=6, num_classes=3, width=6, seed=seed
    ).double()


@pytest.mark.parametrize("kind", KINDS)
def test_subspace_training_sanity(blobs, kind):
    (train, test), loss = blobs, nn.CrossEntropyLoss()
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    D = sum(p.numel() for p in net.parameters())
    kw = {"steps": 150, "lr": 0.05, "projection": kind, "dtype": F64}
    full = subspace_train(net, loss, train, test, D, **kw)
    one = subspace_train(net, loss, train, test, 1, **kw)
    assert full.finite and full.dim == D and full.projection == kind
    # reference: the full model trained directly
    ref = intrinsic_dimension(
        net, loss, train, test, dims=[D], steps=150, lr=0.05, reference_lr=0.05,
        projection=kind, dtype=F64,
    )  # fmt: skip
    assert full.accuracy >= ref.reference_accuracy - 0.05
    assert full.accuracy > 0.8
    assert one.accuracy < full.accuracy - 0.1
    assert one.loss > full.loss
    for k, v in net.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k])


def test_intrinsic_dimension_search(blobs):
    (train, test), loss = blobs, nn.CrossEntropyLoss()
    net = _net(1)
    D = sum(p.numel() for p in net.parameters())
    res = intrinsic_dimension(
        net, loss, train, test, steps=120, lr=0.05, reference_lr=0.05, dtype=F64,
        resolution=1.2,
    )  # fmt: skip
    assert res.found and res.num_params == D and res.projection == "fastfood"
    assert res.target_accuracy == pytest.approx(0.9 * res.reference_accuracy)
    acc = dict(zip(res.dims, res.accuracies, strict=True))
    assert acc[res.d_int] >= res.target_accuracy
    # the bracket is resolved: below d_int the last size tried misses the target
    if res.lower is not None:
        assert acc[res.lower] < res.target_accuracy
        assert res.d_int - res.lower <= 1 or res.d_int <= 1.2 * res.lower
    grid = [r["dim"] for r in res.runs if r["stage"] == "grid"]
    assert grid == [d for d in [1, 2, 4, 8, 16, 32, 64] if d <= grid[-1]]
    assert res.runs[0]["stage"] == "reference"
    assert all(r["dim"] < grid[-1] for r in res.runs if r["stage"] == "bisection")
    # accuracy grows with d across the grid (from chance-like to the target)
    assert acc[grid[-1]] > acc[1] + 0.2
    assert res.cost.counters["runs"] == len(res.runs) and res.cost.seconds > 0
    out = json.loads(json.dumps(res.to_dict()))
    assert out["d_int"] == res.d_int and out["parameters"]["seed"] == 0
    # a given reference skips the full training; an impossible target is reported
    none = intrinsic_dimension(
        net, loss, train, test, dims=[1, 2], steps=20, reference_accuracy=1.0,
        dtype=F64,
    )  # fmt: skip
    assert not none.found and none.d_int is None and none.lower is None
    assert [r["stage"] for r in none.runs] == ["grid", "grid"]
    assert none.d_int90 is None  # threshold 0.9
    half = intrinsic_dimension(
        net, loss, train, test, dims=[D], steps=5, reference_accuracy=0.2,
        threshold=0.5, dtype=F64,
    )  # fmt: skip
    assert half.d_int == D and half.lower is None
    with pytest.raises(ValueError, match="threshold=0.5"):
        _ = half.d_int90


def test_intrinsic_dimension_bad_input(blobs):
    (train, test), loss = blobs, nn.CrossEntropyLoss()
    net = _net()
    D = sum(p.numel() for p in net.parameters())
    call = {"steps": 1, "reference_accuracy": 0.9}
    with pytest.raises(ValueError, match=f"exceeds the parameter count D={D}"):
        intrinsic_dimension(net, loss, train, test, dims=[4, D + 1], **call)
    with pytest.raises(ValueError, match="at least 1"):
        intrinsic_dimension(net, loss, train, test, dims=[0, 4], **call)
    with pytest.raises(ValueError, match="unknown projection"):
        intrinsic_dimension(net, loss, train, test, projection="gauss", **call)
    for bad in (0.0, 1.01, -1):
        with pytest.raises(
            ValueError, match=r"threshold must be a fraction in \(0, 1\]"
        ):
            intrinsic_dimension(net, loss, train, test, threshold=bad, **call)
    with pytest.raises(ValueError, match="resolution"):
        intrinsic_dimension(net, loss, train, test, resolution=1.0, **call)
    with pytest.raises(ValueError, match="reference_accuracy"):
        intrinsic_dimension(net, loss, train, test, steps=1, reference_accuracy=90)
    with pytest.raises(ValueError, match="pair of tensors"):
        intrinsic_dimension(net, loss, [train], test, **call)
    with pytest.raises(ValueError, match="exceeds the parameter count"):
        subspace_train(net, loss, train, test, D + 1, steps=1)
    regression = nn.Linear(6, 1).double()
    X, y = train
    with pytest.raises(ValueError, match="classifier"):
        intrinsic_dimension(
            regression, nn.MSELoss(), (X, y[:, None].double()),
            (X, y[:, None].double()), **call,
        )  # fmt: skip


def test_projections_live_in_linalg_and_stay_reachable_from_measures():
    import lossgeom.linalg.projections as projections
    import lossgeom.measures as measures

    for name in ("DenseProjection", "FastfoodProjection", "Projection", "fwht"):
        assert getattr(measures, name) is getattr(projections, name)
    assert lg.random_projection is projections.random_projection
    assert projections.fwht.__module__ == "lossgeom.linalg.projections"
