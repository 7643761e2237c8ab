"""Training: config validation, metrics, determinism, resume after a kill, divergence."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lossgeom as lg
from lossgeom.train import (
    ConfigError,
    MetricsLog,
    OptimConfig,
    augment,
    load_config,
    schedule_factor,
    stability_threshold,
)


def small(**over) -> dict:
    """A config that trains a 64-16-10 tanh MLP on 256 digits in well under a second."""
    cfg = {
        "name": "small",
        "seed": 0,
        "model": {"name": "mlp", "options": {"width": 16, "depth": 1}},
        "data": {"name": "digits", "subset": 256, "test_subset": 128},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "steps": 40,
        "batch_size": 32,
        "metrics": {"every": 10, "probe_samples": 128, "trace_max_matvecs": 40},
        "checkpoint": {"every": 20},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def weights(result) -> dict:
    return {k: v.clone() for k, v in result.model.state_dict().items()}


def numbers(rows) -> list[dict]:
    """Metric rows without wall times (those differ between runs)."""
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


# ------------------------------------------------------------------ config errors
@pytest.mark.parametrize(
    "over, path, reason",
    [
        ({"optim": {"lr": -1}}, "optim.lr", "greater than 0"),
        ({"optim": {"momentum": 1.0}}, "optim.momentum", "less than 1"),
        ({"optim": {"nesterov": True, "momentum": 0}}, "optim", "nesterov needs"),
        ({"optim": {"name": "adam", "momentum": 0.9}}, "optim", "uses betas"),
        ({"optim": {"name": "rmsprop"}}, "optim.name", "'gd', 'sgd', 'adam'"),
        (
            {"optim": {"name": "adam", "momentum": 0, "adaptive": {"c": 1}}},
            "optim",
            "defined for gd and sgd",
        ),
        ({"model": {"name": "mlpp"}}, "model", "unknown zoo model 'mlpp'"),
        ({"model": {"name": "mlp", "options": {"widht": 3}}}, "model", "widht"),
        ({"model": {"factory": "nocolon"}}, "model", "package.module:function"),
        ({"data": {"name": "digitz"}}, "data.name", "unknown data set 'digitz'"),
        ({"steps": 0}, "steps", "greater than 0"),
        ({"schedule": {"warmup_steps": 40}}, "(top level)", "warmup_steps"),
        ({"checkpoint": {"steps": [50]}}, "(top level)", "after the last step"),
        ({"bf16": True, "dtype": "float64"}, "(top level)", "bf16"),
        ({"optimizer": {"lr": 1}}, "optimizer", "Extra inputs are not permitted"),
        ({"metrics": {"every": 0}}, "metrics.every", "greater than 0"),
    ],
)
def test_invalid_config_is_rejected_before_any_work(tmp_path, over, path, reason):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        lg.train(small(**over), run_dir)
    msg = str(info.value)
    assert f"  {path}: " in msg and reason in msg, msg
    assert not run_dir.exists()


def test_config_files(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(small()))
    assert load_config(good).optim.momentum == 0.9
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping of fields"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


# ------------------------------------------------------------------ a run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return lg.train(small(), tmp_path_factory.mktemp("run") / "r")


def test_run_directory_and_metrics(run):
    assert run.status == "finished" and run.step == 40
    d = run.run_dir
    assert {p.name for p in d.iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "status.json",
        "checkpoints",
    }
    assert json.loads((d / "status.json").read_text())["status"] == "finished"
    rows = MetricsLog(d / "metrics.jsonl").read()
    assert [r["step"] for r in rows] == [0, 10, 20, 30, 40]
    for r in rows:
        for key in (
            "train_loss",
            "train_accuracy",
            "test_loss",
            "test_accuracy",
            "grad_norm",
            "sharpness",
            "sharpness_residual",
            "eos_ratio",
            "trace",
            "trace_stderr",
        ):
            assert key in r and isinstance(r[key], float), (key, r)
        assert r["eos_formula"] == "(2 + 2 beta) / eta"
        assert math.isclose(r["eos_ratio"], r["sharpness"] * 0.1 / 3.8, rel_tol=1e-12)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    names = sorted(p.name for p in (d / "checkpoints").iterdir())
    assert names == [
        "step_0000020.json",
        "step_0000020.safetensors",
        "step_0000040.json",
        "step_0000040.safetensors",
    ]
    final = load_file(str(d / "checkpoints" / "step_0000040.safetensors"))
    for k, v in run.model.state_dict().items():
        assert torch.equal(final[f"model/{k}"], v)
    sidecar = json.loads((d / "checkpoints" / "step_0000040.json").read_text())
    assert sidecar["step"] == 40 and sidecar["config"]["name"] == "small"
    assert {"torch"} <= set(sidecar["rng"])


def test_logged_curvature_matches_a_tight_reference(run):
    """The cheap warm-started sharpness and the trace agree with exact values."""
    cfg = load_config(small())
    X, y = lg.zoo.dataset("digits", subset=256, seed=0)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    idx = torch.randperm(X.shape[0], generator=gen)[:128]
    obj = lg.Objective(
        run.model,
        torch.nn.CrossEntropyLoss(),
        (X[idx].flatten(1), y[idx]),
        dtype=torch.float64,
    )
    H = lg.testing.exact_hessian(obj)
    ev = torch.linalg.eigvalsh(H)
    last = MetricsLog(run.run_dir / "metrics.jsonl").read()[-1]
    assert last["sharpness_converged"]
    assert abs(last["sharpness"] - ev[-1].item()) <= 2e-3 * ev[-1].item()
    assert abs(last["trace"] - ev.sum().item()) <= 4 * last["trace_stderr"] + 1e-6
    assert math.isclose(last["grad_norm"], obj.grad().norm().item(), rel_tol=1e-4)


def test_same_config_same_numbers(run, tmp_path):
    again = lg.train(small(), tmp_path / "again")
    assert numbers(again.metrics) == numbers(run.metrics)
    for k, v in weights(run).items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    other = lg.train(small(seed=1), tmp_path / "other")
    assert numbers(other.metrics) != numbers(run.metrics)


def test_resume_is_a_noop_for_a_finished_run_and_refuses_another_config(run):
    same = lg.train(small(), run.run_dir)
    assert same.status == "finished" and numbers(same.metrics) == numbers(run.metrics)
    for k, v in weights(run).items():
        assert torch.equal(v, same.model.state_dict()[k])
    with pytest.raises(ValueError, match="different config"):
        lg.train(small(steps=50), run.run_dir)
    with pytest.raises(ValueError, match="resume=False"):
        lg.train(small(), run.run_dir, resume=False)


def test_resume_after_a_real_kill_reaches_the_same_weights(tmp_path):
    """A ``lossgeom train`` process is killed with SIGKILL after its first
    checkpoint; resuming ends with the weights of an uninterrupted run."""
    cfg = small(
        steps=300,
        metrics={"every": 1, "trace_max_matvecs": 0, "probe_samples": 64},
        checkpoint={"every": 25},
        optim={"name": "adam", "lr": 0.01, "momentum": 0},
        model={"name": "mlp", "options": {"width": 16, "depth": 1}},
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from lossgeom.cli import main; main()",
            "train",
            str(path),
            "--out",
            str(killed),
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (killed / "checkpoints" / "step_0000050.json").is_file():
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    status = json.loads((killed / "status.json").read_text())
    assert status["status"] == "running" and status["step"] < 300
    resumed = lg.train(path, killed)
    assert resumed.resumed_from is not None and 50 <= resumed.resumed_from < 300
    whole = lg.train(path, tmp_path / "whole")
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert numbers(resumed.metrics) == numbers(whole.metrics)


def test_divergence_is_recorded_not_raised(tmp_path):
    res = lg.train(
        small(optim={"name": "gd", "lr": 1e4, "momentum": 0}, steps=200, loss="mse"),
        tmp_path / "div",
    )
    assert res.status == "diverged" and 0 < res.step < 200
    status = json.loads((tmp_path / "div" / "status.json").read_text())
    assert status["status"] == "diverged" and status["step"] == res.step
    assert status["reason"]
    last = res.metrics[-1]
    assert last["step"] == res.step and (last.get("diverged") or "sharpness" in last)
    # every line of metrics.jsonl is strict JSON (no NaN literals)
    for line in (tmp_path / "div" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))


def test_a_failed_checkpoint_write_leaves_no_partial_files(tmp_path, monkeypatch):
    import lossgeom.train._state as state

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(state, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        lg.train(small(), tmp_path / "r")
    assert list((tmp_path / "r" / "checkpoints").glob("*")) == []
    # the metrics written so far are complete lines
    assert [r["step"] for r in MetricsLog(tmp_path / "r" / "metrics.jsonl").read()] == [
        0,
        10,
    ]


def test_torn_metrics_line_is_ignored(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.append({"step": 0, "x": 1.0})
    with open(log.path, "a") as fh:
        fh.write('{"step": 1, "x"')
    assert log.read() == [{"step": 0, "x": 1.0}]
    log.truncate(before_step=5)
    assert log.path.read_text() == '{"step": 0, "x": 1.0}\n'


# ------------------------------------------------------------------ optimizers
@pytest.mark.parametrize(
    "optim",
    [
        {"name": "gd", "lr": 0.1},
        {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
    ],
)
def test_stability_thresholds_against_real_optimizers(optim):
    """On f(x) = lambda x^2 / 2 the optimizer stays bounded just below the
    threshold and blows up just above it."""
    cfg = OptimConfig(**optim)
    threshold, _ = stability_threshold(cfg, cfg.lr)

    def final(lam):
        x = torch.ones(1, requires_grad=True, dtype=torch.float64)
        opt = torch.optim.SGD(
            [x], lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov
        )
        for _ in range(3000):
            opt.zero_grad()
            (0.5 * lam * x**2).sum().backward()
            opt.step()
        return abs(x.item())

    assert final(0.99 * threshold) < 1
    assert final(1.01 * threshold) > 1e3


def test_adam_preconditioned_sharpness_against_dense(tmp_path):
    res = lg.train(
        small(optim={"name": "adam", "lr": 0.01, "momentum": 0}, steps=20),
        tmp_path / "adam",
    )
    last = res.metrics[-1]
    assert last["eos_formula"] == "(2 + 2 beta1) / ((1 - beta1) eta)"
    # rebuild P from the final checkpoint's optimizer state
    from lossgeom.train import latest_checkpoint, load_checkpoint

    model = res.model
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    load_checkpoint(
        latest_checkpoint(res.run_dir / "checkpoints"), model, opt, restore_rng=False
    )
    X, y = lg.zoo.dataset("digits", subset=256, seed=0)
    idx = torch.randperm(256, generator=torch.Generator().manual_seed(2))[:128]
    obj = lg.Objective(
        model,
        torch.nn.CrossEntropyLoss(),
        (X[idx].flatten(1), y[idx]),
        dtype=torch.float64,
    )
    H = lg.testing.exact_hessian(obj)
    p = torch.cat(
        [
            (opt.state[q]["exp_avg_sq"] / (1 - 0.999 ** float(opt.state[q]["step"])))
            .sqrt()
            .add(1e-8)
            .reshape(-1)
            for q in model.parameters()
        ]
    ).double()
    top = torch.linalg.eigvalsh(H / p.sqrt()[:, None] / p.sqrt()[None, :])[-1].item()
    assert abs(last["preconditioned_sharpness"] - top) <= 2e-3 * top
    assert math.isclose(last["eos_ratio"], top / last["eos_threshold"], rel_tol=3e-3)


def test_adaptive_step_size_is_c_over_lambda_max(tmp_path):
    res = lg.train(
        small(
            optim={
                "name": "gd",
                "lr": 0.1,
                "momentum": 0,
                "adaptive": {"c": 1.0, "every": 10},
            },
            metrics={
                "every": 10,
                "trace_max_matvecs": 0,
                "sharpness_tol": 1e-6,
                "sharpness_max_matvecs": 200,
            },
        ),
        tmp_path / "ad",
    )
    rows = res.metrics
    # the logged lr at step s is the one update s used: c / lambda_max measured at
    # step s (refreshed there); the final row's is the last update's (step 30's)
    for row in rows[:-1]:
        assert math.isclose(row["lr"] * row["sharpness"], 1.0, rel_tol=1e-3)
    assert math.isclose(rows[-1]["lr"] * rows[-2]["sharpness"], 1.0, rel_tol=1e-3)


def test_schedules():
    cfg = load_config(small(steps=100, schedule={"kind": "cosine", "warmup_steps": 10}))
    f = [schedule_factor(cfg, s) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[-1] < 0.01
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    cfg = load_config(
        small(steps=100, schedule={"kind": "step", "step_size": 30, "gamma": 0.5})
    )
    assert [schedule_factor(cfg, s) for s in (0, 29, 30, 60, 99)] == [
        1,
        1,
        0.5,
        0.25,
        0.125,
    ]


def test_augment_crops_and_flips():
    X = torch.randn(64, 3, 6, 6)
    gen = torch.Generator().manual_seed(0)
    out = augment(X, 2, True, gen)
    assert out.shape == X.shape
    padded = torch.nn.functional.pad(X, (2, 2, 2, 2))
    for i in range(64):
        hits = [
            (dy, dx, fl)
            for dy in range(5)
            for dx in range(5)
            for fl in (False, True)
            if torch.equal(
                out[i],
                (lambda w: w.flip(-1) if fl else w)(
                    padded[i, :, dy : dy + 6, dx : dx + 6]
                ),
            )
        ]
        assert hits, i
    flips = augment(X, 0, True, torch.Generator().manual_seed(1))
    flipped = [torch.equal(flips[i], X[i].flip(-1)) for i in range(64)]
    assert 16 < sum(flipped) < 48
    with pytest.raises(ValueError, match=r"\(n, C, H, W\)"):
        augment(torch.randn(4, 64), 1, True, gen)


def test_gradient_checkpointing_and_bf16(tmp_path):
    base = lg.train(
        small(steps=10, metrics={"every": 10, "trace_max_matvecs": 0}), tmp_path / "a"
    )
    ckpt = lg.train(
        small(
            steps=10,
            grad_checkpointing=True,
            metrics={"every": 10, "trace_max_matvecs": 0},
        ),
        tmp_path / "b",
    )
    for (k, v), w in zip(
        base.model.state_dict().items(), ckpt.model.state_dict().values(), strict=True
    ):
        assert torch.allclose(v, w, atol=1e-6), k
    bf = lg.train(small(steps=40, bf16=True), tmp_path / "c")
    assert bf.status == "finished"
    assert bf.metrics[-1]["train_loss"] < 0.8 * bf.metrics[0]["train_loss"]


def test_cli_train(tmp_path):
    from typer.testing import CliRunner

    from lossgeom.cli import app

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(small(steps=10)))
    res = CliRunner().invoke(
        app, ["train", str(path), "--out", str(tmp_path / "o"), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert "finished at step 10" in res.output
    path.write_text(yaml.safe_dump(small(optim={"lr": 0})))
    res = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "optim.lr" in res.output


def test_domain_shifted_test_split(tmp_path):
    plain = lg.train(small(steps=20), tmp_path / "a")
    shifted = lg.train(
        small(steps=20, data={"shift": {"kind": "noise", "severity": 2.0}}),
        tmp_path / "b",
    )
    a, b = plain.metrics[-1], shifted.metrics[-1]
    assert a["train_loss"] == b["train_loss"]  # same training
    assert b["test_loss"] > a["test_loss"]  # worse under shift
    with pytest.raises(ConfigError, match="data.shift.kind"):
        lg.train(small(data={"shift": {"kind": "blur", "severity": 1}}), tmp_path / "c")


def test_keep_last_prunes_periodic_checkpoints_only(tmp_path):
    res = lg.train(
        small(
            metrics={"every": 40, "trace_max_matvecs": 0},
            checkpoint={"every": 10, "steps": [15], "keep_last": 1},
        ),
        tmp_path / "k",
    )
    names = sorted(p.stem for p in (res.run_dir / "checkpoints").glob("*.json"))
    assert names == ["step_0000015", "step_0000030", "step_0000040"]
    assert all(
        (res.run_dir / "checkpoints" / f"{n}.safetensors").is_file() for n in names
    )


def test_bad_or_unavailable_device_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a torch device"):
        lg.train(small(device="gpu0"), tmp_path / "r")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="does not have; set device: cpu"):
            lg.train(small(device="cuda"), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_checkpoint_states_give_a_trajectory(tmp_path):
    run = tmp_path / "run"
    cfg = {
        "model": {"name": "mlp", "options": {"width": 8}},
        "data": {"name": "digits", "subset": 128},
        "steps": 30,
        "metrics": None,
        "checkpoint": {"every": 10},
    }
    lg.train(cfg, run)
    states = lg.train.checkpoint_states(run)
    assert [s for s, _ in states] == [10, 20, 30]
    model = lg.zoo.model("mlp", width=8)
    assert set(states[-1][1]) == set(model.state_dict())
    model.load_state_dict(states[-1][1])
    X, y = lg.zoo.digits("train")
    obj = lg.Objective(model, torch.nn.CrossEntropyLoss(), (X[:64], y[:64]))
    pca = lg.pca_directions(obj, [s for _, s in states], 2)
    assert pca.coords.shape == (3, 2) and float(pca.residuals[-1]) == 0.0
    with pytest.raises(FileNotFoundError, match="checkpoint.every"):
        lg.train.checkpoint_states(tmp_path / "nothing")


def test_measures_run_as_callbacks(tmp_path):
    cfg = {
        "model": {"name": "mlp", "options": {"width": 8}},
        "data": {"name": "digits", "subset": 128},
        "steps": 30,
        "metrics": {
            "every": 10,
            "sharpness": False,
            "probe_samples": 64,
            "measures": [
                {
                    "name": "effective_rank",
                    "options": {"n_probes": 4, "lanczos_steps": 12},
                },
                {
                    "name": "logdet",
                    "options": {"shift": 1e3, "n_probes": 4},
                    "every": 20,
                },
                {
                    "name": "condition_number",
                    "options": {"positive_part": True, "threshold": 2.0},
                    "every": 30,
                },
                {
                    "name": "sharpness",
                    "options": {"radius": 0.05, "steps": 3, "restarts": 1},
                    "every": 30,
                },
                {"name": "noise_scale", "every": 30},
            ],
        },
    }
    res = lg.train(cfg, tmp_path / "run")
    rows = {r["step"]: r for r in res.metrics}
    assert sorted(rows) == [0, 10, 20, 30]
    for step, row in rows.items():
        assert row["effective_rank"] > 1 and row["effective_rank_stderr"] >= 0
        assert row["effective_rank_seconds"] > 0
        # every 20 steps, and at the last step
        assert ("logdet" in row) == (step in (0, 20, 30))
    # A measure that fails at a step is recorded there; training goes on.
    assert rows[30]["condition_number"] is None
    assert "threshold must be in (0, 1)" in rows[30]["condition_number_failed"]
    # Measures with kinds write <name>_<kind>; the noise scale has its error bar.
    assert rows[30]["sharpness_worst"] >= 0 and "sharpness_worst" not in rows[10]
    assert rows[30]["noise_scale"] > 0 and "noise_scale_seconds" in rows[30]
    missing = dict(cfg, metrics={"measures": [{"name": "sharpness"}]})
    with pytest.raises(ConfigError, match="radius"):
        lg.train(missing, tmp_path / "missing")
    clash = dict(cfg, metrics={"measures": [{"name": "logdet", "key": "trace"}]})
    with pytest.raises(ConfigError, match="built-in metric"):
        lg.train(clash, tmp_path / "clash")
    assert res.status == "finished"
    bad = dict(cfg, metrics={"measures": [{"name": "sharpnes"}]})
    with pytest.raises(ConfigError, match="unknown measure 'sharpnes'"):
        lg.train(bad, tmp_path / "bad")
    bad = dict(cfg, metrics={"measures": [{"name": "logdet", "options": {"shfit": 1}}]})
    with pytest.raises(ConfigError, match="no options \\['shfit'\\]"):
        lg.train(bad, tmp_path / "bad2")


def test_update_dimension_is_tracked_while_training(tmp_path):
    cfg = {
        "model": {"name": "mlp", "options": {"width": 8}},
        "data": {"name": "digits", "subset": 128},
        "steps": 40,
        "metrics": {
            "every": 20,
            "sharpness": False,
            "update_dimension": {"record_every": 2, "max_vectors": 15},
        },
    }
    res = lg.train(cfg, tmp_path / "run")
    rows = {r["step"]: r for r in res.metrics}
    assert rows[0]["update_dimension"] is None  # nothing recorded yet
    assert rows[20]["update_dimension_vectors"] == 10
    assert rows[40]["update_dimension_vectors"] == 15  # the window
    for step in (20, 40):
        dim = rows[step]["update_dimension"]
        assert 1 <= dim <= rows[step]["update_dimension_vectors"]
    with pytest.raises(ConfigError, match="threshold"):
        lg.train(
            dict(cfg, metrics={"update_dimension": {"threshold": 1.5}}), tmp_path / "b"
        )


# ------------------------------------------------------------------ callbacks
class Recorder(lg.train.Callback):
    """Every hook call with its step, and what the state held at it."""

    def __init__(self):
        self.events: list[tuple] = []
        self.rows: list[dict] = []
        self.updates: list[tuple[float, float]] = []

    def on_train_start(self, state):
        self.events.append(("start", state.step))

    def on_step(self, state):
        assert state.row is None and state.hessian is None
        self.events.append(("step", state.step))
        self.updates.append((state.lr, state.batch_loss))

    def on_eval(self, state):
        self.events.append(("eval", state.step))
        self.rows.append(dict(state.row))

    def on_train_end(self, state):
        final = state.run_dir / "checkpoints" / f"step_{state.step:07d}.json"
        status = json.loads((state.run_dir / "status.json").read_text())["status"]
        self.events.append(("end", state.step, state.status, final.is_file(), status))


def expected_events(start: int, steps: int, every: int) -> list[tuple]:
    """The documented hook order of a run that finishes."""
    events: list[tuple] = [("start", start)]
    for s in range(start, steps):
        if s % every == 0:
            events.append(("eval", s))
        events.append(("step", s + 1))
    return [*events, ("eval", steps), ("end", steps, "finished", True, "running")]


class WeightNorm(lg.train.Callback):
    def on_eval(self, state):
        flat = torch.cat([p.detach().flatten() for p in state.model.parameters()])
        state.row["weight_norm"] = float(flat.norm())


def test_user_callbacks_see_the_hooks_in_order(run, tmp_path):
    rec = Recorder()
    res = lg.train(small(), tmp_path / "r", callbacks=[rec])
    assert rec.events == expected_events(0, 40, 10)
    assert sum(e[0] == "step" for e in rec.events) == 40
    assert sum(e[0] == "eval" for e in rec.events) == 5
    # user callbacks run after the built-in ones: the row holds their columns
    for row, written in zip(rec.rows, res.metrics, strict=True):
        assert row == written
    assert all(lr == 0.1 and math.isfinite(loss) for lr, loss in rec.updates)
    assert [r["batch_loss"] for r in rec.rows[1:]] == [
        rec.updates[s - 1][1] for s in (10, 20, 30, 40)
    ]
    # a callback that only reads changes nothing
    assert numbers(res.metrics) == numbers(run.metrics)
    for k, v in weights(run).items():
        assert torch.equal(v, res.model.state_dict()[k]), k


def test_user_callbacks_after_a_resume_and_on_a_finished_run(run, tmp_path):
    crashed = tmp_path / "crashed"
    shutil.copytree(run.run_dir, crashed)
    for suffix in (".json", ".safetensors"):
        (crashed / "checkpoints" / f"step_0000040{suffix}").unlink()
    (crashed / "status.json").write_text(json.dumps({"status": "running", "step": 33}))
    rec = Recorder()
    res = lg.train(small(), crashed, callbacks=[rec])
    assert res.resumed_from == 20
    assert rec.events == expected_events(20, 40, 10)
    assert numbers(res.metrics) == numbers(run.metrics)
    done = Recorder()
    lg.train(small(), crashed, callbacks=[done])
    assert done.events == []  # nothing to do: no hook fires


def test_a_user_callback_adds_a_metrics_column(run, tmp_path):
    res = lg.train(small(), tmp_path / "w", callbacks=[WeightNorm()])
    rows = MetricsLog(res.run_dir / "metrics.jsonl").read()
    assert [r["step"] for r in rows] == [0, 10, 20, 30, 40]
    assert all(isinstance(r["weight_norm"], float) for r in rows)
    final = torch.cat([p.detach().flatten() for p in res.model.parameters()])
    assert rows[-1]["weight_norm"] == float(final.norm())
    without = [{k: v for k, v in r.items() if k != "weight_norm"} for r in rows]
    assert numbers(without) == numbers(run.metrics)


def test_bad_callbacks_are_clear_errors(tmp_path):
    for callbacks, match in (
        (WeightNorm(), "a list of Callback instances"),
        ([WeightNorm], r"pass WeightNorm\(\) instead"),
        ([lambda state: None], "has no hooks"),
    ):
        with pytest.raises(TypeError, match=match):
            lg.train(small(), tmp_path / "r", callbacks=callbacks)
        assert not (tmp_path / "r").exists()

    class Overwrites(lg.train.Callback):
        def on_eval(self, state):
            state.row["sharpness"] = 0.0

    with pytest.raises(ValueError, match=r"changed or removed .*\['sharpness'\]"):
        lg.train(small(), tmp_path / "o", callbacks=[Overwrites()])

    class NotJSON(lg.train.Callback):
        def on_eval(self, state):
            state.row["model"] = state.model

    with pytest.raises(TypeError, match="column 'model' holding Sequential"):
        lg.train(small(), tmp_path / "j", callbacks=[NotJSON()])


def test_divergence_reaches_the_callbacks(tmp_path):
    class FailsAt20(Recorder):
        def on_eval(self, state):
            super().on_eval(state)
            if state.step == 20:
                raise lg.NonFiniteError("a probe met NaN")

    rec = FailsAt20()
    res = lg.train(small(), tmp_path / "probe", callbacks=[rec])
    assert res.status == "diverged" and res.step == 20
    assert rec.events[-2:] == [("eval", 20), ("end", 20, "diverged", True, "diverged")]
    assert [r["step"] for r in res.metrics] == [0, 10]  # the failed row is not written
    status = json.loads((tmp_path / "probe" / "status.json").read_text())
    assert status["reason"] == "a probe met NaN"

    rec = Recorder()
    res = lg.train(
        small(optim={"name": "gd", "lr": 1e4, "momentum": 0}, steps=200, loss="mse"),
        tmp_path / "loss",
        callbacks=[rec],
    )
    assert res.status == "diverged"
    steps = [e[1] for e in rec.events if e[0] == "step"]
    assert steps == list(range(1, res.step + 1))  # no hook for the failed update
    assert rec.events[-1][:3] == ("end", res.step, "diverged")
