"""Nudged elastic band: forces, saddles on closed-form surfaces, two trained MLPs."""

import json
import math

import pytest
import torch
from torch import nn
from torch.func import grad, hessian

import lossgeom as lg
from lossgeom.geometry._neb import NEBResult
from lossgeom.geometry._neb_forces import (
    Fire,
    band_forces,
    band_loss_and_grads,
    interior_maximum,
    tangents,
)
from lossgeom.linalg._operator import NonFiniteError
from lossgeom.zoo._surfaces import mueller_brown

F64 = torch.float64

# Mueller & Brown 1979, footnote 7: stationary points to three decimals.
PUBLISHED = {
    "A": ((-0.558, 1.442), -146.700),
    "B": ((0.623, 0.028), -108.167),
    "C": ((-0.050, 0.467), -80.768),
    "S1": ((-0.822, 0.624), -40.665),
    "S2": ((0.212, 0.293), -72.249),
}


def newton(fn, start, iters=30):
    """A stationary point of ``fn`` near ``start`` by Newton's method on the gradient."""
    w = torch.tensor(start, dtype=F64)
    for _ in range(iters):
        w = w - torch.linalg.solve(hessian(fn)(w), grad(fn)(w))
    return w


@pytest.fixture(scope="module")
def mb_points():
    return {k: newton(mueller_brown, xy) for k, (xy, _) in PUBLISHED.items()}


def mb_objective():
    return lg.Objective(*lg.zoo.surface("mueller_brown"))


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
    )


def same(before, after):
    return (
        before[1:] == after[1:]
        and before[0].keys() == after[0].keys()
        and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    )


# ------------------------------------------------------------ forces and steps
def test_improved_tangent_follows_the_higher_neighbour_and_blends_at_extrema():
    R = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]], dtype=F64)
    up = tangents(R, torch.tensor([0.0, 1.0, 3.0], dtype=F64))
    down = tangents(R, torch.tensor([3.0, 1.0, 0.0], dtype=F64))
    assert up.tolist() == [[0.0, 1.0]] and down.tolist() == [[1.0, 0.0]]
    # a maximum: the larger loss difference weights the segment
    # toward the higher neighbour, tau = tau+ dVmax + tau- dVmin when V+ > V-
    E = torch.tensor([0.0, 2.0, 1.5], dtype=F64)  # dV+ = 0.5, dV- = 2
    want = torch.tensor([0.0, 2.0]) * 2.0 + torch.tensor([1.0, 0.0]) * 0.5
    torch.testing.assert_close(tangents(R, E)[0], (want / want.norm()).to(F64))
    E = torch.tensor([1.5, 2.0, 0.0], dtype=F64)  # V- higher: tau- gets dVmax
    want = torch.tensor([0.0, 2.0]) * 0.5 + torch.tensor([1.0, 0.0]) * 2.0
    torch.testing.assert_close(tangents(R, E)[0], (want / want.norm()).to(F64))
    # equal losses: the bisector of the two unit segments
    flat = tangents(R, torch.zeros(3, dtype=F64))[0]
    torch.testing.assert_close(flat, torch.tensor([1.0, 1.0], dtype=F64) / 2**0.5)


def test_force_is_perpendicular_gradient_plus_spring_and_the_climber_inverts():
    g = torch.Generator().manual_seed(0)
    R = torch.randn(6, 5, generator=g, dtype=F64)
    E = torch.tensor([0.0, 1.0, 3.0, 2.0, 2.5, 0.5], dtype=F64)
    G = torch.randn(4, 5, generator=g, dtype=F64)
    k = 0.7
    f = band_forces(R, E, G, spring=k, climbing=True)
    tau = tangents(R, E)
    gaps = (R[1:] - R[:-1]).norm(dim=1)
    assert f.climber == 1  # image 2, the highest, is a local maximum
    for i in range(4):
        along = float(f.force[i] @ tau[i])
        perp = f.force[i] - along * tau[i]
        g_along = float(G[i] @ tau[i])
        if i == f.climber:  # no spring; the parallel gradient inverted
            assert along == pytest.approx(g_along, abs=1e-12)
            assert float(f.residual[i]) == pytest.approx(float(G[i].norm()))
        else:
            assert along == pytest.approx(k * float(gaps[i + 1] - gaps[i]), abs=1e-12)
            assert float(f.residual[i]) == pytest.approx(float(perp.norm()))
        torch.testing.assert_close(perp, -(G[i] - g_along * tau[i]))
    plain = band_forces(R, E, G, spring=k, climbing=False)
    assert plain.climber is None
    assert torch.equal(plain.force[0], f.force[0])


