"""The objective is the loss function's own reduction over the whole data set.

Every ``torch.nn`` loss used in this field, with its options, and a few custom
losses, x three ways of batching the same 7 samples (all at once, ``batch_size``,
a DataLoader with an unequal last batch): loss, gradient, Hessian-vector
products (both backends, and the Hessian operator's kept graphs), Gauss-Newton
products and per-sample gradients against a dense float64 reference that applies
the loss function to all 7 samples at once (``torch.func`` on the whole data).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lossgeom as lg
from lossgeom.objective import resolve_reduction

DT = torch.float64
N, D_IN, C = 7, 4, 3
RTOL = 1e-10


def _gnll(out: Tensor, y: Tensor) -> Tensor:
    """Gaussian NLL with the variance from the model (half the outputs).

    The formula of ``F.gaussian_nll_loss`` written out: that function checks its
    variance with data-dependent control flow, which ``vmap`` (per-sample
    gradients) cannot trace. The reference uses ``F.gaussian_nll_loss`` itself.
    """
    k = y.shape[1]
    var = out[:, k:].exp().clamp(min=1e-6)
    return 0.5 * (var.log() + (out[:, :k] - y) ** 2 / var).mean()


def _gnll_torch(out: Tensor, y: Tensor) -> Tensor:
    k = y.shape[1]
    return F.gaussian_nll_loss(out[:, :k], y, out[:, k:].exp())


_gnll.reduction = "mean"
_gnll.lossgeom_normalizer = lambda y: y.numel()


def _sum_mse(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).sum()


_sum_mse.reduction = "sum"


@dataclass(frozen=True)
class LossCase:
    name: str
    loss: Callable
    targets: str  # "class", "ignore", "prob", "binary", "real", "logprob", "gauss"
    head: str = "none"  # "none", "logsoftmax", "sigmoid"
    plain: bool = True  # a plain mean over samples (minibatch losses unbiased)
    outputs: int = C


W = torch.tensor([1.0, 3.0, 0.5], dtype=DT)
POS = torch.tensor([2.0, 0.5, 1.5], dtype=DT)

CASES = [
    LossCase("ce", nn.CrossEntropyLoss(), "class"),
    LossCase("ce_sum", nn.CrossEntropyLoss(reduction="sum"), "class"),
    LossCase("ce_weight", nn.CrossEntropyLoss(weight=W), "class", plain=False),
    LossCase("ce_ignore", nn.CrossEntropyLoss(), "ignore", plain=False),
    LossCase("ce_weight_ignore", nn.CrossEntropyLoss(weight=W), "ignore", plain=False),
    LossCase("ce_smooth", nn.CrossEntropyLoss(label_smoothing=0.2), "class"),
    LossCase(
        "ce_smooth_weight_ignore",
        nn.CrossEntropyLoss(weight=W, label_smoothing=0.2),
        "ignore",
        plain=False,
    ),
    LossCase("ce_prob", nn.CrossEntropyLoss(weight=W), "prob"),
    LossCase("ce_prob_smooth", nn.CrossEntropyLoss(label_smoothing=0.1), "prob"),
    LossCase("nll", nn.NLLLoss(), "class", head="logsoftmax"),
    LossCase(
        "nll_weight_ignore",
        nn.NLLLoss(weight=W),
        "ignore",
        head="logsoftmax",
        plain=False,
    ),
    LossCase("bce", nn.BCELoss(), "binary", head="sigmoid"),
    LossCase("bce_weight", nn.BCELoss(weight=W), "binary", head="sigmoid"),
    LossCase("bce_sum", nn.BCELoss(reduction="sum"), "binary", head="sigmoid"),
    LossCase("bce_logits", nn.BCEWithLogitsLoss(weight=W, pos_weight=POS), "binary"),
    LossCase("mse", nn.MSELoss(), "real"),
    LossCase("mse_sum", nn.MSELoss(reduction="sum"), "real"),
    LossCase("l1", nn.L1Loss(), "real"),
    LossCase("smooth_l1", nn.SmoothL1Loss(beta=0.5), "real"),
    LossCase("huber", nn.HuberLoss(delta=0.7), "real"),
    LossCase("kl_mean", nn.KLDivLoss(reduction="mean"), "prob", head="logsoftmax"),
    LossCase(
        "kl_batchmean", nn.KLDivLoss(reduction="batchmean"), "prob", head="logsoftmax"
    ),
    LossCase("kl_sum", nn.KLDivLoss(reduction="sum"), "prob", head="logsoftmax"),
    LossCase(
        "kl_log_target",
        nn.KLDivLoss(reduction="batchmean", log_target=True),
        "logprob",
        head="logsoftmax",
    ),
    LossCase("gaussian_nll", _gnll, "gauss", plain=False, outputs=2 * C),
    LossCase("functional_ce", F.cross_entropy, "class"),
    LossCase("custom_sum", _sum_mse, "real"),
]


def _targets(kind: str, gen: torch.Generator) -> Tensor:
    if kind in ("class", "ignore"):
        y = torch.tensor([0, 1, 2, 1, 0, 2, 1])
        if kind == "ignore":
            y[[0, 3, 5]] = -100
        return y
    if kind in ("prob", "logprob"):
        p = torch.randn(N, C, generator=gen, dtype=DT).softmax(1)
        return p.log() if kind == "logprob" else p
    if kind == "binary":
        return torch.rand(N, C, generator=gen, dtype=DT)
    return torch.randn(N, C, generator=gen, dtype=DT)


def _problem(case: LossCase) -> tuple[nn.Module, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layers = [nn.Linear(D_IN, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh()]
    layers.append(nn.Linear(5, case.outputs))
    if case.head == "logsoftmax":
        layers.append(nn.LogSoftmax(dim=1))
    elif case.head == "sigmoid":
        layers.append(nn.Sigmoid())
    model = nn.Sequential(*layers).to(DT)
    X = torch.randn(N, D_IN, generator=gen, dtype=DT)
    return model, X, _targets(case.targets, gen)


def _data(kind: str, X: Tensor, y: Tensor) -> tuple[object, dict]:
    if kind == "tensors":
        return (X, y), {}
    if kind == "batch_size":
        return (X, y), {"batch_size": 3}
    return DataLoader(TensorDataset(X, y), batch_size=3), {}  # batches 3, 3, 1


class _Reference:
    """The loss function applied to all samples at once, by ``torch.func``."""

    def __init__(self, obj: lg.Objective, loss: Callable, X: Tensor, y: Tensor):
        self.obj, self.loss, self.X, self.y = obj, loss, X, y

    def outputs(self, t: Tensor, X: Tensor) -> Tensor:
        return functional_call(self.obj.model, self.obj.unflatten(t), (X,))

    def value(self, t: Tensor) -> Tensor:
        return self.loss(self.outputs(t, self.X), self.y)

    def ggn(self, t: Tensor) -> Tensor:
        out = self.outputs(t, self.X).detach()
        J = jacrev(lambda s: self.outputs(s, self.X))(t).reshape(out.numel(), -1)
        H = hessian(lambda o: self.loss(o, self.y))(out).reshape(out.numel(), -1)
        return J.T @ H @ J

    def per_sample(self, t: Tensor) -> Tensor:
        """``N`` grad c_i with c_i = S_i / Z, Z = S / L from whole-data values."""
        summed = _summed(self.loss)
        with torch.no_grad():
            ratio = float(self.value(t)) / float(
                summed(self.outputs(t, self.X), self.y)
            )
        rows = []
        for i in range(N):
            xi, yi = self.X[i : i + 1], self.y[i : i + 1]
            row = grad(lambda s, xi=xi, yi=yi: summed(self.outputs(s, xi), yi))(t)
            rows.append(row)
        return torch.stack(rows) * ratio * N


def _summed(loss: Callable) -> Callable:
    if isinstance(loss, nn.Module):
        copy = nn.Module.__new__(type(loss))
        copy.__dict__.update(loss.__dict__)
        copy.reduction = "sum"
        return copy
    if loss is F.cross_entropy:
        return lambda o, y: F.cross_entropy(o, y, reduction="sum")
    if loss is _gnll_torch:
        return lambda o, y: _gnll_torch(o, y) * y.numel()
    return loss


def _close(a: Tensor | float, b: Tensor, what: str) -> None:
    a = torch.as_tensor(a, dtype=DT).detach()
    b = torch.as_tensor(b, dtype=DT).detach()
    err = float((a - b).norm())
    scale = float(b.norm())
    assert err <= RTOL * max(scale, 1e-300), (
        f"{what}: error {err:.3g}, norm {scale:.3g}"
    )


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss")
@pytest.mark.parametrize("data_kind", ["tensors", "batch_size", "loader"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_objective_is_the_loss_over_the_whole_data_set(case, data_kind):
    model, X, y = _problem(case)
    data, kw = _data(data_kind, X, y)
    obj = lg.Objective(model, case.loss, data, hvp_backend="double-backward", **kw)
    ref = _Reference(obj, _gnll_torch if case.loss is _gnll else case.loss, X, y)
    theta = obj.theta
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KLDivLoss(reduction="mean") warns
        truth = ref.value(theta).detach()
        g_true = grad(ref.value)(theta)
        H_true = jacrev(grad(ref.value))(theta)
    V = torch.randn(obj.dim, 3, generator=torch.Generator().manual_seed(1), dtype=DT)

    _close(obj.loss(), truth, "loss")
    value, g = obj.loss_and_grad()
    _close(value, truth, "loss_and_grad value")
    _close(g, g_true, "gradient")
    _close(obj.evaluate(theta.unsqueeze(0), chunk_size=None), truth.reshape(1), "eval")
    _close(obj.hvp(V), H_true @ V, "hvp (double backward)")
    fwd = lg.Objective(model, case.loss, data, hvp_backend="forward-over-reverse", **kw)
    try:
        _close(fwd.hvp(V), H_true @ V, "hvp (forward over reverse)")
    except NotImplementedError:  # torch lacks forward-mode AD here (huber_loss)
        auto = lg.Objective(model, case.loss, data, **kw)
        _close(auto.hvp(V), H_true @ V, "hvp (auto)")
    _close(lg.hessian(obj) @ V, H_true @ V, "Hessian operator (kept graphs)")
    _close(lg.ggn(obj) @ V, ref.ggn(theta) @ V, "GGN product")

    rows = torch.cat([obj.per_sample_grad(theta, xb, yb) for xb, yb in obj.batches()])
    _close(rows, ref.per_sample(theta), "per-sample gradients")
    _close(rows.mean(0), g_true, "mean of per-sample gradients")


@pytest.mark.parametrize(
    "case", [c for c in CASES if not c.plain], ids=lambda c: c.name
)
def test_two_batch_noise_scale_refuses_weighted_means(case):
    model, X, y = _problem(case)
    obj = lg.Objective(model, case.loss, (X, y))
    with pytest.raises(ValueError, match="method='per_sample'"):
        lg.noise_scale(obj, "two_batch", batch_sizes=(2, 4))
    res = lg.noise_scale(obj)
    assert "grad c_i" in res.definition and res.value > 0


def test_two_batch_noise_scale_works_for_a_sum():
    case = next(c for c in CASES if c.name == "mse_sum")
    model, X, y = _problem(case)
    obj = lg.Objective(model, case.loss, (X, y))
    res = lg.noise_scale(obj, "two_batch", batch_sizes=(1, 7), n_repeats=4)
    exact = lg.noise_scale(obj).value
    assert abs(res.value - exact) <= 1e-8 * exact  # B_big = N: exact draws


def test_an_undeclared_loss_that_is_not_a_mean_is_refused():
    model, X, y = _problem(CASES[0])

    def weighted(out, t):
        return F.cross_entropy(out, t, weight=W)

    obj = lg.Objective(model, weighted, (X, y), batch_size=3)
    with pytest.raises(ValueError, match="declare|Declare"):
        obj.loss()
    weighted.reduction = "sum"  # declared: trusted
    assert lg.Objective(model, weighted, (X, y), batch_size=3).loss() > 0
    single = lg.Objective(model, lambda o, t: F.cross_entropy(o, t, weight=W), (X, y))
    _close(single.loss(), F.cross_entropy(model(X), y, weight=W), "one")


def test_reduction_none_and_gaussian_nll_are_refused_clearly():
    model, X, y = _problem(CASES[0])
    with pytest.raises(ValueError, match="reduction='none' is not accepted"):
        lg.Objective(model, nn.CrossEntropyLoss(reduction="none"), (X, y))
    with pytest.raises(ValueError, match="GaussianNLLLoss takes three arguments"):
        lg.Objective(model, nn.GaussianNLLLoss(), (X, y))


def test_the_users_loss_module_is_not_changed():
    loss = nn.CrossEntropyLoss(weight=W)
    model, X, y = _problem(CASES[0])
    lg.Objective(model, loss, (X, y), batch_size=3).grad()
    assert loss.reduction == "mean"


class _DictDataset(Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.X[i]}, self.y[i]


def test_dict_inputs_are_refused_clearly():
    model, X, y = _problem(CASES[0])
    with pytest.raises(TypeError, match="dict"):
        lg.Objective(model, nn.CrossEntropyLoss(), _DictDataset(X, y))
    with pytest.raises(TypeError, match="dict"):
        lg.Objective(model, nn.CrossEntropyLoss(), DataLoader(_DictDataset(X, y)))


def test_drop_last_loader_covers_the_batches_it_yields():
    model, X, y = _problem(CASES[0])
    loader = DataLoader(TensorDataset(X, y), batch_size=3, drop_last=True)
    with pytest.warns(UserWarning, match="drop_last"):
        obj = lg.Objective(model, nn.CrossEntropyLoss(), loader)
    _close(obj.loss(), nn.CrossEntropyLoss()(model(X[:6]), y[:6]), "6")


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(C, C, bias=False)
        self.b = nn.Linear(C, C)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_tied_weights_match_the_reference():
    torch.manual_seed(0)
    model = _Tied().to(DT)
    X, y = torch.randn(N, C, dtype=DT), torch.tensor([0, 1, 2, 1, 0, 2, 1])
    loss = nn.CrossEntropyLoss(weight=W)
    obj = lg.Objective(model, loss, DataLoader(TensorDataset(X, y), batch_size=3))
    assert obj.names == ["a.weight", "b.bias"]
    model.zero_grad()
    loss(model(X), y).backward()
    g_true = torch.cat([model.a.weight.grad.reshape(-1), model.b.bias.grad])
    _close(obj.grad(), g_true, "tied gradient")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_value_over_chunks_is_the_whole_data_loss(case):
    """The loss of outputs held in chunks (evaluation during training)."""
    model, X, y = _problem(case)
    reference = _gnll_torch if case.loss is _gnll else case.loss
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(X)
        chunks = [(out[i : i + 3], y[i : i + 3]) for i in range(0, N, 3)]
        value = resolve_reduction(case.loss).value_over(chunks)
        _close(value, reference(out, y), "loss over chunks")
