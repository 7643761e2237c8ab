"""Reproductions along SGD training on sklearn digits (numbers in docs/gradient_noise.md).

(2) Gur-Ari, Roberts & Dyer (2018): the gradient concentrates in the top-10
    Hessian eigenspace within a few hundred SGD steps.
(3) McCandlish et al. (2018): the simple noise scale grows as the loss falls.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import lossgeom as lg
from lossgeom.measures import gradient_fraction, noise_scale
from lossgeom.zoo import digits, mlp

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sgd_checkpoints(activation, lr, seed, checkpoints, probe):
    """Train a 64-32-32-10 MLP with SGD (batch 64) and call ``probe`` at checkpoints."""
    X, y = digits("train")
    model = mlp(64, 10, width=32, depth=2, activation=activation, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for step in range(checkpoints[-1] + 1):
        if step in checkpoints:
            obj = lg.Objective(model, loss_fn, (X, y), dtype=torch.float64)
            rows.append({"step": step, "loss": obj.loss(), **probe(obj)})
        idx = torch.randint(0, X.shape[0], (64,), generator=gen)
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_concentrates_in_top_hessian_subspace(seed):
    steps = [0, 25, 50, 75, 100, 150, 200, 300]

    def probe(obj):
        res = gradient_fraction(obj, k=10, tol=1e-6)
        assert res.converged.all() and res.bound < 0.05
        return {"fraction": res.value, "dim": obj.dim}

    rows = sgd_checkpoints("relu", 0.5, seed, steps, probe)
    print(
        seed, [(r["step"], round(r["loss"], 3), round(r["fraction"], 3)) for r in rows]
    )
    later = torch.tensor([r["fraction"] for r in rows if r["step"] >= 50])
    assert rows[0]["fraction"] < 0.5  # at initialisation it is not concentrated
    assert float(later.max()) > 0.8  # ... within 300 steps it is, at times
    assert float(later.median()) > 0.6  # ... and mostly, after 50 steps
    assert 10 / rows[0]["dim"] < 0.01  # a random 10-dim subspace would hold <1%


def test_noise_scale_grows_as_loss_falls():
    steps = [0, 25, 50, 100, 200, 300, 500, 800]

    def probe(obj):
        exact = noise_scale(obj)
        two = noise_scale(obj, "two_batch", batch_sizes=(32, 512), n_repeats=20)
        return {"b": exact.value, "b2": two.value, "b2_err": two.stderr}

    rows = sgd_checkpoints("tanh", 0.1, 0, steps, probe)
    for r in rows:
        print(
            r["step"],
            round(r["loss"], 4),
            round(r["b"], 1),
            f"{r['b2']:.1f} +- {r['b2_err']:.1f}",
        )
    loss = [r["loss"] for r in rows]
    b = [r["b"] for r in rows]
    assert spearmanr(loss, b).statistic < -0.9
    assert b[-1] > 10 * b[0]
    # the estimator without per-sample gradients tracks it (within 5 stderr)
    for r in rows:
        assert math.isfinite(r["b2_err"])
        assert abs(r["b2"] - r["b"]) < 5 * r["b2_err"] + 0.05 * r["b"], r