def test_climbing_image_is_the_highest_local_maximum():
    assert interior_maximum(torch.tensor([0.0, 1.0, 3.0, 2.0, 2.5, 0.5])) == 2
    # the highest movable image sits next to a higher end: the interior bump climbs
    assert interior_maximum(torch.tensor([9.0, 4.0, 1.0, 2.0, 1.0])) == 3
    assert interior_maximum(torch.tensor([3.0, 2.0, 1.0, 0.0])) is None


def test_fire_accelerates_downhill_and_stops_uphill():
    fire = Fire(dt=0.1, dt_max=0.3)
    F = torch.ones(2, 3, dtype=F64)
    for _ in range(30):
        fire.move(F)
    assert fire.dt == pytest.approx(0.3) and fire.alpha < 0.1
    fire.move(-F)
    assert fire.dt == pytest.approx(0.15) and fire.alpha == 0.1
    assert torch.equal(fire.velocity, -0.15 * F)


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_band_gradients_match_the_objective_batch_by_batch(chunk):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(30, 4, dtype=F64)
    y = torch.randint(0, 3, (30,))
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y), batch_size=8)
    P = obj.theta + 0.3 * torch.randn(5, obj.dim, dtype=F64)
    before = obj.counters.to_dict()
    E, G = band_loss_and_grads(obj, P, chunk_size=chunk)
    assert obj.counters.grad - before["grad"] == 5
    assert obj.counters.passes - before["passes"] == 1
    for p, e, g in zip(P, E, G, strict=True):
        loss, want = obj.loss_and_grad(p)
        assert float(e) == pytest.approx(loss, rel=1e-12)
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-13)
    # a minibatch: the loss function's own mean over those samples
    Eb, Gb = band_loss_and_grads(obj, P, chunk_size=chunk, batch=(X[:7], y[:7]))
    p3 = P[3].clone().requires_grad_(True)
    with obj.probe_mode(higher_order=False):
        loss = obj.batch_loss(p3, X[:7], y[:7])
        (ref,) = torch.autograd.grad(loss, p3)
    assert float(Eb[3]) == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(Gb[3], ref, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------ closed-form surfaces
def bent(t):
    return torch.stack([2 * t - 1, 0.8 * torch.sin(torch.pi * t)], 1)


@pytest.mark.parametrize(
    "optimizer,step", [("fire", 1.0), ("descent", 0.05)], ids=["fire", "descent"]
)
def test_double_well_climbing_image_finds_the_saddle(optimizer, step):
    obj = lg.Objective(*lg.zoo.surface("double_well"))
    a = torch.tensor([-1.0, 0.0], dtype=F64)
    res = lg.connect(
        obj,
        a,
        -a,
        curve="neb",
        images=6,
        init=bent,
        tol=1e-7,
        optimizer=optimizer,
        step=step,
        steps=2000,
    )
    assert isinstance(res, NEBResult) and isinstance(res, lg.ConnectResult)
    assert res.converged and res.max_residual < 1e-7 and res.steps < 2000
    assert res.saddle.abs().max() < 1e-4
    assert res.saddle_loss == pytest.approx(1.0, abs=1e-8)
    assert res.saddle_grad_norm < 1e-7
    # the band lies on the minimum-energy path, the segment y = 0
    assert res.control_points[:, 1].abs().max() < 1e-6
    assert res.barrier == pytest.approx(1.0, abs=1e-8) == res.linear_barrier
    assert res.barrier_t == pytest.approx(0.5, abs=1e-6)
    # the polygon through the images, parametrised by arc length
    assert (res.image_ts.diff() > 0).all() and res.image_ts[[0, -1]].tolist() == [0, 1]
    torch.testing.assert_close(res(res.image_ts), res.control_points)
    torch.testing.assert_close(res.point(0.5), res.saddle, atol=1e-4, rtol=0)
    assert torch.isnan(res.image_residual[[0, -1]]).all()
    assert res.history_step[-1] == res.steps and len(res.history_force) > 1
    print(
        f"\ndouble well, {optimizer}: {res.steps} iterations, saddle "
        f"{res.saddle.tolist()} (loss {res.saddle_loss:.10f}, gradient norm "
        f"{res.saddle_grad_norm:.1e}), band off y = 0 by "
        f"{float(res.control_points[:, 1].abs().max()):.1e}"
    )


def test_mueller_brown_reference_points_match_the_published_values(mb_points):
    for name, (xy, value) in PUBLISHED.items():
        w = mb_points[name]
        assert grad(mueller_brown)(w).norm() < 1e-10
        assert [round(float(v), 3) for v in w] == list(xy)
        assert round(float(mueller_brown(w)), 3) == value
        eig = torch.linalg.eigvalsh(hessian(mueller_brown)(w))
        assert (eig[0] < 0) == name.startswith("S") and eig[1] > 0
    obj = lg.Objective(*lg.zoo.surface("mueller_brown", start=mb_points["S1"]))
    assert obj.loss() == pytest.approx(-40.664843508657, abs=1e-9)
    for w in [(0.1, 0.2), (-0.9, 1.3), *mb_points.values()]:
        w = torch.as_tensor(w, dtype=F64)
        torch.testing.assert_close(obj.grad(w), mb_gradient(w), rtol=1e-12, atol=1e-9)


MB = dict(  # the constants of Mueller & Brown 1979, written out independently
    A=(-200.0, -100.0, -170.0, 15.0),
    a=(-1.0, -1.0, -6.5, 0.7),
    b=(0.0, 0.0, 11.0, 0.6),
    c=(-10.0, -10.0, -6.5, 0.7),
    x0=(1.0, 0.0, -0.5, -1.0),
    y0=(0.0, 0.5, 1.5, 1.0),
)


def mb_gradient(w):
    """The closed-form gradient of the Mueller-Brown potential."""
    gx = gy = 0.0
    for A, a, b, c, x0, y0 in zip(*MB.values(), strict=True):
        dx, dy = float(w[0]) - x0, float(w[1]) - y0
        e = A * math.exp(a * dx * dx + b * dx * dy + c * dy * dy)
        gx += e * (2 * a * dx + b * dy)
        gy += e * (b * dx + 2 * c * dy)
    return torch.tensor([gx, gy], dtype=F64)


def reference_path(S, minima, ds=4e-3):
    """The minimum-energy path through saddle ``S``: steepest descent both ways.

    The unit flow ``-g / |g|`` by fourth-order Runge-Kutta in arc length, from
    ``S`` displaced along the Hessian's negative eigenvector, to a minimum.
    """

    def flow(w):
        g = mb_gradient(w)
        return -g / g.norm()

    v = torch.linalg.eigh(hessian(mueller_brown)(S)).eigenvectors[:, 0]
    branches = []
    for sign in (1.0, -1.0):
        w = S + sign * 1e-3 * v
        pts = [S, w]
        for _ in range(2000):
            k1 = flow(w)
            k2 = flow(w + ds / 2 * k1)
            k3 = flow(w + ds / 2 * k2)
            k4 = flow(w + ds * k3)
            w = w + ds / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            pts.append(w)
            if min(float((w - m).norm()) for m in minima) < 2 * ds:
                break
        branches.append(torch.stack(pts))
    return torch.cat([branches[0].flip(0), branches[1][1:]])


def distance_to_polyline(P, L):
    A, D = L[:-1], L[1:] - L[:-1]
    t = ((P[:, None] - A) * D).sum(-1) / (D * D).sum(-1).clamp_min(1e-300)
    near = A + t.clamp(0, 1)[..., None] * D
    return (P[:, None] - near).norm(dim=-1).min(1).values


@pytest.mark.parametrize(
    "ends,saddle", [("AC", "S1"), ("CB", "S2"), ("AB", "S1")], ids=str
)
def test_mueller_brown_saddles_and_minimum_energy_path(mb_points, ends, saddle):
    obj = mb_objective()
    a, b = mb_points[ends[0]], mb_points[ends[1]]
    res = lg.connect(obj, a, b, curve="neb", images=10, step=0.02, tol=1e-2)
    assert res.converged, (res.max_residual, res.steps)
    assert (res.saddle - mb_points[saddle]).norm() < 1e-4
    assert res.saddle_loss == pytest.approx(float(mueller_brown(mb_points[saddle])))
    assert res.saddle_grad_norm < 1e-2
    assert res.barrier < res.linear_barrier
    # every image on the minimum-energy path through the saddle(s)
    minima = [mb_points[k] for k in "ABC"]
    through = {"AC": ["S1"], "CB": ["S2"], "AB": ["S1", "S2"]}[ends]
    mep = torch.cat([reference_path(mb_points[s], minima) for s in through])
    gap = distance_to_polyline(res.control_points, mep)
    # the images sit on the path up to the band's discretisation: the upwind
    # tangent is a chord, off the curved path's tangent by O(spacing)
    assert gap.max() < 0.05 and gap.mean() < 0.015, gap
    line = torch.lerp(a, b, torch.linspace(0, 1, 12, dtype=F64)[:, None])
    line_gap = distance_to_polyline(line, mep)
    assert gap.max() < 0.5 * line_gap.max()
    print(
        f"\nMueller-Brown {ends[0]}->{ends[1]}: {res.steps} iterations, saddle "
        f"{saddle} found to {float((res.saddle - mb_points[saddle]).norm()):.1e} "
        f"(loss {res.saddle_loss:.6f}, gradient norm {res.saddle_grad_norm:.1e}); "
        f"barrier {res.barrier:.3f} vs line {res.linear_barrier:.3f}; images off "
        f"the MEP by {float(gap.max()):.1e} at most (line: {float(line_gap.max()):.2f})"
    )
    if ends == "AB":  # through the intermediate minimum C: two maxima along the band
        assert len(res.details["local_maxima"]) == 2
        assert min((res.control_points - mb_points["C"]).norm(dim=1)) < 0.2


def test_autoneb_cycles_insert_images_where_the_loss_changes_most(mb_points):
    obj = mb_objective()
    a, b = mb_points["A"], mb_points["B"]
    res = lg.connect(
        obj,
        a,
        b,
        curve="neb",
        images=4,
        cycles=3,
        insert=2,
        steps=400,
        step=0.02,
        tol=1e-2,
    )
    assert res.images == 4 + 2 * 2 and res.cycles == 3
    assert res.control_points.shape == (10, 2)
    assert (res.saddle - mb_points["S1"]).norm() < 1e-4
    assert res.parameters["cycles"] == 3 and res.parameters["insert"] == 2


def test_a_band_without_interior_maximum_reports_no_saddle():
    obj = lg.Objective(*lg.zoo.surface("rosenbrock"))
    a = torch.tensor([-1.0, 1.0], dtype=F64)
    b = torch.tensor([1.0, 1.0], dtype=F64)  # the minimum: the loss falls to it
    res = lg.connect(obj, a, b, curve="neb", images=4, steps=50, step=0.01)
    assert res.saddle_index is None and res.saddle is None
    assert math.isnan(res.saddle_loss) and math.isnan(res.saddle_grad_norm)
    assert res.details["local_maxima"] == []
    assert all(isinstance(v, float) for v in res.scalars().values())


# ------------------------------------------------------------- two trained MLPs
def train_mlp(seed, run_dir):
    cfg = {
        "name": f"neb-{seed}",
        "seed": seed,
        "model": {"name": "mlp", "options": {"width": 16, "depth": 1}},
        "data": {"name": "digits", "subset": 300, "test": False},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "steps": 250,
        "batch_size": 50,
        "metrics": None,
        "dtype": "float64",
    }
    return lg.train(cfg, run_dir).model


@pytest.fixture(scope="module")
def mlps(tmp_path_factory):
    root = tmp_path_factory.mktemp("neb")
    models = [train_mlp(seed, root / f"seed{seed}") for seed in (0, 1)]
    X, y = lg.zoo.dataset("digits", split="train", subset=300, seed=0)
    return models, (X.to(F64), y)


def test_two_mlps_neb_barrier_is_below_the_line_and_compared_with_bezier(mlps):
    (m0, m1), data = mlps
    before = [snapshot(m) for m in (m0, m1)]
    obj = lg.Objective(m0, nn.CrossEntropyLoss(), data)
    a, b = obj.theta, obj.flatten(dict(m1.named_parameters())).detach()
    line = lg.interpolate(obj, a, b, n_points=29)
    bez = lg.connect(obj, a, b, "bezier", steps=200, batch_size=None, n_points=29)
    res = lg.connect(obj, a, b, curve="neb", images=6, steps=200)
    warm = lg.connect(obj, a, b, curve="neb", images=4, steps=60, init=bez)
    assert [same(s, snapshot(m)) for s, m in zip(before, (m0, m1), strict=True)] == [
        True,
        True,
    ]
    assert line.barrier > 0.1  # a clear barrier on the straight line
    assert res.linear_barrier == pytest.approx(line.barrier, rel=1e-9)
    assert res.barrier <= line.barrier and res.barrier < 0.1 * line.barrier
    assert res.loss.max() <= max(res.loss[0], res.loss[-1]) + 0.01
    assert warm.barrier < 0.1 * line.barrier
    assert res.cost.counters["grad"] >= 6 * res.steps
    ends = res.image_grad_norm[[0, -1]].tolist()
    print(
        f"\nMLP 64-16-10 (d={obj.dim}), 300 digits, |b - a| = "
        f"{float((b - a).norm()):.2f}, end losses {float(res.loss[0]):.5f} / "
        f"{float(res.loss[-1]):.5f}, end gradient norms {ends[0]:.1e} / {ends[1]:.1e}"
        f"\n  straight line barrier {line.barrier:.5f}, max loss "
        f"{float(line.loss.max()):.5f}"
        f"\n  Bezier (1 bend, 200 full-batch Adam steps) barrier {bez.barrier:.5f}, "
        f"max loss {float(bez.loss.max()):.5f}, {bez.cost.seconds:.2f} s"
        f"\n  NEB (6 images, {res.steps} iterations) barrier {res.barrier:.5f}, max "
        f"loss {float(res.loss.max()):.5f}, highest image "
        f"{float(res.image_loss[1:-1].max()):.5f}, max residual "
        f"{res.max_residual:.2e}, saddle grad norm {res.saddle_grad_norm:.2e}, "
        f"{res.cost.seconds:.2f} s"
        f"\n  NEB from the Bezier curve ({warm.steps} iterations) barrier "
        f"{warm.barrier:.5f}, max loss {float(warm.loss.max()):.5f}, max residual "
        f"{warm.max_residual:.2e}, {warm.cost.seconds:.2f} s"
    )


def test_minibatch_forces_on_a_network(mlps):
    (m0, m1), data = mlps
    obj = lg.Objective(m0, nn.CrossEntropyLoss(), data)
    a, b = obj.theta, obj.flatten(dict(m1.named_parameters())).detach()
    kw = dict(curve="neb", images=4, steps=40, minibatch=64, seed=3)
    r1 = lg.connect(obj, a, b, **kw)
    r2 = lg.connect(obj, a, b, **kw)
    assert torch.equal(r1.control_points, r2.control_points)  # seeded
    assert r1.steps == 40  # no early stop on minibatch forces
    assert r1.details["minibatch_gradients"] == 40 * 6
    assert r1.barrier < 0.5 * r1.linear_barrier
    # the certificate is always on the full data
    E, G = band_loss_and_grads(obj, r1.control_points, chunk_size=None)
    torch.testing.assert_close(r1.image_loss, E)
    torch.testing.assert_close(r1.image_grad_norm, G.norm(dim=1))


# ------------------------------------------------------------ storage, errors
def test_save_load_round_trip(tmp_path):
    obj = lg.Objective(*lg.zoo.surface("double_well"))
    a = torch.tensor([-1.0, 0.0], dtype=F64)
    res = lg.connect(obj, a, -a, curve="neb", images=3, init=bent, steps=40)
    back = lg.load_result(res.save(tmp_path / "neb"))
    lg.testing.assert_results_equal(res, back)
    ts = torch.rand(7, dtype=F64)
    assert torch.equal(back(ts), res(ts))
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["type"] == "NEBResult" and d["kind"] == "neb" and d["bends"] == 3
    assert "Henkelman" in d["definition"] and "control_points" not in d
    assert set(res.scalars()) >= {"value", "saddle_loss", "saddle_grad_norm"}


def test_non_finite_images_are_located():
    class Pole(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, 0.0], dtype=F64))

        def forward(self, x):
            return (1 / self.w[0] ** 2 + self.w[1] ** 2).expand(x.shape[0], 1)

    data = (torch.zeros(1, 1, dtype=F64), torch.zeros(1, dtype=F64))
    obj = lg.Objective(Pole(), lambda out, y: out.mean(), data)
    a = torch.tensor([-1.0, 0.0], dtype=F64)
    with pytest.raises(NonFiniteError, match=r"iteration 1, at images \[2\]"):
        lg.connect(obj, a, -a, curve="neb", images=3)


