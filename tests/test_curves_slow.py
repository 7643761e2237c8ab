"""Mode connectivity on a real network (Garipov et al. 2018): run with `make test-slow`.

Numbers measured with these tests are recorded in docs/mode_connectivity.md
(`pytest -q -s -m slow tests/test_curves_slow.py` prints them).
"""

import pytest
import torch
from torch import nn

import lossgeom as lg
from lossgeom.geometry._curves import connect
from lossgeom.zoo import cnn, digits


def train_cnn(X, y, seed, *, epochs=6, batch=64, lr=3e-3):
    """A plain Adam loop; returns the model in eval mode."""
    model = cnn(in_channels=1, num_classes=10, width=8, depth=4, norm=True, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(X.shape[0], generator=g)
        for i in range(0, X.shape[0], batch):
            idx = perm[i : i + batch]
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def two_cnns():
    """Two BatchNorm CNNs trained on digits from different seeds."""
    X, y = digits("train", flatten=False)
    loss = nn.CrossEntropyLoss()
    obj = lg.Objective(train_cnn(X, y, seed=1), loss, (X, y))
    theta_b = lg.Objective(train_cnn(X, y, seed=2), loss, (X, y)).theta
    return obj, theta_b


@pytest.mark.slow
@pytest.mark.parametrize(
    "curve, objective, steps",
    [("bezier", "mean", 200), ("polychain", "mean", 200), ("bezier", "minimax", 100)],
)
def test_trained_curve_removes_the_barrier_between_two_cnns_on_digits(
    two_cnns, curve, objective, steps
):
    """Issue: two CNNs trained from different seeds on digits: the linear path has
    a clear barrier, a trained Bezier curve lowers it by at least 75%."""
    obj, theta_b = two_cnns
    res = connect(
        obj, obj.theta, theta_b, curve, 1, steps=steps, criterion=objective, seed=0
    )
    print(
        f"\n{curve} ({objective}, {steps} steps), CNN width 8 (d={obj.dim}), digits "
        f"train ({obj.n_samples}): linear barrier {res.linear_barrier:.4f} (min "
        f"accuracy {res.linear_accuracy.min():.3f}), curve barrier {res.barrier:.4f} "
        f"at t={res.barrier_t:.2f} (min accuracy {res.accuracy.min():.3f}), "
        f"reduction {res.barrier_reduction:.1%}; end losses {res.loss[0]:.4g}, "
        f"{res.loss[-1]:.4g}; {res.cost.seconds:.1f} s"
    )
    # the ends are good solutions (statistics recomputed, as on the whole path)
    assert res.accuracy[0] > 0.95 and res.accuracy[-1] > 0.95
    # the straight line has a clear barrier ...
    assert res.linear_barrier > 0.5
    assert res.linear_accuracy.min() < 0.8
    # ... which the trained curve lowers by at least 75%
    assert res.barrier <= 0.25 * res.linear_barrier
    assert res.accuracy.min() > 0.9
    # the curve left the line: its midpoint is off the segment's midpoint
    mid = 0.5 * (obj.theta + theta_b)
    assert (res(0.5) - mid).norm() > 0.05 * (theta_b - obj.theta).norm()
