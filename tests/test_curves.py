"""Mode-connecting curves: exact geometry in float64, training, BatchNorm, storage."""

import dataclasses
import math

import pytest
import torch
from torch import nn

import lossgeom as lg
from lossgeom import load_result, save_result
from lossgeom.geometry._curve_training import (
    _curve_loss,
    _initial_bends,
    _minibatches,
)
from lossgeom.geometry._curves import ConnectResult, connect, curve_weights

F64 = torch.float64


# ----------------------------------------------------------------- helpers
class Ring(nn.Module):
    """``L(w) = (|w|^2 - 1)^2``: a ring of minima; the chord through 0 peaks at 1."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 0.0], dtype=F64))

    def forward(self, x):
        return ((self.w**2).sum() - 1).pow(2).expand(x.shape[0], 1)


def ring_objective():
    data = (torch.zeros(1, 1, dtype=F64), torch.zeros(1, dtype=F64))
    return lg.Objective(Ring(), lambda out, y: out.mean(), data)


def mlp_objective(norm=False, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8)]
    if norm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    model = nn.Sequential(*layers).double()
    X = torch.randn(n, 5, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    return lg.Objective(model, nn.CrossEntropyLoss(), (X, y)), model, (X, y)


def de_casteljau(C, t):
    """Reference Bezier point by repeated linear interpolation (no Bernstein)."""
    pts = list(C)
    while len(pts) > 1:
        pts = [(1 - t) * p + t * q for p, q in zip(pts[:-1], pts[1:], strict=True)]
    return pts[0]


def result_with(kind, C):
    """A ConnectResult with given control points (other fields irrelevant here)."""
    ts = torch.linspace(0, 1, 3, dtype=C.dtype)
    z = torch.zeros(3, dtype=C.dtype)
    return ConnectResult(
        control_points=C,
        kind=kind,
        ts=ts,
        loss=z,
        accuracy=None,
        barrier=0.0,
        barrier_t=0.0,
        linear_loss=z,
        linear_accuracy=None,
        linear_barrier=0.0,
        history_step=torch.zeros(0, dtype=torch.int64),
        history_loss=torch.zeros(0, dtype=F64),
        steps=0,
    )


# --------------------------------------------------------------- geometry
def test_quadratic_bezier_matches_closed_form():
    g = torch.Generator().manual_seed(1)
    a, c, b = torch.randn(3, 7, generator=g, dtype=F64)
    res = result_with("bezier", torch.stack([a, c, b]))
    for t in (0.0, 0.5, 1.0, 0.3):
        want = (1 - t) ** 2 * a + 2 * t * (1 - t) * c + t**2 * b
        torch.testing.assert_close(res.point(t), want, rtol=1e-14, atol=1e-14)
    assert torch.equal(res(0.0), a) and torch.equal(res(1.0), b)


@pytest.mark.parametrize("bends", [1, 2, 4])
def test_bezier_of_any_degree_matches_de_casteljau(bends):
    g = torch.Generator().manual_seed(bends)
    C = torch.randn(bends + 2, 5, generator=g, dtype=F64)
    res = result_with("bezier", C)
    ts = torch.rand(9, generator=g, dtype=F64)
    got = res(ts)
    assert got.shape == (9, 5)
    for t, row in zip(ts, got, strict=True):
        torch.testing.assert_close(row, de_casteljau(C, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bends", [1, 3])
def test_polychain_passes_through_bends_and_is_linear_between(bends):
    g = torch.Generator().manual_seed(bends)
    C = torch.randn(bends + 2, 4, generator=g, dtype=F64)
    res = result_with("polychain", C)
    n = bends + 1
    for i in range(n + 1):
        torch.testing.assert_close(res(i / n), C[i], rtol=0, atol=1e-14)
    for i in range(n):
        for u in (0.25, 0.5, 0.9):
            t = (i + u) / n
            want = (1 - u) * C[i] + u * C[i + 1]
            torch.testing.assert_close(res(t), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
@pytest.mark.parametrize("bends", [1, 3])
def test_weights_sum_to_one_and_initial_curve_is_the_line(kind, bends):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 6, generator=g, dtype=F64)
    ts = torch.linspace(0, 1, 17, dtype=F64)
    W = curve_weights(kind, ts, bends + 2)
    torch.testing.assert_close(W.sum(1), torch.ones(17, dtype=F64))
    assert (W >= 0).all()
    C = torch.cat([a[None], _initial_bends(a, b, bends, 0.0, g), b[None]])
    line = (1 - ts)[:, None] * a + ts[:, None] * b
    torch.testing.assert_close(W @ C, line, rtol=1e-13, atol=1e-13)


def test_initial_noise_is_seeded_and_scaled():
    a = torch.zeros(400, dtype=F64)
    b = torch.ones(400, dtype=F64)
    draws = [
        _initial_bends(a, b, 2, 0.1, torch.Generator().manual_seed(s))
        for s in (3, 3, 4)
    ]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    line = _initial_bends(a, b, 2, 0.0, torch.Generator())
    size = (draws[0] - line).norm(dim=1) / (b - a).norm()
    assert ((size > 0.08) & (size < 0.12)).all(), size  # norm about 0.1 |b - a|


# --------------------------------------------------------------- training
@pytest.mark.parametrize("kind", ["bezier", "polychain"])
def test_training_gradient_matches_chain_rule_and_finite_differences(kind):
    obj, _, (X, y) = mlp_objective()
    g = torch.Generator().manual_seed(2)
    a = obj.theta
    b = a + 0.5 * torch.randn(obj.dim, generator=g, dtype=F64)
    free = (
        0.5 * (a + b) + 0.3 * torch.randn(2, obj.dim, generator=g, dtype=F64)
    ).requires_grad_(True)
    ts = torch.tensor([0.2, 0.55, 0.8], dtype=F64)

    def loss(f, criterion="mean"):
        with obj.probe_mode(higher_order=False):
            return _curve_loss(obj, kind, a, b, f, ts, X, y, criterion)

    (got,) = torch.autograd.grad(loss(free), free)
    # chain rule: d/dc_k mean_j L(phi(t_j)) = mean_j w_k(t_j) grad L(phi(t_j))
    W = curve_weights(kind, ts, 4)
    C = torch.cat([a[None], free.detach(), b[None]])
    want = sum(W[j, 1:-1, None] * obj.grad(W[j] @ C) for j in range(3)) / 3
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # finite differences along a random direction
    V = torch.randn(free.shape, generator=g, dtype=F64)
    eps = 1e-6
    with torch.no_grad():
        fd = (loss(free + eps * V) - loss(free - eps * V)) / (2 * eps)
    assert abs(float(fd) - float((got * V).sum())) <= 1e-6 * max(1.0, abs(float(fd)))
    # minimax takes the largest of the per-t losses
    with obj.probe_mode(higher_order=False):
        each = [obj.batch_loss(W[j] @ C, X, y) for j in range(3)]
    torch.testing.assert_close(loss(free.detach(), "minimax"), max(each))


def test_trained_curve_lowers_the_ring_barrier():
    obj = ring_objective()
    a = torch.tensor([-1.0, 0.0], dtype=F64)
    for kind, bends, objective in [
        ("bezier", 1, "mean"),
        ("bezier", 3, "minimax"),
        ("polychain", 3, "mean"),
    ]:
        res = connect(
            obj,
            a,
            -a,
            kind,
            bends,
            steps=300,
            lr=0.05,
            init_noise=0.1,
            seed=0,
            criterion=objective,
            n_points=41,
        )
        assert math.isclose(res.linear_barrier, 1.0, rel_tol=1e-12)
        assert res.barrier < 0.15 * res.linear_barrier, (kind, bends, res.barrier)
        assert res.barrier_reduction > 0.85
        # the curve really bends away from the chord through the origin
        assert res(0.5).norm() > 0.5
        assert torch.equal(res.control_points[0], a)
        assert torch.equal(res.control_points[-1], -a)
        assert res.history_loss[-1] < res.history_loss[0]


def test_without_noise_a_symmetric_line_is_a_critical_path():
    # the ring is symmetric about the chord, so the gradient never leaves it
    obj = ring_objective()
    a = torch.tensor([-1.0, 0.0], dtype=F64)
    res = connect(obj, a, -a, steps=50, lr=0.05, n_points=11)
    assert torch.all(res.control_points[:, 1] == 0)
    assert res.barrier > 0.9


def test_seeded_runs_repeat():
    obj = ring_objective()
    a = torch.tensor([-1.0, 0.0], dtype=F64)
    kw = dict(steps=20, lr=0.05, init_noise=0.1, n_points=5)
    r1, r2 = connect(obj, a, -a, seed=5, **kw), connect(obj, a, -a, seed=5, **kw)
    r3 = connect(obj, a, -a, seed=6, **kw)
    assert torch.equal(r1.control_points, r2.control_points)
    assert not torch.equal(r1.control_points, r3.control_points)


def test_minibatches_shuffle_within_batches_and_drop_short_remainders():
    obj, _, _ = mlp_objective(n=10)
    stream = _minibatches(obj, 4, torch.Generator().manual_seed(0))
    chunks = [next(stream) for _ in range(6)]
    assert [x.shape[0] for x, _ in chunks] == [4] * 6  # 10 = 4 + 4 + (2 dropped)
    X = obj_data(obj)[0]
    rows = [
        int((X == r).all(1).nonzero()) for r in torch.cat([c[0] for c in chunks[:2]])
    ]
    assert len(set(rows)) == 8  # no sample twice within a pass
    whole = _minibatches(obj, 64, torch.Generator().manual_seed(0))
    assert next(whole)[0].shape[0] == 10  # batch larger than the data: all of it


def test_iterable_data_under_no_grad_with_bn():
    obj, model, (X, y) = mlp_objective(norm=True)
    batches = [(X[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    obj = lg.Objective(model, nn.CrossEntropyLoss(), batches)
    a = obj.theta
    with torch.no_grad():
        res = connect(obj, a, a + 0.2, "polychain", 2, steps=12, batch_size=8)
    assert res.parameters["train_mode"] == "train"
    assert len(res.history_step) == 12 and torch.isfinite(res.history_loss).all()
    assert torch.isfinite(res.loss).all() and res.control_points.shape == (4, obj.dim)


# ------------------------------------------------------ model and BatchNorm
def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
    )


def test_model_unchanged_and_bn_curve_evaluated_with_recomputed_statistics():
    obj, model, _ = mlp_objective(norm=True)
    model[0].bias.requires_grad_(False)  # a frozen parameter stays out of theta
    model.eval()
    model[1].train()  # mixed flags must survive
    obj = lg.Objective(model, nn.CrossEntropyLoss(), obj_data(obj))
    before = snapshot(model)
    g = torch.Generator().manual_seed(0)
    a = obj.theta
    b = a + 0.3 * torch.randn(obj.dim, generator=g, dtype=F64)
    res = connect(obj, a, b, steps=10, batch_size=16, lr=1e-2, n_points=5)
    after = snapshot(model)
    assert before[1] == after[1] and before[2] == after[2]
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert res.parameters["train_mode"] == "train"
    assert res.parameters["recompute_norm"] is True
    assert res.accuracy is not None and res.linear_accuracy is not None
    # every evaluated point used BN statistics recomputed at that point
    for i in (0, 2, 4):
        p = res(res.ts[i])
        with obj.using_buffers(obj.norm_statistics(p)):
            want = obj.evaluate(p[None])[0]
        torch.testing.assert_close(res.loss[i], want, rtol=1e-12, atol=1e-14)
    # and the end point's own running statistics would give a different number
    assert not torch.isclose(obj.evaluate(a[None])[0], res.loss[0])


def obj_data(obj):
    xs, ys = zip(*obj.batches(), strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_no_bn_model_trains_in_the_objective_mode_without_recompute():
    obj, model, _ = mlp_objective()
    before = snapshot(model)
    a = obj.theta
    res = connect(obj, a, a + 0.1, steps=5, n_points=3, batch_size=None)
    assert res.parameters["train_mode"] == "eval"
    assert res.parameters["recompute_norm"] is False
    after = snapshot(model)
    assert before[1:] == after[1:]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    pts = res(res.ts)
    torch.testing.assert_close(res.loss, obj.evaluate(pts), rtol=1e-12, atol=0)


# ----------------------------------------------------------------- storage
def test_save_load_round_trip(tmp_path):
    obj = ring_objective()
    a = torch.tensor([-1.0, 0.0], dtype=F64)
    res = connect(obj, a, -a, "polychain", 2, steps=20, lr=0.05, init_noise=0.1)
    back = load_result(save_result(res, tmp_path / "curve"))
    assert isinstance(back, ConnectResult)
    ts = torch.rand(13, dtype=F64)
    assert torch.equal(back(ts), res(ts))
    assert torch.equal(back.point(0.37), res.point(0.37))
    assert back.barrier == res.barrier and back.linear_barrier == res.linear_barrier
    assert back.accuracy is None and back.parameters == res.parameters
    assert torch.equal(back.history_loss, res.history_loss)
    d = back.to_dict()
    assert d["kind"] == "polychain" and d["bends"] == 2
    assert d["definition"] == lg.geometry.BARRIER_DEFINITION


def test_eval_data_gives_held_out_losses_along_the_curve():
    obj, model, _ = mlp_objective(norm=True, n=40, seed=0)
    _, _, held = mlp_objective(norm=True, n=30, seed=1)
    a = obj.theta
    b = a + 0.5 * torch.randn(
        obj.dim, dtype=F64, generator=torch.Generator().manual_seed(3)
    )
    res = connect(obj, a, b, steps=5, n_points=5, eval_data=held)
    assert res.eval_loss is not None and res.eval_loss.shape == (5,)
    assert res.linear_eval_loss is not None
    # Held-out loss at each point: BatchNorm statistics from the objective's data.
    for t, value in zip(res.ts, res.eval_loss, strict=True):
        theta = res.point(float(t))
        stats = obj.norm_statistics(theta)
        held_here = lg.Objective(model, nn.CrossEntropyLoss(), held)
        with held_here.using_buffers(stats):
            ref = held_here.evaluate(theta[None])
        assert float(value) == pytest.approx(float(ref), rel=1e-9)
    line = (1 - res.ts) * res.eval_loss[0] + res.ts * res.eval_loss[-1]
    assert res.eval_barrier == pytest.approx(float((res.eval_loss - line).max()))
    assert res.linear_eval_barrier is not None


# -------------------------------------------------------------- bad input
def test_bad_input_errors():
    obj = ring_objective()
    a = torch.tensor([-1.0, 0.0], dtype=F64)
    cases = [
        (dict(theta_a=torch.zeros(3, dtype=F64)), r"theta_a.*shape \(2,\)"),
        (
            dict(theta_b=torch.zeros(2, dtype=torch.float32)),
            r"theta_b of dtype torch.float64.*got torch.float32",
        ),
        (dict(theta_a=None), r"theta_a of shape \(2,\).*got NoneType"),
        (dict(theta_b=[1.0, 0.0]), r"theta_b"),
        (dict(theta_a=torch.tensor([math.nan, 0.0], dtype=F64)), "non-finite"),
        (dict(bends=0), r"bends must be an integer >= 1.*got 0"),
        (dict(bends=True), r"bends must be an integer"),
        (dict(steps=0), r"steps must be an integer >= 1"),
        (dict(curve="spline"), r"unknown curve kind 'spline'.*polychain"),
        (dict(criterion="max"), r"criterion must be one of"),
        (dict(n_points=1), r"n_points must be an integer >= 2"),
        (dict(lr=-1.0), r"lr must be a positive"),
        (dict(init_noise=-0.1), r"init_noise must be"),
        (dict(train_mode="test"), r"train_mode must be one of"),
    ]
    for kw, match in cases:
        args = {"theta_a": a, "theta_b": -a, **kw}
        with pytest.raises(ValueError, match=match):
            connect(obj, args.pop("theta_a"), args.pop("theta_b"), **args)
    res = result_with("bezier", torch.stack([a, a, -a]))
    with pytest.raises(ValueError, match=r"t in \[0, 1\]"):
        res(1.5)
    with pytest.raises(ValueError, match="1-D"):
        res(torch.zeros(2, 2, dtype=F64))
    with pytest.raises(ValueError, match="unknown curve kind"):
        dataclasses.replace(res, kind="spline")(0.5)
