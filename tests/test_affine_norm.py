"""Eval-mode BatchNorm computed as its affine map: the same function and derivatives."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lossgeom as lg
from lossgeom.objective._affine_norm import AffineBatchNorm
from lossgeom.testing import exact_hessian

DT = torch.float64


class CustomNorm(nn.Module):
    """Calls F.batch_norm itself, with keywords, as some user modules do."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c, dtype=DT) + 0.5)
        self.register_buffer("mean", torch.randn(c, dtype=DT))
        self.register_buffer("var", torch.rand(c, dtype=DT) + 0.1)

    def forward(self, x):
        return F.batch_norm(
            x, self.mean, self.var, weight=self.weight, bias=None, eps=1e-3
        )


def make_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 16, 8),
        nn.BatchNorm1d(8),
        CustomNorm(8),
        nn.Tanh(),
        nn.Linear(8, 3),
    ).to(DT)
    X = torch.randn(24, 1, 4, 4, dtype=DT)
    with torch.no_grad():  # running statistics that are not the defaults
        model.train()
        for _ in range(3):
            model(X + 0.3 * torch.randn_like(X))
    y = torch.randint(0, 3, (24,))
    return model.eval(), X, y


def native_hessian(model, X, y):
    """The Hessian through PyTorch's own batch_norm, by torch.autograd.functional."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def loss(theta):
        params = {
            n: t.reshape(s)
            for n, t, s in zip(names, theta.split(sizes), shapes, strict=True)
        }
        out = functional_call(model, (params, buffers), (X,))
        return F.cross_entropy(out, y)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.autograd.functional.hessian(loss, theta)


def test_the_affine_map_is_batch_norm_with_running_statistics():
    model, X, y = make_model()
    with torch.no_grad():
        native = model(X)
        with AffineBatchNorm():
            affine = model(X)
    assert torch.allclose(affine, native, rtol=1e-13, atol=1e-14)
    assert not torch.equal(affine, model(X) * 0)  # a real output, not zeros


def test_hessian_and_gradient_match_pytorchs_batch_norm():
    model, X, y = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y))
    H_ref = native_hessian(model, X, y)
    H = exact_hessian(obj)
    assert torch.allclose(H, H_ref, rtol=1e-10, atol=1e-12)
    v = torch.randn(obj.dim, dtype=DT)
    assert torch.allclose(lg.hessian(obj) @ v, H_ref @ v, rtol=1e-10, atol=1e-12)
    assert torch.allclose(obj.hvp(v), H_ref @ v, rtol=1e-10, atol=1e-12)
    fwd = lg.Objective(
        model, nn.CrossEntropyLoss(), (X, y), hvp_backend="forward-over-reverse"
    )
    assert torch.allclose(fwd.hvp(v), H_ref @ v, rtol=1e-10, atol=1e-12)
    # the model is untouched: same state, still in eval mode, same forward
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_train_mode_keeps_batch_statistics():
    model, X, y = make_model()
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y), mode="train")
    model.train()
    out = model(X)  # batch statistics; with momentum this updates buffers
    model.eval()
    expected = F.cross_entropy(out, y).detach()
    assert abs(obj.loss() - float(expected)) < 1e-12
    # and the gradient is the batch-statistics one (differs from eval mode's)
    g_train = obj.grad()
    g_eval = lg.Objective(model, nn.CrossEntropyLoss(), (X, y)).grad()
    assert float((g_train - g_eval).norm()) > 1e-6 * float(g_eval.norm())


def test_per_sample_gradients_through_the_affine_norm():
    model, X, y = make_model()
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y))
    with obj.probe_mode():
        G = obj.per_sample_grad(obj.theta, X, y)  # vmap over samples
    assert G.shape == (24, obj.dim)
    # the mean of the per-sample gradients is the full gradient
    assert torch.allclose(G.mean(0), obj.grad(), rtol=1e-10, atol=1e-12)
