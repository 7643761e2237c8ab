"""Objective: loss, gradient, HVP, evaluate, data forms, and leaving the model alone."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lossgeom as lg
from lossgeom.testing import exact_gradient, exact_hessian, exact_loss

from cases import CASES, DTYPE, SmallCNN, rel_err

MLP, CNN = CASES[0], CASES[1]


def test_loss_and_grad_match_references(case, device):
    model, loss_fn, X, y = case.make(device)
    obj = lg.Objective(model, loss_fn, (X, y), batch_size=case.batch_size)
    whole = lg.Objective(model, loss_fn, (X, y))
    assert abs(obj.loss() - exact_loss(obj)) <= 1e-12 * max(1, abs(exact_loss(obj)))
    assert abs(obj.loss() - whole.loss()) <= 1e-12
    assert rel_err(obj.grad(), exact_gradient(obj)) <= 1e-10
    assert rel_err(obj.grad(), whole.grad()) <= 1e-10
    # the uneven last batch is weighted by its size: a plain mean of batch losses
    # would differ
    if case.batch_size is not None and X.shape[0] % case.batch_size:
        naive = sum(obj.batch_loss(obj.theta, x, t).item() for x, t in obj.batches())
        naive /= -(-X.shape[0] // case.batch_size)
        assert abs(naive - whole.loss()) > 1e-8


def _data_forms(X, y, batch_size):
    ds = TensorDataset(X, y)
    return {
        "tensors": (X, y),
        "dataset": ds,
        "dataloader": DataLoader(ds, batch_size=batch_size, shuffle=False),
        "list_of_batches": [
            (X[i : i + batch_size], y[i : i + batch_size])
            for i in range(0, len(X), batch_size)
        ],
    }


@pytest.mark.parametrize(
    "form", ["tensors", "dataset", "dataloader", "list_of_batches"]
)
def test_every_data_form_gives_the_same_function(form):
    model, loss_fn, X, y = CNN.make()
    ref = lg.Objective(model, loss_fn, (X, y))
    obj = lg.Objective(model, loss_fn, _data_forms(X, y, 4)[form], batch_size=3)
    V = torch.randn(obj.dim, 2, dtype=DTYPE)
    assert obj.n_samples == X.shape[0]
    assert abs(obj.loss() - ref.loss()) <= 1e-12
    assert rel_err(obj.grad(), ref.grad()) <= 1e-12
    assert rel_err(obj.hvp(V), ref.hvp(V)) <= 1e-10


def test_shuffled_dataloader_still_gives_the_full_data_mean():
    model, loss_fn, X, y = MLP.make()
    loader = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=True)
    obj = lg.Objective(model, loss_fn, loader)
    ref = lg.Objective(model, loss_fn, (X, y))
    assert abs(obj.loss() - ref.loss()) <= 1e-12
    assert rel_err(obj.grad(), ref.grad()) <= 1e-12


def test_max_samples_is_a_fixed_seeded_subset():
    model, loss_fn, X, y = MLP.make()
    a = lg.Objective(model, loss_fn, (X, y), max_samples=10, seed=3)
    b = lg.Objective(model, loss_fn, TensorDataset(X, y), max_samples=10, seed=3)
    c = lg.Objective(model, loss_fn, (X, y), max_samples=10, seed=4)
    assert a.n_samples == 10
    assert a.loss() == a.loss()
    assert abs(a.loss() - b.loss()) <= 1e-12
    assert abs(a.loss() - c.loss()) > 1e-6
    idx = (
        torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(3))[:10]
        .sort()
        .values
    )
    explicit = lg.Objective(model, loss_fn, (X[idx], y[idx]))
    assert abs(a.loss() - explicit.loss()) <= 1e-12
    # more than available: all samples
    assert (
        lg.Objective(model, loss_fn, (X, y), max_samples=1000).n_samples == X.shape[0]
    )


def test_max_samples_on_a_loader_takes_the_first_samples_once():
    model, loss_fn, X, y = MLP.make()
    loader = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=True)
    obj = lg.Objective(model, loss_fn, loader, max_samples=9)
    first = obj.loss()
    assert obj.n_samples == 9
    assert all(obj.loss() == first for _ in range(3))  # cached: same subset every pass


def _snapshot(model):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: b.clone() for n, b in model.named_buffers()},
        {n: m.training for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def _assert_unchanged(model, snap):
    params, buffers, flags, req = _snapshot(model)
    for n, p in snap[0].items():
        assert torch.equal(params[n], p), n
    for n, b in snap[1].items():
        assert torch.equal(buffers[n], b), n
    assert flags == snap[2]
    assert req == snap[3]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_probes_never_change_the_model(mode):
    model, loss_fn, X, y = CNN.make()
    model.train()
    model.bn2.eval()  # a mixed set of flags must come back exactly
    snap = _snapshot(model)
    obj = lg.Objective(model, loss_fn, (X, y), batch_size=5, mode=mode)
    obj.loss()
    obj.grad()
    obj.hvp(torch.randn(obj.dim, 2, dtype=DTYPE))
    obj.evaluate(obj.theta + torch.randn(3, obj.dim, dtype=DTYPE))
    lg.ggn(obj) @ torch.randn(obj.dim, dtype=DTYPE)
    if mode == "eval":
        lg.gradient_covariance(obj) @ torch.randn(obj.dim, dtype=DTYPE)
    _assert_unchanged(model, snap)
    assert obj.info()["mode"] == mode


def test_train_mode_uses_batch_statistics():
    model, loss_fn, X, y = CNN.make()
    ev = lg.Objective(model, loss_fn, (X, y), mode="eval")
    tr = lg.Objective(model, loss_fn, (X, y), mode="train")
    assert abs(ev.loss() - tr.loss()) > 1e-6
    model.train()
    with torch.no_grad():
        expected = loss_fn(copy.deepcopy(model)(X), y).item()
    assert abs(tr.loss() - expected) <= 1e-12
    V = torch.randn(tr.dim, 2, dtype=DTYPE)
    assert rel_err(tr.hvp(V), exact_hessian(tr) @ V) <= 1e-10


def test_gradient_covariance_refuses_train_mode():
    model, loss_fn, X, y = CNN.make()
    obj = lg.Objective(model, loss_fn, (X, y), mode="train")
    with pytest.raises(ValueError, match="mode='eval'"):
        lg.gradient_covariance(obj)


def test_float64_copy_leaves_the_float32_model_alone():
    torch.manual_seed(0)
    model = SmallCNN()
    X, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    snap = _snapshot(model)
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y), dtype=torch.float64)
    assert (
        obj.copied and obj.dtype == torch.float64 and obj.theta.dtype == torch.float64
    )
    assert next(model.parameters()).dtype == torch.float32
    obj.hvp(torch.randn(obj.dim, dtype=torch.float64))
    _assert_unchanged(model, snap)
    f32 = lg.Objective(model, nn.CrossEntropyLoss(), (X, y))
    assert abs(obj.loss() - f32.loss()) < 1e-5


def test_theta_tracks_the_live_model_and_unflattens():
    model, loss_fn, X, y = MLP.make()
    obj = lg.Objective(model, loss_fn, (X, y))
    before = obj.theta
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(obj.theta, before)
    parts = obj.unflatten(obj.theta)
    assert list(parts) == obj.names
    assert torch.equal(parts["0.weight"], model[0].weight.detach())
    assert torch.equal(obj.flatten(parts), obj.theta)


def test_frozen_parameters_are_not_coordinates():
    model, loss_fn, X, y = MLP.make()
    model[0].weight.requires_grad_(False)
    obj = lg.Objective(model, loss_fn, (X, y))
    assert "0.weight" not in obj.names
    assert obj.dim == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rel_err(lg.hessian(obj).to_dense(), exact_hessian(obj)) <= 1e-10


def test_evaluate_matches_loss_at_each_point(case):
    model, loss_fn, X, y = case.make()
    obj = lg.Objective(model, loss_fn, (X, y), batch_size=case.batch_size)
    P = obj.theta + 0.3 * torch.randn(7, obj.dim, dtype=DTYPE)
    expected = torch.tensor([exact_loss(obj, p) for p in P], dtype=DTYPE)
    for chunk in (None, 3):
        assert rel_err(obj.evaluate(P, chunk_size=chunk), expected) <= 1e-12
    assert obj.counters.loss == 14


def test_counters_count_vectors_and_passes():
    model, loss_fn, X, y = MLP.make()
    obj = lg.Objective(model, loss_fn, (X, y), batch_size=10)
    obj.loss()
    obj.grad()
    obj.hvp(torch.randn(obj.dim, 5, dtype=DTYPE))
    obj.hvp(torch.randn(obj.dim, dtype=DTYPE))
    c = obj.counters.to_dict()
    assert c["loss"] == 2 and c["grad"] == 1 and c["hvp"] == 6 and c["passes"] == 4
    obj.counters.reset()
    assert sum(obj.counters.to_dict().values()) == 0


class _NoJvpTanh(torch.autograd.Function):
    """tanh with a twice-differentiable backward but no forward-mode rule."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        return g * (1 - t * t)


