"""A registry of small float64 problems for exact comparisons.

Each case builds ``(model, loss_fn, inputs, targets)`` deterministically from a
seed; ``batch_size`` is chosen so that the last batch is uneven.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

DTYPE = torch.float64


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[torch.Generator], tuple[nn.Module, Callable, Tensor, Tensor]]
    batch_size: int | None = None

    def make(self, device: str = "cpu", seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model, loss_fn, X, y = self.build(gen)
        model = model.to(device=device, dtype=DTYPE)
        X = X.to(device, DTYPE if X.is_floating_point() else None)
        y = y.to(device, DTYPE if y.is_floating_point() else None)
        return model, loss_fn, X, y


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=DTYPE)


def _labels(gen, n, k):
    return torch.randint(0, k, (n,), generator=gen)


def tanh_mlp(gen):
    model = nn.Sequential(
        nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)
    )
    return model, nn.CrossEntropyLoss(), _randn(gen, 23, 5), _labels(gen, 23, 3)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.tanh(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


def cnn_batchnorm(gen):
    model = SmallCNN()
    with torch.no_grad():  # non-trivial running statistics, as after training
        for bn in (model.bn1, model.bn2):
            bn.running_mean.copy_(0.3 * _randn(gen, bn.num_features).float())
            bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=gen))
            bn.weight.copy_(1 + 0.2 * _randn(gen, bn.num_features).float())
            bn.bias.copy_(0.1 * _randn(gen, bn.num_features).float())
    return model, nn.CrossEntropyLoss(), _randn(gen, 13, 1, 6, 6), _labels(gen, 13, 3)


class ResidualBlock(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.f1 = nn.Linear(width, width)
        self.f2 = nn.Linear(width, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + self.f2(torch.nn.functional.gelu(self.f1(h)))
        return self.out(h)


def residual_block(gen):
    return ResidualBlock(), nn.MSELoss(), _randn(gen, 19, 4), _randn(gen, 19, 2)


class AttentionBlock(nn.Module):
    def __init__(self, dim=4, heads=2, classes=3):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.norm(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((x + a).mean(1))


def attention_block(gen):
    return (
        AttentionBlock(),
        nn.CrossEntropyLoss(),
        _randn(gen, 11, 5, 4),
        _labels(gen, 11, 3),
    )


def logistic_regression(gen):
    return (
        nn.Linear(4, 1),
        nn.BCEWithLogitsLoss(),
        _randn(gen, 31, 4),
        (torch.rand(31, 1, generator=gen) < 0.5).to(DTYPE),
    )


def softmax_regression(gen):
    return (
        nn.Linear(4, 3),
        nn.CrossEntropyLoss(),
        _randn(gen, 29, 4),
        _labels(gen, 29, 3),
    )


def least_squares(gen):
    return nn.Linear(5, 2), nn.MSELoss(), _randn(gen, 27, 5), _randn(gen, 27, 2)


CASES = [
    Case("tanh_mlp", tanh_mlp, batch_size=10),
    Case("cnn_batchnorm", cnn_batchnorm, batch_size=5),
    Case("residual_block", residual_block, batch_size=8),
    Case("attention_layernorm", attention_block, batch_size=4),
    Case("logistic_regression", logistic_regression, batch_size=12),
    Case("softmax_regression", softmax_regression, batch_size=None),
    Case("least_squares", least_squares, batch_size=10),
]
CASE_IDS = [c.name for c in CASES]


def rel_err(a, b) -> float:
    """Relative error ||a - b|| / ||b|| in the Frobenius norm."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def rotated(eigs, seed=0):
    """A dense symmetric operator with eigenvalues ``eigs`` in a random basis."""
    from lossgeom.linalg import DenseOperator

    gen = torch.Generator().manual_seed(seed)
    d = eigs.numel()
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DTYPE))
    A = (Q * eigs) @ Q.T
    return DenseOperator((A + A.T) / 2)