def test_bad_input_errors_name_the_argument():
    obj = lg.Objective(*lg.zoo.surface("double_well"))
    a = torch.tensor([-1.0, 0.0], dtype=F64)
    cases = [
        (dict(images=0), r"images must be an integer >= 1"),
        (dict(images=2.5), r"images must be an integer"),
        (dict(step=0.0), r"step must be a positive finite number"),
        (dict(step=-1), r"step must be a positive"),
        (dict(spring=0), r"spring must be a positive finite number"),
        (dict(spring=math.inf), r"spring must be a positive finite"),
        (dict(tol=0), r"tol must be"),
        (dict(max_move=-1), r"max_move must be"),
        (dict(steps=0), r"steps must be an integer >= 1"),
        (dict(cycles=0), r"cycles must be an integer >= 1"),
        (dict(minibatch=0), r"minibatch must be an integer >= 1"),
        (dict(optimizer="adam"), r"optimizer must be one of"),
        (dict(climbing="yes"), r"climbing must be True or False"),
        (dict(theta_a=torch.zeros(3, dtype=F64)), r"theta_a of shape \(2,\)"),
        (dict(theta_b=torch.zeros(2, 1, dtype=F64)), r"theta_b of shape \(2,\)"),
        (dict(theta_b=a.float()), r"theta_b of dtype torch.float64"),
        (dict(theta_b=a.clone()), r"same point"),
        (dict(init=torch.zeros(2, 2, dtype=F64)), r"init must give .* \(3, 2\)"),
        (dict(bends=2), r"bends=2 applies to curve='bezier'.*use images"),
        (dict(lr=0.1), r"lr=0.1 applies to .*use step"),
        (dict(batch_size=32), r"batch_size=32 .*use minibatch"),
        (dict(n_points=9), r"n_points=9 .*use per_segment"),
    ]
    for kw, match in cases:
        args = {"theta_a": a, "theta_b": -a, "images": 3, **kw}
        with pytest.raises(ValueError, match=match):
            lg.connect(obj, args.pop("theta_a"), args.pop("theta_b"), "neb", **args)
    with pytest.raises(ValueError, match=r"\['images'\].*curve='neb'"):
        lg.connect(obj, a, -a, "bezier", images=3)
    with pytest.raises(ValueError, match=r"unknown curve kind 'spline'.*'neb'"):
        lg.connect(obj, a, -a, "spline")