class _TanhBackward(torch.autograd.Function):
    """g * (1 - t^2) with a forward-mode rule but no backward (no double backward)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g, t):
        return g * (1 - t * t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, t = inputs
        ctx.save_for_forward(g, t)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("double backward is not implemented for this tanh")

    @staticmethod
    def jvp(ctx, dg, dt):
        g, t = ctx.saved_tensors
        return dg * (1 - t * t) - 2 * g * t * dt


class _NoDoubleBackwardTanh(torch.autograd.Function):
    """tanh whose backward cannot be differentiated again, but has a forward rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        return _TanhBackward.apply(g, t)

    @staticmethod
    def jvp(ctx, dx):
        (t,) = ctx.saved_tensors
        return dx * (1 - t * t)


class _Net(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        self.act = act

    def forward(self, x):
        return self.b(self.act.apply(self.a(x)))


def _fd_hvp(obj, V, eps=1e-6):
    return torch.stack(
        [
            (obj.grad(obj.theta + eps * v) - obj.grad(obj.theta - eps * v)) / (2 * eps)
            for v in V.T
        ],
        1,
    )


@pytest.mark.parametrize(
    "act, works, fails",
    [
        (_NoJvpTanh, "double-backward", "forward-over-reverse"),
        (_NoDoubleBackwardTanh, "forward-over-reverse", "double-backward"),
    ],
    ids=["no-forward-mode", "no-double-backward"],
)
def test_auto_backend_falls_back_and_says_so(act, works, fails):
    torch.manual_seed(0)
    model = _Net(act).double()
    X, y = torch.randn(12, 3, dtype=DTYPE), torch.randint(0, 2, (12,))
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=DTYPE)
    broken = lg.Objective(model, nn.CrossEntropyLoss(), (X, y), hvp_backend=fails)
    with pytest.raises((RuntimeError, NotImplementedError)):
        broken.hvp(V)
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y))
    first = "double-backward" if obj.device.type == "cpu" else "forward-over-reverse"
    if first == fails:
        with pytest.warns(RuntimeWarning, match=f"{fails} HVP failed, using {works}"):
            HV = obj.hvp(V)
        assert obj.hvp_fallback_reason
    else:
        HV = obj.hvp(V)
    assert obj.hvp_backend_used == works
    assert obj.info()["hvp_backend"] == works
    # the dense references need both modes; check against finite differences
    assert rel_err(HV, _fd_hvp(obj, V)) <= 1e-7
    H = lg.hessian(obj)
    assert rel_err(H @ V, HV) <= 1e-12
    op = lg.ggn(obj)
    op @ V
    assert op.backend_used in ("forward-over-reverse", "double-backward")


