"""Directions, slices, paths: exact against naive loops, invariances, no side effects."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lossgeom as lg
from lossgeom.testing import exact_hessian

DTYPE = torch.float64


def _data(device, n=40, d=6, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=DTYPE).to(device)
    y = torch.randint(0, k, (n,), generator=gen).to(device)
    return X, y


def _mlp(device, d=6, h=5, k=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, k)).to(device, DTYPE)


def _bn_cnn(device, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).to(device, DTYPE)
    # Non-trivial running statistics, as after training.
    with torch.no_grad():
        model.train()
        model(torch.randn(16, 1, 4, 4, dtype=DTYPE, device=device) * 2 + 1)
    model.eval()
    return model


def _image_data(device, n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 1, 4, 4, generator=gen, dtype=DTYPE).to(device)
    y = torch.randint(0, 3, (n,), generator=gen).to(device)
    return X, y


def _snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
        [getattr(m, "momentum", None) for m in model.modules()],
    )


def _same(model, snap):
    state, grads, flags, momenta = snap
    now = _snapshot(model)
    return (
        all(torch.equal(state[k], now[0][k]) for k in state)
        and grads == now[1]
        and flags == now[2]
        and momenta == now[3]
    )


def _naive_loss(model, loss_fn, X, y, theta, names, *, recompute_norm=False, acc=False):
    """Load theta into a copy of the model and evaluate: the reference."""
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    offset = 0
    with torch.no_grad():
        for n in names:
            p = params[n]
            p.copy_(theta[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        if recompute_norm:
            for mod in m.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.reset_running_stats()
                    mod.momentum = None
            m.train()
            m(X)
        m.eval()
        out = m(X)
    loss = float(loss_fn(out, y))
    return (loss, float((out.argmax(1) == y).double().mean())) if acc else loss


# ------------------------------------------------------------------ directions
def test_filter_normalization_matches_each_filter(device):
    model = _bn_cnn(device)
    obj = lg.Objective(model, nn.CrossEntropyLoss(), _image_data(device))
    d = lg.random_direction(obj, "filter", seed=3)
    w, dv = obj.unflatten(obj.theta), obj.unflatten(d)
    for name in obj.names:
        if w[name].ndim >= 2:
            wf = w[name].reshape(w[name].shape[0], -1).norm(dim=1)
            df = dv[name].reshape(dv[name].shape[0], -1).norm(dim=1)
            torch.testing.assert_close(df, wf, rtol=1e-12, atol=0)
        else:  # biases and BatchNorm scale/shift: zero by default
            assert bool((dv[name] == 0).all())
    layer = obj.unflatten(lg.random_direction(obj, "layer", seed=3, one_dim="layer"))
    for name in obj.names:
        torch.testing.assert_close(
            layer[name].norm(), w[name].norm(), rtol=1e-12, atol=0
        )
    one = obj.unflatten(lg.random_direction(obj, "filter", seed=3, one_dim="filter"))
    torch.testing.assert_close(one["1.weight"].abs(), w["1.weight"].abs())


def test_directions_are_zero_mean_gaussian_before_normalization():
    model = nn.Sequential(nn.Linear(50, 40), nn.Tanh(), nn.Linear(40, 30)).double()
    obj = lg.Objective(
        model, nn.MSELoss(), (torch.randn(8, 50).double(), torch.randn(8, 30).double())
    )
    raw = lg.random_directions(obj, 4, "none", seed=0)
    d = raw.numel()
    assert abs(float(raw.mean())) < 4 / math.sqrt(d)
    assert abs(float(raw.var()) - 1.0) < 4 * math.sqrt(2 / d)
    # Filter normalization rescales by positive factors: signs stay symmetric.
    filt = lg.random_direction(obj, "filter", seed=0)
    nz = filt[filt != 0]
    assert abs(float((nz > 0).double().mean()) - 0.5) < 4 * 0.5 / math.sqrt(nz.numel())
    # Seeded: same seed same direction, different seeds differ.
    assert torch.equal(
        lg.random_direction(obj, seed=5), lg.random_direction(obj, seed=5)
    )
    assert not torch.equal(
        lg.random_direction(obj, seed=5), lg.random_direction(obj, seed=6)
    )


def test_orthogonalize_keeps_filter_norms(device):
    model = _mlp(device, d=8, h=7)
    obj = lg.Objective(model, nn.CrossEntropyLoss(), _data(device, d=8))
    u = lg.random_direction(obj, seed=0)
    v = lg.random_direction(obj, seed=1)
    w = lg.orthogonalize(obj, u, v, "filter")
    assert abs(float(u @ w)) < 1e-12 * float(u.norm() * w.norm())
    vv, ww = obj.unflatten(v), obj.unflatten(w)
    for name in obj.names:
        torch.testing.assert_close(
            ww[name].reshape(ww[name].shape[0], -1).norm(dim=1),
            vv[name].reshape(vv[name].shape[0], -1).norm(dim=1),
        )
    g = lg.orthogonalize(obj, u, v, "none")
    assert abs(float(u @ g)) < 1e-12 * float(u.norm() * g.norm())


def test_pca_directions_fit_and_residuals():
    model = _mlp("cpu")
    obj = lg.Objective(model, nn.CrossEntropyLoss(), _data("cpu"))
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(obj.dim, 2, generator=gen, dtype=DTYPE))
    coords = torch.randn(12, 2, generator=gen, dtype=DTYPE)
    traj = obj.theta + coords @ basis.T
    pca = lg.pca_directions(obj, traj, 2, center="mean")
    assert float(pca.explained_variance_ratio.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(pca.residuals.max()) < 1e-10
    # The plane is the one spanned by the basis.
    proj = pca.directions @ basis
    torch.testing.assert_close(proj @ proj.T, torch.eye(2, dtype=DTYPE))
    # Off-plane noise shows up in the residuals and the explained fraction.
    noise = 0.1 * torch.randn(12, obj.dim, generator=gen, dtype=DTYPE)
    noisy = lg.pca_directions(obj, list(traj + noise), 2)
    assert float(noisy.explained_variance_ratio.sum()) < 1.0
    assert float(noisy.residuals[:-1].min()) > 0.1  # each point off the plane
    assert float(noisy.residuals[-1]) == 0.0  # the centre (final point) is on it
    states = [obj.unflatten(t) for t in traj]
    same = lg.pca_directions(obj, states, 2, center="mean")
    torch.testing.assert_close(same.coords.abs(), pca.coords.abs())


def test_hessian_directions_are_eigenvectors():
    model = _mlp("cpu")
    obj = lg.Objective(model, nn.CrossEntropyLoss(), _data("cpu"))
    H = exact_hessian(obj)
    evals, evecs = torch.linalg.eigh(H)
    dirs = lg.hessian_directions(obj, 2, tol=1e-10)
    for i in range(2):
        assert abs(float(dirs[i] @ evecs[:, -1 - i])) == pytest.approx(1.0, abs=1e-7)


# --------------------------------------------------------------------- slices
@pytest.mark.parametrize("kind", ["mlp", "bn_cnn"])
def test_slices_equal_a_naive_copy_and_evaluate_loop(device, kind):
    if kind == "mlp":
        model, data = _mlp(device), _data(device)
    else:
        model, data = _bn_cnn(device), _image_data(device)
    loss_fn = nn.CrossEntropyLoss()
    obj = lg.Objective(model, loss_fn, data, batch_size=10)
    X, y = data
    alphas = torch.linspace(-1.0, 1.0, 5)
    s1 = lg.slice_1d(obj, "filter", alphas, n_directions=2, seed=4, chunk_size=3)
    dirs = lg.random_directions(obj, 2, "filter", seed=4)
    for i in range(2):
        for j, a in enumerate(alphas):
            loss, acc = _naive_loss(
                model, loss_fn, X, y, obj.theta + a * dirs[i], obj.names, acc=True
            )
            assert float(s1.loss[i, j]) == pytest.approx(loss, rel=1e-9, abs=1e-12)
            assert float(s1.accuracy[i, j]) == pytest.approx(acc, abs=1e-12)
    betas = torch.linspace(-0.5, 0.5, 3)
    s2 = lg.slice_2d(obj, "filter", alphas=alphas, betas=betas, seed=7)
    u = lg.random_direction(obj, seed=7)
    v = lg.orthogonalize(obj, u, lg.random_direction(obj, seed=8))
    assert abs(s2.directions["cosine"]) < 1e-12
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            ref = _naive_loss(
                model, loss_fn, X, y, obj.theta + a * u + b * v, obj.names
            )
            assert float(s2.loss[i, j]) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_slices_with_recomputed_norm_statistics_and_a_second_set(device):
    model = _bn_cnn(device)
    loss_fn = nn.CrossEntropyLoss()
    data, held = _image_data(device, seed=0), _image_data(device, seed=1)
    obj = lg.Objective(model, loss_fn, data)
    snap = _snapshot(model)
    d = lg.random_direction(obj, seed=2)
    s = lg.slice_1d(obj, d, [0.0, 0.7], recompute_norm=True, eval_data=held)
    for j, a in enumerate([0.0, 0.7]):
        theta = obj.theta + a * d
        ref = _naive_loss(model, loss_fn, *data, theta, obj.names, recompute_norm=True)
        assert float(s.loss[0, j]) == pytest.approx(ref, rel=1e-9)
        # The second set is evaluated with the statistics of the first.
        m = copy.deepcopy(model)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(theta, m.parameters())
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.reset_running_stats()
                    mod.momentum = None
            m.train()
            m(data[0])
            m.eval()
            ref_held = float(loss_fn(m(held[0]), held[1]))
        assert float(s.eval_loss[0, j]) == pytest.approx(ref_held, rel=1e-9)
    assert s.recompute_norm
    assert _same(model, snap)


def test_filter_normalized_slices_are_invariant_to_relu_rescaling():
    data = _data("cpu", n=60, d=6, k=3, seed=1)
    model = _mlp("cpu", h=8, seed=2)
    alpha = 10.0
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled[0].weight.mul_(alpha)
        scaled[0].bias.mul_(alpha)
        scaled[2].weight.div_(alpha)
    loss_fn = nn.CrossEntropyLoss()
    obj, obj_s = (lg.Objective(m, loss_fn, data) for m in (model, scaled))
    assert obj.loss() == pytest.approx(obj_s.loss(), rel=1e-12)  # same function
    grid = torch.linspace(-1, 1, 9)
    f, f_s = (
        lg.slice_1d(o, "filter", grid, n_directions=3, seed=0) for o in (obj, obj_s)
    )
    torch.testing.assert_close(f.loss, f_s.loss, rtol=1e-10, atol=1e-12)
    s2, s2_s = (lg.slice_2d(o, "filter", alphas=grid, betas=grid) for o in (obj, obj_s))
    torch.testing.assert_close(s2.loss, s2_s.loss, rtol=1e-10, atol=1e-12)
    n, n_s = (
        lg.slice_1d(o, "none", grid, n_directions=3, seed=0) for o in (obj, obj_s)
    )
    assert float((n.loss - n_s.loss).abs().max()) > 1e-2


def test_quadratic_overlay_is_the_local_model():
    model = _mlp("cpu")
    obj = lg.Objective(model, nn.CrossEntropyLoss(), _data("cpu"))
    H = exact_hessian(obj)
    g = obj.grad()
    alphas = torch.tensor([-1e-3, -5e-4, 0.0, 5e-4, 1e-3])
    s = lg.slice_1d(obj, "filter", alphas, n_directions=2, seed=1, quadratic=True)
    dirs = lg.random_directions(obj, 2, "filter", seed=1)
    torch.testing.assert_close(s.slope, dirs @ g)
    torch.testing.assert_close(s.curvature, torch.einsum("id,de,ie->i", dirs, H, dirs))
    # Third-order agreement near the centre.
    scale = float(dirs.norm(dim=1).max()) ** 3
    assert float((s.quadratic - s.loss).abs().max()) < 10 * scale * 1e-9
    stats = s.statistics()
    assert stats["total_variation"] > 0 and stats["n_directions"] == 2


def test_statistics_tell_a_rugged_slice_from_a_smooth_one():
    alphas = torch.linspace(-1, 1, 101, dtype=DTYPE)
    smooth = alphas**2
    rugged = alphas**2 + 0.05 * torch.sin(40 * alphas)
    s = lg.SliceResult(alphas=alphas, loss=torch.stack([smooth, smooth]))
    r = lg.SliceResult(alphas=alphas, loss=torch.stack([rugged, rugged]))
    a, b = s.statistics(), r.statistics()
    assert a["excess_variation"] == pytest.approx(0.0, abs=1e-12)
    assert b["excess_variation"] > 0.5
    assert b["second_difference_energy"] > 100 * a["second_difference_energy"]
    lo, hi = s.band()
    torch.testing.assert_close(lo, smooth)


def test_ray_curvature_matches_exact_directional_curvature():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    obj = lg.Objective(model, nn.CrossEntropyLoss(), _data("cpu"))
    rc = lg.ray_curvature(obj, 32, step=1e-3, seed=0)
    torch.testing.assert_close(rc.fd, rc.exact, rtol=1e-4, atol=1e-6)
    assert rc.relative_difference < 1e-3
    # An indefinite quadratic: negative fraction is about the right share.
    A = torch.diag(torch.tensor([1.0, -1.0, 2.0, -2.0], dtype=DTYPE))
    quad = nn.Linear(4, 1, bias=False).double()

    class Quad(nn.Module):
        def __init__(self):
            super().__init__()
            self.x = nn.Parameter(torch.zeros(4, dtype=DTYPE))

        def forward(self, inp):
            return (0.5 * self.x @ A @ self.x).expand(inp.shape[0])

    del quad
    qobj = lg.Objective(
        Quad(), lambda out, y: out.mean(), (torch.zeros(2, 1), torch.zeros(2))
    )
    rq = lg.ray_curvature(qobj, 400, normalization="none", step=0.1, seed=0)
    torch.testing.assert_close(rq.fd, rq.exact, rtol=1e-9, atol=1e-9)
    assert 0.35 < rq.negative_fraction < 0.65
    assert abs(rq.mean) < 4 * rq.stderr + 1e-12  # E[d.Ad] = tr A = 0


# ---------------------------------------------------------------------- paths
def test_interpolate_barrier_and_norm_statistics(device):
    model_a, model_b = _bn_cnn(device, seed=0), _bn_cnn(device, seed=1)
    loss_fn = nn.CrossEntropyLoss()
    data = _image_data(device)
    obj = lg.Objective(model_a, loss_fn, data)
    snaps = _snapshot(model_a), _snapshot(model_b)
    theta_b = obj.flatten(dict(model_b.named_parameters()))
    path = lg.interpolate(obj, obj.theta, theta_b, n_points=5)
    assert path.recompute_norm  # default for BatchNorm models
    for t, loss in zip(path.ts, path.loss, strict=True):
        theta = torch.lerp(obj.theta, theta_b, t.to(device))
        ref = _naive_loss(
            model_a, loss_fn, *data, theta, obj.names, recompute_norm=True
        )
        assert float(loss) == pytest.approx(ref, rel=1e-9)
    line = (1 - path.ts) * path.loss[0] + path.ts * path.loss[-1]
    assert path.barrier == pytest.approx(float((path.loss - line).max()))
    plain = lg.interpolate(obj, obj.theta, theta_b, n_points=5, recompute_norm=False)
    assert not plain.recompute_norm
    assert _same(model_a, snaps[0]) and _same(model_b, snaps[1])


def test_a_convex_path_has_no_barrier_and_a_double_well_has_one():
    model, loss_fn, data = lg.zoo.surface("double_well")
    obj = lg.Objective(model, loss_fn, data)
    flat = lg.interpolate(obj, obj.theta, obj.theta, n_points=3)
    assert flat.barrier == pytest.approx(0.0, abs=1e-12)
    assert "Frankle" in flat.definition


def test_results_save_and_load(tmp_path):
    model = _mlp("cpu")
    obj = lg.Objective(model, nn.CrossEntropyLoss(), _data("cpu"))
    s = lg.slice_1d(obj, "filter", [-1.0, 0.0, 1.0], n_directions=2, quadratic=True)
    s.save(tmp_path / "s1")
    back = lg.load_result(tmp_path / "s1")
    assert isinstance(back, lg.SliceResult)
    torch.testing.assert_close(back.loss, s.loss)
    assert back.directions == s.directions
    p = lg.interpolate(obj, obj.theta, torch.zeros_like(obj.theta), n_points=4)
    back = lg.load_result(p.save(tmp_path / "p"))
    assert back.barrier == p.barrier and back.accuracy_barrier == p.accuracy_barrier
    s2 = lg.slice_2d(obj, alphas=[0.0, 1.0], betas=[0.0])
    torch.testing.assert_close(lg.load_result(s2.save(tmp_path / "s2")).loss, s2.loss)
    with pytest.raises(FileNotFoundError, match="result.json"):
        lg.load_result(tmp_path / "nothing")
    with pytest.raises(TypeError, match="expected a lossgeom result"):
        lg.save_result(object(), tmp_path / "x")


def test_the_users_model_is_never_changed():
    model = _bn_cnn("cpu")
    model.train()
    model[0].weight.requires_grad_(False)
    snap = _snapshot(model)
    obj = lg.Objective(model, nn.CrossEntropyLoss(), _image_data("cpu"))
    d = lg.random_direction(obj)
    lg.slice_1d(obj, d, [0.0, 1.0], recompute_norm=True, quadratic=True)
    lg.slice_2d(obj, alphas=[0.0, 1.0], betas=[1.0], recompute_norm=True)
    lg.interpolate(obj, obj.theta, obj.theta + d, n_points=3)
    lg.ray_curvature(obj, 3)
    obj.norm_statistics(obj.theta + d)
    assert _same(model, snap)


def test_bad_input_is_a_clear_error():
    model = _mlp("cpu")
    obj = lg.Objective(model, nn.CrossEntropyLoss(), _data("cpu"))
    other = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3)).double()
    theta_other = torch.nn.utils.parameters_to_vector(other.parameters()).detach()
    with pytest.raises(ValueError, match=rf"shape \({obj.dim},\)"):
        lg.interpolate(obj, obj.theta, theta_other)
    with pytest.raises(ValueError, match="direction"):
        lg.slice_1d(obj, torch.zeros(obj.dim + 1, dtype=DTYPE))
    with pytest.raises(ValueError, match="no points"):
        lg.slice_1d(obj, "filter", [])
    with pytest.raises(ValueError, match="no points"):
        lg.slice_2d(obj, alphas=[0.0], betas=[])
    with pytest.raises(ValueError, match="normalization"):
        lg.random_direction(obj, "filters")
    with pytest.raises(ValueError, match="n_points"):
        lg.interpolate(obj, obj.theta, obj.theta, n_points=1)
    with pytest.raises(ValueError, match="d2 is missing"):
        lg.slice_2d(obj, lg.random_direction(obj))
    with pytest.raises(ValueError, match="NaN"):
        lg.slice_1d(obj, torch.full((obj.dim,), math.nan, dtype=DTYPE))
    with pytest.raises(ValueError, match="parameters"):
        lg.interpolate(
            obj,
            obj.theta,
            obj.theta,
            eval_data=lg.Objective(other, nn.CrossEntropyLoss(), _data("cpu")),
        )


# ------------------------------------------------------ review regressions
def test_one_point_at_a_time_sees_the_current_model():
    model = _bn_cnn("cpu")
    obj = lg.Objective(model, nn.CrossEntropyLoss(), _image_data("cpu"))
    pts = obj.theta.expand(3, -1)
    before = obj.evaluate(pts, chunk_size=1)
    torch.testing.assert_close(before, obj.evaluate(pts, chunk_size=None))
    # Change what a cached copy would miss: a forward hook and an attribute.
    handle = model[4].register_forward_hook(lambda m, i, o: o * 2.0)
    try:
        now = obj.evaluate(pts, chunk_size=1)
        torch.testing.assert_close(now, obj.evaluate(pts, chunk_size=None))
        assert not torch.allclose(now, before)
    finally:
        handle.remove()
    # Further training of the model: obj.theta follows, both paths agree.
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    pts = obj.theta.expand(2, -1)
    torch.testing.assert_close(
        obj.evaluate(pts, chunk_size=1), obj.evaluate(pts, chunk_size=None)
    )


def test_instance_norm_is_not_recomputed_as_if_it_were_batch_norm():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.InstanceNorm2d(3, track_running_stats=True),
        nn.Flatten(),
        nn.Linear(48, 3),
    ).double()
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 1, 4, 4, dtype=DTYPE) + 2.0)
    model.eval()
    obj = lg.Objective(model, nn.CrossEntropyLoss(), _image_data("cpu"))
    assert not obj.has_norm_statistics and obj.norm_statistics() == {}
    path = lg.interpolate(obj, obj.theta, obj.theta, n_points=3)
    assert not path.recompute_norm
    torch.testing.assert_close(path.loss, torch.full((3,), obj.loss(), dtype=DTYPE))


def test_accuracy_is_nan_where_the_loss_is():
    class Blows(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3).double()

        def forward(self, x):
            out = self.lin(x)
            return torch.where(self.lin.weight[0, 0] > 5, out * math.nan, out)

    obj = lg.Objective(Blows(), nn.CrossEntropyLoss(), _data("cpu"))
    d = torch.zeros(obj.dim, dtype=DTYPE)
    d[0] = 1.0
    s = lg.slice_1d(obj, d, [0.0, 100.0])
    assert math.isfinite(float(s.loss[0, 0])) and math.isnan(float(s.loss[0, 1]))
    assert math.isnan(float(s.accuracy[0, 1]))
    p = lg.interpolate(obj, obj.theta, obj.theta + 100 * d, n_points=3)
    assert math.isnan(p.barrier) and math.isnan(p.accuracy_barrier)


def test_orthogonalize_handles_one_entry_and_parallel_filters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    X = torch.randn(20, 1, dtype=DTYPE)
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, torch.randint(0, 3, (20,))))
    s2 = lg.slice_2d(obj, "filter", alphas=[0.0], betas=[0.0])
    assert abs(s2.directions["cosine"]) < 1e-10
    u = lg.random_direction(obj, seed=0)
    # Blocks parallel to d1's, but not the whole vector: orthogonal anyway.
    v = lg.random_direction(obj, seed=1)
    first = obj.unflatten(v)["0.weight"]
    first.copy_(0.7 * obj.unflatten(u)["0.weight"])
    for norm in ("filter", "layer", "none"):
        w = lg.orthogonalize(obj, u, v, norm)
        assert abs(float(u @ w)) <= 1e-10 * float(u.norm() * w.norm()), norm
    with pytest.raises(ValueError, match="parallel"):
        lg.orthogonalize(obj, u, 3.0 * u, "filter")


def test_quadratic_overlay_uses_the_slices_statistics():
    model = _bn_cnn("cpu")
    obj = lg.Objective(model, nn.CrossEntropyLoss(), _image_data("cpu"))
    s = lg.slice_1d(obj, "filter", [0.0], quadratic=True, recompute_norm=True)
    assert float(s.quadratic[0, 0]) == pytest.approx(float(s.loss[0, 0]), rel=1e-10)


def test_pca_refuses_more_directions_than_differences():
    model = _mlp("cpu")
    obj = lg.Objective(model, nn.CrossEntropyLoss(), _data("cpu"))
    traj = obj.theta + torch.randn(4, obj.dim, dtype=DTYPE)
    for center in ("final", "mean"):
        assert lg.pca_directions(obj, traj, 3, center=center).directions.shape[0] == 3
        with pytest.raises(ValueError, match=r"\(3\)"):
            lg.pca_directions(obj, traj, 4, center=center)


def test_statistics_do_not_depend_on_the_grid_direction():
    a = torch.linspace(-1, 1, 21, dtype=DTYPE)
    loss = torch.stack([a**2 + 0.1 * torch.sin(9 * a)])
    up = lg.SliceResult(alphas=a, loss=loss).statistics()
    down = lg.SliceResult(alphas=a.flip(0), loss=loss.flip(1)).statistics()
    assert up["second_difference_energy"] > 0
    assert down["second_difference_energy"] == pytest.approx(
        up["second_difference_energy"]
    )
    uneven = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=DTYPE)
    with pytest.raises(ValueError, match="evenly spaced"):
        lg.SliceResult(alphas=uneven, loss=uneven[None] ** 2).statistics()
