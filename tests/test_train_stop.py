"""stop.train_loss: a run ends at the first metrics row that reaches the loss."""

from __future__ import annotations

import json

import pytest

import lossgeom as lg
from lossgeom.train import ConfigError, latest_checkpoint


def config(**changes):
    cfg = {
        "model": {"name": "mlp", "options": {"width": 16}},
        "data": {"name": "digits", "subset": 256},
        "optim": {"name": "sgd", "lr": 0.1},
        "steps": 400,
        "batch_size": 32,
        "metrics": {"every": 10, "sharpness": False, "eval_samples": None},
        "stop": {"train_loss": 0.5},
    }
    cfg.update(changes)
    return cfg


def test_the_run_stops_at_the_first_row_reaching_the_loss(tmp_path):
    res = lg.train(config(), tmp_path / "run")
    losses = [r["train_loss"] for r in res.metrics]
    assert res.status == "finished" and res.step < 400
    assert losses[-1] <= 0.5 and all(x > 0.5 for x in losses[:-1])
    assert res.metrics[-1]["step"] == res.step  # no extra row after the stop
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "finished" and "stop.train_loss 0.5" in status["stopped"]
    assert (
        latest_checkpoint(tmp_path / "run" / "checkpoints").name
        == f"step_{res.step:07d}.json"
    )
    # the same losses as a run without the rule, up to the stop
    full = lg.train(config(stop={}, steps=res.step + 20), tmp_path / "full")
    assert [r["train_loss"] for r in full.metrics][: len(losses)] == losses
    again = lg.train(config(), tmp_path / "run")  # finished: nothing more to do
    assert again.step == res.step and len(again.metrics) == len(res.metrics)


def test_a_stop_rule_needs_the_metrics():
    with pytest.raises(ConfigError, match="stop.train_loss needs the metrics"):
        lg.load_config(config(metrics=None))
    with pytest.raises(ConfigError, match="stop.train_loss"):
        lg.load_config(config(stop={"train_loss": -1.0}))
