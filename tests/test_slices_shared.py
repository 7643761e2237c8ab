"""Slices with the first layer's work shared across points: exact, or not taken.

The shared path (``lossgeom.geometry._shared_layer``) must give the numbers of
plain point-by-point evaluation (``Objective.evaluate_metrics``) to float64
rounding, on every model it accepts; every model it refuses must go point by
point and give the same numbers too. ``EVALUATION_PATHS`` says which path ran,
so a test of the fast path fails if the fast path silently stopped being taken.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lossgeom as lg
from lossgeom.geometry._evaluation import EVALUATION_PATHS, evaluate_points
from lossgeom.geometry._shared_layer import evaluate_shared, split_first_layer
from lossgeom.objective._fold_norm import FOLDED

from cases import CASE_IDS, CASES

DTYPE = torch.float64
# Inputs of the first layers below: enough for sharing to be taken on a plane
# (fan-in >= 16 (k + 1), see lossgeom.geometry._evaluation._shared_split).
IN = 64
ALPHAS = torch.linspace(-1.0, 1.0, 5, dtype=DTYPE)
BETAS = torch.linspace(-0.75, 0.5, 4, dtype=DTYPE)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _labels(n, k=4, seed=1):
    return torch.randint(0, k, (n,), generator=_gen(seed))


def _plane(obj, seed=0):
    """Two filter-normalized directions with nonzero biases (one_dim="filter")."""
    u = lg.random_direction(obj, "filter", seed=seed, one_dim="filter")
    v = lg.random_direction(obj, "filter", seed=seed + 1, one_dim="filter")
    return u, v


def _plain(obj, u, v, alphas=ALPHAS, betas=BETAS, center=None):
    """The plain per-point evaluation of the plane's grid, shaped like a Surface."""
    center = obj.theta if center is None else center
    coefs = torch.cartesian_prod(alphas, betas)
    points = center + coefs @ torch.stack([u, v])
    values = obj.evaluate_metrics(points, chunk_size=None)
    return {k: val.reshape(len(alphas), len(betas)) for k, val in values.items()}


def _assert_same(surface, ref, prefix=""):
    torch.testing.assert_close(
        getattr(surface, prefix + "loss"), ref["loss"], rtol=1e-12, atol=1e-12
    )
    if "accuracy" in ref:
        torch.testing.assert_close(
            getattr(surface, prefix + "accuracy"), ref["accuracy"], rtol=0, atol=1e-12
        )
    else:
        assert getattr(surface, prefix + "accuracy") is None


def _paths(fn):
    """Run ``fn`` and return ``(its result, the evaluation paths it took)``."""
    EVALUATION_PATHS.clear()
    out = fn()
    return out, dict(EVALUATION_PATHS)


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [
            (m.training, [p.requires_grad for p in m.parameters(recurse=False)])
            for m in model.modules()
        ],
    )


def _unchanged(model, snap):
    state, flags = snap
    now = model.state_dict()
    same = all(torch.equal(now[k], v) for k, v in state.items())
    return same and flags == [
        (m.training, [p.requires_grad for p in m.parameters(recurse=False)])
        for m in model.modules()
    ]


# ------------------------------------------------------------ supported models
class ConvFirst1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(13, 3, 5, padding=2, padding_mode="circular")
        self.fc = nn.Linear(3 * 7, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class ConvBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 4, 3, padding=1)  # fan-in 72
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.tanh(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


def _tanh_mlp():
    return nn.Sequential(
        nn.Linear(IN, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)
    )


def _relu_mlp_no_bias():
    return nn.Sequential(
        nn.Linear(IN, 9, bias=False), nn.ReLU(), nn.Linear(9, 4, bias=False)
    )


def _flatten_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(IN, 7), nn.ReLU(), nn.Linear(7, 4))


def _view_mlp():
    class ViewFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(IN, 7), nn.Linear(7, 4)

        def forward(self, x):
            return self.out(torch.tanh(self.inp(x.reshape(-1, IN))))

    return ViewFirst()


def _cnn_batchnorm():
    model = ConvBatchNorm()  # BatchNorm with running statistics after the conv
    gen = _gen(3)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.copy_(0.3 * torch.randn(bn.num_features, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=gen))
    return model


SUPPORTED = {
    "tanh_mlp": (_tanh_mlp, (IN,)),
    "relu_mlp_no_bias": (_relu_mlp_no_bias, (IN,)),
    "flatten_first": (_flatten_mlp, (4, 16)),
    "reshape_first": (_view_mlp, (4, 16)),
    "conv2d_batchnorm": (_cnn_batchnorm, (8, 6, 6)),
    "conv1d_circular": (ConvFirst1d, (13, 7)),
}


