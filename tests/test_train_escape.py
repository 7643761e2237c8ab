"""Escape experiments in training: ``start`` (full-batch descent) and isotropic noise."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

import lossgeom as lg
from lossgeom.train import Callback, ConfigError, build_model
from lossgeom.train._batches import training_batch
from lossgeom.train._escape import isotropic_gradients


def config(**changes):
    cfg = {
        "model": {"name": "mlp", "options": {"width": 8}},
        "data": {"name": "digits", "subset": 64},
        "optim": {"name": "sgd", "lr": 0.1},
        "steps": 4,
        "batch_size": 8,
        "dtype": "float64",
        "metrics": None,
    }
    cfg.update(changes)
    return cfg


class Capture(Callback):
    """Keeps the training data and the weights at the start of training."""

    def on_train_start(self, state):
        self.data = state.train_data
        self.loss_fn = state.loss_fn
        self.start = {
            k: v.detach().clone() for k, v in state.model.state_dict().items()
        }


def _flat(model_or_state):
    items = (
        model_or_state.values()
        if isinstance(model_or_state, dict)
        else [p.detach() for p in model_or_state.parameters()]
    )
    return torch.cat([t.reshape(-1) for t in items])


def _full_grad(model, loss_fn, params, X, y):
    def loss(p):
        return loss_fn(functional_call(model, p, (X,)), y)

    grads = torch.func.grad(loss)(params)
    return torch.cat([grads[k].reshape(-1) for k in params])


def test_isotropic_noise_has_the_minibatch_noise_norm(tmp_path):
    cfg = lg.load_config(
        config(steps=1, optim={"name": "sgd", "lr": 0.1, "noise": "isotropic"})
    )
    cap = Capture()
    res = lg.train(cfg, tmp_path / "run", callbacks=[cap])
    model = build_model(cfg)
    theta0 = _flat(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    X, y = cap.data
    g = _full_grad(model, cap.loss_fn, params, X, y)
    xb, yb = training_batch(cfg, cap.data, 0)
    g_batch = _full_grad(model, cap.loss_fn, params, xb, yb)
    noise = (theta0 - _flat(res.model)) / 0.1 - g
    assert noise.norm().item() == pytest.approx((g_batch - g).norm().item(), rel=1e-10)
    # not the minibatch noise itself: a different direction
    cos = torch.dot(noise, g_batch - g) / (noise.norm() * (g_batch - g).norm())
    assert abs(cos.item()) < 0.5


def test_isotropic_noise_directions_are_uniform():
    cfg = lg.load_config(config(optim={"name": "sgd", "lr": 0.1, "noise": "isotropic"}))
    model = build_model(cfg)
    X = torch.randn(32, 64, dtype=torch.float64)
    y = torch.arange(32) % 10
    loss_fn = torch.nn.CrossEntropyLoss()
    params = [p for p in model.parameters()]
    d = sum(p.numel() for p in params)
    fixed = torch.randn(d, dtype=torch.float64)
    fixed /= fixed.norm()
    loss = loss_fn(model(X), y)
    full = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    cos2, steps = [], 400
    for step in range(steps):
        for p in params:  # a "minibatch gradient": full plus a fixed offset
            p.grad = torch.ones_like(p)
        norm = isotropic_gradients(cfg, model, loss_fn, (X, y), step)
        noise = torch.cat([p.grad.reshape(-1) for p in params]) - full
        assert noise.norm().item() == pytest.approx(norm, rel=1e-10)
        cos2.append((torch.dot(noise, fixed) / noise.norm()).item() ** 2)
    # u uniform on the sphere: cos^2 ~ Beta(1/2, (d-1)/2), mean 1/d
    mean = sum(cos2) / steps
    sd = math.sqrt(2 * (d - 1) / (d**2 * (d + 2)))
    assert abs(mean - 1 / d) < 4 * sd / math.sqrt(steps)


def test_start_is_full_batch_gradient_descent(tmp_path):
    cfg = lg.load_config(
        config(steps=1, start={"steps": 25, "lr": 0.5}, checkpoint={"steps": [0]})
    )
    cap = Capture()
    lg.train(cfg, tmp_path / "run", callbacks=[cap])
    model = build_model(cfg)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    X, y = cap.data
    for _ in range(25):

        def loss(p):
            return cap.loss_fn(functional_call(model, p, (X,)), y)

        grads = torch.func.grad(loss)(params)
        params = {k: params[k] - 0.5 * grads[k] for k in params}
    reached = torch.cat([params[k].reshape(-1) for k in params])
    started = torch.cat([cap.start[k].reshape(-1) for k in params])
    assert torch.allclose(started, reached, rtol=0, atol=1e-12)
    log = (tmp_path / "run" / "events.log").read_text()
    assert log.count("start: 25 full-batch descent steps") == 1


def test_every_run_of_a_seed_starts_at_the_same_point_and_resumes_without_descent(
    tmp_path,
):
    start = {"steps": 10, "lr": 0.5}
    a, b = Capture(), Capture()
    lg.train(config(start=start), tmp_path / "a", callbacks=[a])
    lg.train(
        config(
            start=start,
            batch_size=16,
            optim={"name": "sgd", "lr": 0.1, "noise": "isotropic"},
        ),
        tmp_path / "b",
        callbacks=[b],
    )
    assert torch.equal(_flat(a.start), _flat(b.start))

    class Stop(Callback):
        def on_step(self, state):
            if state.step == 6:
                raise KeyboardInterrupt

    cfg = config(
        start=start,
        steps=12,
        checkpoint={"every": 5},
        optim={"name": "sgd", "lr": 0.1, "noise": "isotropic"},
    )
    whole = lg.train(cfg, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        lg.train(cfg, tmp_path / "cut", callbacks=[Stop()])
    resumed = lg.train(cfg, tmp_path / "cut")
    assert resumed.resumed_from == 5
    assert torch.equal(_flat(resumed.model), _flat(whole.model))
    log = (tmp_path / "cut" / "events.log").read_text()
    assert log.count("start: 10 full-batch descent steps") == 1


def test_a_start_that_diverges_is_reported(tmp_path):
    model = {"name": "mlp", "options": {"width": 8, "activation": "relu"}}
    cfg = config(model=model, loss="mse", start={"steps": 50, "lr": 1e3})
    res = lg.train(cfg, tmp_path / "run")
    assert res.status == "diverged" and res.step == 0
    text = (tmp_path / "run" / "status.json").read_text()
    assert '"diverged"' in text and "smaller start.lr" in text


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"optim": {"name": "gd", "noise": "isotropic"}}, "noise: isotropic replaces"),
        (
            {"optim": {"name": "adam", "noise": "isotropic"}},
            "noise: isotropic replaces",
        ),
        ({"optim": {"noise": "isotropic"}, "batch_size": None}, "needs minibatches"),
        ({"optim": {"noise": "gaussian"}}, "optim.noise"),
        ({"start": {"steps": 0, "lr": 0.1}}, "start.steps"),
        ({"start": {"steps": 5}}, "start.lr"),
    ],
)
def test_bad_escape_settings_are_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        lg.load_config(config(**changes))


def test_isotropic_noise_needs_noise_to_copy(tmp_path):
    cfg = config(batch_size=64, optim={"name": "sgd", "noise": "isotropic"})
    with pytest.raises(ValueError, match="covers the whole training set"):
        lg.train(cfg, tmp_path / "run")
