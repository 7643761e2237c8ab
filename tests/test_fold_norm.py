"""Evaluating points one by one with BatchNorm folded into the convolutions before it."""

import copy

import pytest
import torch
from torch import nn

import lossgeom as lg
from lossgeom.objective._fold_norm import FOLDED, fold_norms

DT = torch.float64


def randomise_norms(model, gen):
    """Statistics and affine parameters far from their defaults."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.2)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
    return model.to(DT).eval()


class Residual(nn.Module):
    """conv -> bn on one branch; a second conv's output feeds bn and the sum."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.head = nn.Linear(4 * 16, 3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(h)
        h = torch.relu(self.bn2(z) + z)  # conv2's output used twice: not folded
        return self.head(h.flatten(1))


def cases():
    yield (
        "conv2d",
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4 * 2 * 2, 3),
        ),
        (2, 4, 4),
        2,
    )
    yield (
        "conv1d",
        nn.Sequential(
            nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"),
            nn.BatchNorm1d(3, affine=False),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(3 * 5, 3),
        ),
        (2, 5),
        1,
    )
    yield (
        "conv3d",
        nn.Sequential(
            nn.Conv3d(1, 2, 2, groups=1),
            nn.BatchNorm3d(2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(2 * 8, 3),
        ),
        (1, 3, 3, 3),
        1,
    )
    yield "residual", Residual(), (2, 4, 4), 1


def reference(model, points, X, y):
    """The loss at each point, loaded into a copy of the model (unfolded)."""
    twin = copy.deepcopy(model)
    out = []
    with torch.no_grad():
        for p in points:
            torch.nn.utils.vector_to_parameters(p, twin.parameters())
            out.append(nn.functional.cross_entropy(twin(X), y))
    return torch.stack(out)


@pytest.mark.parametrize("name", ["conv2d", "conv1d", "conv3d", "residual"])
def test_folded_evaluation_equals_the_model(name):
    model, shape, pairs = next(c[1:] for c in cases() if c[0] == name)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = randomise_norms(model, gen)
    X = torch.randn(40, *shape, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (40,), generator=gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y), batch_size=16)
    points = obj.theta + 0.3 * torch.randn(5, obj.dim, generator=gen, dtype=DT)
    FOLDED.clear()
    folded = obj.evaluate_metrics(points, chunk_size=1)
    assert FOLDED == {"folded": 1}  # decided once, for all points and batches
    # the reference: each point loaded into a copy of the model, unfolded
    torch.testing.assert_close(
        folded["loss"], reference(model, points, X, y), rtol=1e-12, atol=0
    )
    twin = copy.deepcopy(model)
    for p, acc in zip(points, folded["accuracy"], strict=True):
        torch.nn.utils.vector_to_parameters(p, twin.parameters())
        with torch.no_grad():
            assert float(acc) == float((twin(X).argmax(1) == y).double().mean())
    # the traced copy has the expected number of folded pairs
    runner = obj._point_runner()
    assert len(fold_norms(runner, X[:4]).pairs) == pairs
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # untouched


def test_what_is_not_folded_still_evaluates_exactly():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(30, 2, 4, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (30,), generator=gen)

    class Branchy(nn.Module):  # data-dependent control flow: cannot be traced
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
            self.head = nn.Linear(3 * 16, 3)

        def forward(self, x):
            h = self.bn(self.conv(x))
            if float(h.mean()) > 1e9:
                h = -h
            return self.head(h.flatten(1))

    batch_stats = nn.Sequential(  # eval mode with batch statistics: no folding
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.Flatten(),
        nn.Linear(3 * 16, 3),
    )
    hooked = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Flatten(),
        nn.Linear(3 * 16, 3),
    )
    calls = []
    hooked[1].register_forward_hook(lambda *a: calls.append(1))
    parametrized = nn.Sequential(  # the weight is computed: not folded
        nn.utils.parametrizations.weight_norm(nn.Conv2d(2, 3, 3, padding=1)),
        nn.BatchNorm2d(3),
        nn.Flatten(),
        nn.Linear(3 * 16, 3),
    )
    models = [
        (Branchy(), "unfolded"),
        (batch_stats, None),
        (hooked, None),
        (parametrized, None),
    ]
    for model, expect in models:
        torch.manual_seed(0)
        model = randomise_norms(model, gen)
        obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y))
        points = obj.theta + 0.3 * torch.randn(3, obj.dim, generator=gen, dtype=DT)
        FOLDED.clear()
        calls.clear()
        one_by_one = obj.evaluate(points, chunk_size=1)
        torch.testing.assert_close(one_by_one, reference(model, points, X, y))
        # the hook ran once per point: its BatchNorm was not folded away
        assert len(calls) >= (3 if model is hooked else 0)
        if expect is None:  # traced, but no pair qualifies
            assert fold_norms(obj._point_runner(), X[:4]) is None
        else:
            assert FOLDED == {expect: 1}


def test_a_trace_that_does_not_reproduce_the_model_is_not_used():
    class Counting(nn.Module):  # the trace bakes in the count it saw
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.bn(self.conv(x)).flatten(1) * self.calls

    torch.manual_seed(0)
    model = randomise_norms(Counting(), torch.Generator().manual_seed(2))
    X = torch.randn(6, 1, 3, 3, dtype=DT)
    FOLDED.clear()
    assert fold_norms(model, X) is None
    assert FOLDED == {"unfolded": 1}
