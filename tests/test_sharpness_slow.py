"""Keskar et al. 2017 on digits: large-batch minima are sharper. `make test-slow`.

Numbers measured with this test are recorded in docs/sharpness.md
(`pytest -q -s -m slow tests/test_sharpness_slow.py` prints them).
"""

import pytest
import torch
from torch import nn

import lossgeom as lg
from lossgeom.measures._sharpness import sharpness
from lossgeom.zoo import digits

LR = 1.0  # the same step size for both batch sizes
STOP_LOSS = 0.05  # train until the full training loss is below this...
MATCH_LOSS = 0.03  # ...then full-batch GD (lr 0.1) until both are at this loss


@pytest.fixture(scope="module")
def one_thread():
    """Small models on a shared CPU train much faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train(X, y, batch, seed):
    """SGD (lr 1.0) with batch ``batch`` to STOP_LOSS, then to MATCH_LOSS by GD."""
    model = lg.zoo.model("mlp", width=64, depth=2, activation="relu", seed=seed)
    loss_fn = nn.functional.cross_entropy
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)
    epochs = 0
    while epochs < 200:
        perm = torch.randperm(X.shape[0], generator=g)
        for i in range(0, X.shape[0], batch):
            idx = perm[i : i + batch]
            loss = loss_fn(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        epochs += 1
        with torch.no_grad():
            if loss_fn(model(X), y).item() < STOP_LOSS:
                break
    polish = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2000):
        loss = loss_fn(model(X), y)
        if loss.item() <= MATCH_LOSS:
            break
        polish.zero_grad()
        loss.backward()
        polish.step()
    return model.eval(), epochs


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_large_batch_minimum_is_sharper_than_small_batch_minimum(one_thread, seed):
    """Issue: the same MLP trained with batch 32 and with the full batch to a
    similar training loss: the large-batch minimum has the larger lambda_max and
    the larger worst-case epsilon-sharpness (at a radius where curvature, not
    the batch-32 iterate's larger gradient, dominates; see docs/sharpness.md)."""
    X, y = digits("train")
    found = {}
    for name, batch in (("batch 32", 32), ("full batch", X.shape[0])):
        model, epochs = train(X, y, batch, seed)
        obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y), dtype=torch.float64)
        lam = lg.eigenvalues(obj, 1, tol=1e-4)
        assert lam.all_converged
        row = {
            "epochs": epochs,
            "loss": obj.loss(),
            "grad_norm": obj.grad().norm().item(),
            "lambda_max": lam.values[0].item(),
        }
        for r in (0.05, 0.2):
            row[f"worst r={r}"] = sharpness(obj, r, "worst", steps=10, restarts=2).value
        row["keskar eps=5e-4"] = sharpness(
            obj, 5e-4, "keskar", steps=10, restarts=2
        ).value
        row["average sigma=0.01"] = sharpness(obj, 0.01, "average", samples=32).value
        found[name] = row
        print(
            f"\nseed {seed}, {name}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in row.items())
        )
    small, large = found["batch 32"], found["full batch"]
    assert abs(small["loss"] - large["loss"]) < 0.015  # similar training loss
    assert large["lambda_max"] > 1.2 * small["lambda_max"]
    assert large["worst r=0.2"] > small["worst r=0.2"]
    assert large["average sigma=0.01"] > small["average sigma=0.01"]