def _objective(name, n=23, batch_size=10, seed=0, loss_fn=None, **kw):
    build, shape = SUPPORTED[name]
    torch.manual_seed(seed)
    model = build().to(DTYPE).eval()
    X = torch.randn(n, *shape, generator=_gen(seed), dtype=DTYPE)
    k = 3 if name == "conv2d_batchnorm" else 4
    loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    data = (X, _labels(n, k, seed + 1))
    return lg.Objective(model, loss_fn, data, batch_size=batch_size, **kw), data


@pytest.mark.parametrize("name", list(SUPPORTED))
@pytest.mark.parametrize("chunk_size", ["auto", 1, 4, None])
def test_shared_path_equals_plain_evaluation(name, chunk_size):
    obj, _ = _objective(name)
    snap = _snapshot(obj.model)
    u, v = _plane(obj)
    before = obj.counters.to_dict()
    FOLDED.clear()
    s, paths = _paths(
        lambda: lg.slice_2d(obj, u, v, ALPHAS, BETAS, chunk_size=chunk_size)
    )
    assert paths == {"shared_first_layer": 1}
    if name == "conv2d_batchnorm" and chunk_size in ("auto", 1):
        # point by point through the tail: its conv2 -> bn2 folded, once
        assert FOLDED == {"folded": 1}
    after = obj.counters.to_dict()
    assert after["loss"] - before["loss"] == ALPHAS.numel() * BETAS.numel()
    assert after["passes"] - before["passes"] == 1  # one pass over the data
    _assert_same(s, _plain(obj, u, v))
    assert s.accuracy is not None and 0 < float(s.accuracy.max()) <= 1
    assert _unchanged(obj.model, snap)


@pytest.mark.parametrize("name", ["tanh_mlp", "conv2d_batchnorm"])
def test_shared_path_on_a_second_set_and_far_from_the_centre(name):
    obj, _ = _objective(name)
    _, held = _objective(name, n=17, seed=5)
    u, v = _plane(obj, seed=3)
    center = obj.theta + 0.3 * u
    s, paths = _paths(
        lambda: lg.slice_2d(obj, u, v, 4 * ALPHAS, BETAS, theta=center, eval_data=held)
    )
    assert paths == {"shared_first_layer": 2}
    _assert_same(s, _plain(obj, u, v, 4 * ALPHAS, BETAS, center))
    held_obj = lg.Objective(obj.model, nn.CrossEntropyLoss(), held)
    _assert_same(s, _plain(held_obj, u, v, 4 * ALPHAS, BETAS, center), "eval_")


def test_one_dimensional_slices_and_several_directions_share_too():
    obj, _ = _objective("tanh_mlp")
    dirs = lg.random_directions(obj, 3, "filter", seed=2, one_dim="layer")
    s, paths = _paths(lambda: lg.slice_1d(obj, dirs, ALPHAS))
    assert paths == {"shared_first_layer": 1}  # 16 (3 + 1) <= 64 inputs
    coefs = torch.kron(torch.eye(3, dtype=DTYPE), ALPHAS[:, None])
    ref = obj.evaluate_metrics(obj.theta + coefs @ dirs, chunk_size=None)
    torch.testing.assert_close(s.loss.flatten(), ref["loss"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.accuracy.flatten(), ref["accuracy"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(reduction="sum"),
        nn.CrossEntropyLoss(
            weight=torch.tensor([0.5, 2.0, 1.0, 0.25], dtype=DTYPE),
            ignore_index=2,
            label_smoothing=0.1,
        ),
        nn.NLLLoss(),
        "mse",
        "custom",
    ],
    ids=["ce_sum", "ce_weight_ignore_smooth", "nll", "mse", "custom_mean"],
)
def test_every_loss_gives_the_plain_numbers(loss_fn):
    if loss_fn == "mse":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(IN, 8), nn.Tanh(), nn.Linear(8, 2)).to(DTYPE)
        X = torch.randn(23, IN, generator=_gen(0), dtype=DTYPE)
        y = torch.randn(23, 2, generator=_gen(1), dtype=DTYPE)
        obj = lg.Objective(model, nn.MSELoss(), (X, y), batch_size=10)
    elif loss_fn == "custom":
        obj, _ = _objective(
            "tanh_mlp",
            loss_fn=lambda out, y: (out.logsumexp(1) - out[:, 0]).mean(),
        )
    elif isinstance(loss_fn, nn.NLLLoss):
        _, data = _objective("tanh_mlp")
        torch.manual_seed(0)
        model = nn.Sequential(_tanh_mlp(), nn.LogSoftmax(dim=1)).to(DTYPE)
        obj = lg.Objective(model, loss_fn, data, batch_size=10)
    else:
        obj, _ = _objective("tanh_mlp", loss_fn=loss_fn)
    u, v = _plane(obj)
    for chunk_size in (1, 3):
        s, paths = _paths(
            lambda cs=chunk_size: lg.slice_2d(obj, u, v, ALPHAS, BETAS, chunk_size=cs)
        )
        assert paths == {"shared_first_layer": 1}
        _assert_same(s, _plain(obj, u, v))