def test_auto_backend_prefers_the_faster_one_per_device(case):
    model, loss_fn, X, y = case.make()
    obj = lg.Objective(model, loss_fn, (X, y))
    obj.hvp(torch.randn(obj.dim, dtype=DTYPE))
    # measured in benchmarks/hvp.py: double backward is faster on CPU
    assert obj.hvp_backend_used == "double-backward"


def test_hessian_operator_keeps_the_graph_and_matches(case):
    model, loss_fn, X, y = case.make()
    obj = lg.Objective(model, loss_fn, (X, y), batch_size=case.batch_size)
    H = lg.hessian(obj)
    V = torch.randn(obj.dim, 3, dtype=DTYPE)
    HV = H @ V
    assert H.cached and H.cache_nbytes > 0
    assert H.backend_used == "double-backward (kept graph)"
    passes = obj.counters.passes
    assert rel_err(H @ V, HV) <= 1e-13
    assert obj.counters.passes == passes  # no data pass for kept graphs
    assert rel_err(HV, exact_hessian(obj) @ V) <= 1e-10
    tiny = lg.hessian(obj, cache_bytes=16)
    assert rel_err(tiny @ V, HV) <= 1e-12 and tiny.cached is False
    loader = lg.Objective(model, loss_fn, DataLoader(TensorDataset(X, y), batch_size=4))
    assert lg.hessian(loader).cached is False  # batch order of a loader is not fixed


def test_float32_model_gives_float32_results_close_to_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    X, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    f32 = lg.Objective(model, nn.CrossEntropyLoss(), (X, y))
    f64 = lg.Objective(model, nn.CrossEntropyLoss(), (X, y), dtype=torch.float64)
    v = torch.randn(f32.dim)
    hv32 = f32.hvp(v)
    assert hv32.dtype == torch.float32
    assert rel_err(hv32.double(), f64.hvp(v.double())) <= 1e-5


def test_evaluate_returns_non_finite_values_instead_of_raising():
    model, loss_fn, X, y = MLP.make()
    obj = lg.Objective(model, loss_fn, (X, y), batch_size=10)
    P = obj.theta.repeat(2, 1)
    P[1, 0] = float("nan")
    out = obj.evaluate(P)
    assert torch.isfinite(out[0]) and torch.isnan(out[1])
    with pytest.raises(lg.NonFiniteError):
        obj.loss(P[1])