def test_frozen_first_layer_parameters_stay_at_the_centre():
    obj_all, data = _objective("tanh_mlp")
    model = copy.deepcopy(obj_all.model)
    model[0].bias.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    obj = lg.Objective(model, nn.CrossEntropyLoss(), data, batch_size=10)
    assert "0.bias" not in obj.names
    u, v = _plane(obj)
    s, paths = _paths(lambda: lg.slice_2d(obj, u, v, ALPHAS, BETAS))
    assert paths == {"shared_first_layer": 1}
    _assert_same(s, _plain(obj, u, v))


def test_non_finite_points_match_the_plain_path():
    obj, _ = _objective("relu_mlp_no_bias")
    u, v = _plane(obj)
    alphas = torch.tensor([0.0, 1e200, -1e300], dtype=DTYPE)
    s, paths = _paths(lambda: lg.slice_2d(obj, u, v, alphas, BETAS))
    assert paths == {"shared_first_layer": 1}
    ref = _plain(obj, u, v, alphas)
    assert bool(torch.isfinite(s.loss[0]).all())
    assert not bool(torch.isfinite(s.loss[2]).all())
    torch.testing.assert_close(
        s.loss, ref["loss"], rtol=1e-12, atol=1e-12, equal_nan=True
    )
    torch.testing.assert_close(s.accuracy, ref["accuracy"], equal_nan=True)
    assert torch.equal(torch.isnan(s.accuracy), ~torch.isfinite(s.loss))


# ----------------------------------------------------------------- fallbacks
class InputTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(IN, 4)

    def forward(self, x):
        return self.lin(x) + x[:, :4]


class FirstWeightInTail(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(IN, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x))) * self.lin.weight[0, 0]


class TiedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(IN, IN), nn.Linear(IN, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(IN, 6), nn.Linear(6, 4)

    def forward(self, x):
        h = self.lin(x)
        if x.shape[0] > 5:  # a trace cannot follow a branch on sizes
            h = -h
        return self.out(torch.tanh(h))


class TracesDifferently(nn.Module):
    """A branch a trace takes differently from a real call (inputs are proxies)."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(IN, 6), nn.Linear(6, 4)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        scale = 1.0 if isinstance(x, torch.Tensor) else 3.0
        return self.out(h) * scale


FALLBACKS = {
    "input_used_twice": (InputTwice, "more than one operation"),
    "first_weight_in_tail": (FirstWeightInTail, "shared with the first layer"),
    "branch_on_values": (DataDependent, "cannot be traced"),
    "trace_differs": (TracesDifferently, "does not reproduce"),
    "norm_first": (
        lambda: nn.Sequential(nn.LayerNorm(IN), nn.Linear(IN, 4)),
        "the inputs first reach",
    ),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_models_that_do_not_split_go_point_by_point(name):
    build, reason = FALLBACKS[name]
    torch.manual_seed(0)
    model = build().to(DTYPE)
    X = torch.randn(23, IN, generator=_gen(0), dtype=DTYPE)
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, _labels(23)), batch_size=10)
    split, why = split_first_layer(obj)
    assert split is None and reason in why
    u, v = _plane(obj)
    s, paths = _paths(lambda: lg.slice_2d(obj, u, v, ALPHAS, BETAS))
    assert paths == {"per_point": 1}
    _assert_same(s, _plain(obj, u, v))


def test_tied_weights_go_point_by_point():
    torch.manual_seed(0)
    obj = lg.Objective(
        TiedWeights().to(DTYPE),
        nn.CrossEntropyLoss(),
        (torch.randn(23, IN, generator=_gen(0), dtype=DTYPE), _labels(23)),
    )
    split, why = split_first_layer(obj)
    assert split is None and "more than one operation" not in why
    u, v = _plane(obj)
    s, paths = _paths(lambda: lg.slice_2d(obj, u, v, ALPHAS, BETAS))
    assert paths == {"per_point": 1}
    _assert_same(s, _plain(obj, u, v))


def test_hooks_on_the_first_layer_are_honoured_point_by_point():
    obj, _ = _objective("tanh_mlp")
    u, v = _plane(obj)
    plain = _plain(obj, u, v)
    handle = obj.model[0].register_forward_hook(lambda m, i, o: 2.0 * o)
    try:
        assert split_first_layer(obj)[0] is None
        s, paths = _paths(lambda: lg.slice_2d(obj, u, v, ALPHAS, BETAS))
        assert paths == {"per_point": 1}
        _assert_same(s, _plain(obj, u, v))
        assert not torch.allclose(s.loss, plain["loss"])
    finally:
        handle.remove()
    # A hook on a later layer runs inside the tail: still shared, still honoured.
    handle = obj.model[2].register_forward_hook(lambda m, i, o: 2.0 * o)
    try:
        s, paths = _paths(lambda: lg.slice_2d(obj, u, v, ALPHAS, BETAS))
        assert paths == {"shared_first_layer": 1}
        _assert_same(s, _plain(obj, u, v))
    finally:
        handle.remove()


def test_recomputed_batchnorm_statistics_go_point_by_point():
    obj, _ = _objective("conv2d_batchnorm")
    _, held = _objective("conv2d_batchnorm", n=17, seed=5)
    u, v = _plane(obj)
    s, paths = _paths(
        lambda: lg.slice_2d(
            obj, u, v, ALPHAS[:3], BETAS[:2], recompute_norm=True, eval_data=held
        )
    )
    assert paths == {"per_point": 2} and s.recompute_norm
    points = obj.theta + torch.cartesian_prod(ALPHAS[:3], BETAS[:2]) @ torch.stack(
        [u, v]
    )
    held_obj = lg.Objective(obj.model, nn.CrossEntropyLoss(), held)
    ref = evaluate_points(obj, points, recompute_norm=True, eval_obj=held_obj)
    for key in ("loss", "accuracy", "eval_loss", "eval_accuracy"):
        torch.testing.assert_close(getattr(s, key).flatten(), ref[key])
    plain = _plain(obj, u, v, ALPHAS[:3], BETAS[:2])
    assert not torch.allclose(s.loss, plain["loss"])  # the statistics did change


def test_train_mode_goes_point_by_point():
    obj, data = _objective("conv2d_batchnorm", mode="train")
    assert split_first_layer(obj)[1].startswith("train mode")
    u, v = _plane(obj)
    s, paths = _paths(lambda: lg.slice_2d(obj, u, v, ALPHAS, BETAS))
    assert paths == {"per_point": 1}
    _assert_same(s, _plain(obj, u, v))
    # Batch statistics: not the eval-mode numbers.
    eval_obj = lg.Objective(obj.model, nn.CrossEntropyLoss(), data, batch_size=10)
    assert not torch.allclose(s.loss, _plain(eval_obj, u, v)["loss"])


def test_many_rays_on_a_narrow_first_layer_go_point_by_point():
    obj, _ = _objective("tanh_mlp")  # 64 inputs: 16 (k + 1) <= 64 for k <= 3
    rays, paths = _paths(lambda: lg.ray_curvature(obj, n_rays=4, step=1e-3))
    assert paths == {"per_point": 1}
    few, paths = _paths(lambda: lg.ray_curvature(obj, n_rays=3, step=1e-3))
    assert paths == {"shared_first_layer": 1}
    torch.testing.assert_close(few.fd, rays.fd[:3], rtol=1e-6, atol=1e-8)


def test_fewer_points_than_directions_plus_one_go_point_by_point():
    obj, _ = _objective("tanh_mlp")
    u, v = _plane(obj)
    one = torch.tensor([0.5], dtype=DTYPE)
    s, paths = _paths(lambda: lg.slice_2d(obj, u, v, one, one))
    assert paths == {"per_point": 1}
    _assert_same(s, _plain(obj, u, v, one, one))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_registered_case_splits_exactly_or_not_at_all(case):
    model, loss_fn, X, y = case.make()
    obj = lg.Objective(model, loss_fn, (X, y), batch_size=case.batch_size)
    u, v = _plane(obj)
    s, paths = _paths(lambda: lg.slice_2d(obj, u, v, ALPHAS, BETAS))
    assert paths == {"per_point": 1}  # first layers of 4-5 inputs: sharing can't pay
    ref = _plain(obj, u, v)
    _assert_same(s, ref)
    # Where the model splits, the shared evaluation is exact all the same
    # (a first layer that is the whole model included: an empty tail).
    split, why = split_first_layer(obj)
    assert (split is None) == (case.name == "attention_layernorm"), why
    if split is None:
        return
    coefs = torch.cartesian_prod(ALPHAS, BETAS)
    for chunk_size in (1, 7):
        got = evaluate_shared(
            obj, split, obj.theta, coefs, torch.stack([u, v]), chunk_size
        )
        assert got.keys() == ref.keys()
        for key, value in got.items():
            torch.testing.assert_close(
                value, ref[key].flatten(), rtol=1e-12, atol=1e-12
            )
