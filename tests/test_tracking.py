"""Tracking: every metrics row in TensorBoard event files and a W&B offline run.

The real packages write; the tests read their files back: TensorBoard's event
files with its ``EventAccumulator``, W&B's transaction log (``run-<id>.wandb``, a
LevelDB-style log of ``wandb_internal_pb2.Record`` protobufs) with the small
reader below, as wandb 0.31 ships no Python reader for it.
"""

import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import lossgeom as lg
from lossgeom.train import Callback, ConfigError, MetricsLog

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)
from wandb.proto import wandb_internal_pb2  # noqa: E402


def tiny(**over) -> dict:
    cfg = {
        "name": "tracked",
        "model": {"name": "mlp", "options": {"width": 16, "depth": 1}},
        "data": {"name": "digits", "subset": 256, "test_subset": 128},
        "optim": {"name": "sgd", "lr": 0.1},
        "steps": 20,
        "batch_size": 32,
        "metrics": {
            "every": 5,
            "probe_samples": 128,
            "sharpness": False,
            "update_dimension": {"max_vectors": 10},
        },
        "checkpoint": {"every": 5},
        "tracking": {"tensorboard": True, "wandb": "offline"},
    }
    cfg.update(over)
    return cfg


class Extra(Callback):
    """User columns: a float, an int, a string and a boolean."""

    def on_eval(self, state):
        state.row["user_norm"] = float(
            sum(p.detach().norm() for p in state.model.parameters())
        )
        state.row["user_count"] = state.step // 5
        state.row["user_tag"] = "x"
        state.row["user_flag"] = True


class FailAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step(self, state):
        if state.step == self.step:
            raise RuntimeError("boom")


def numbers(row: dict) -> dict:
    """What a tracker should get of a row: its numbers, ``step`` aside."""
    return {
        k: v
        for k, v in row.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    """An environment that would go online if anything ignored mode='offline'."""
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "online")
        mp.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.delenv("WANDB_ERROR_REPORTING", raising=False)
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(home / var.lower()))
        yield


# ------------------------------------------------------------------- readers
def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }


def wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` transaction log (LevelDB log format)."""
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk  # FULL/FIRST; MIDDLE/LAST
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def wandb_run(folder: Path, timeout: float = 10.0) -> dict:
    """A finished W&B offline run folder: its run record, history rows and exit.

    ``run.finish()`` returns before W&B's service has written the whole log (it
    completes it moments later, or when the process exits), so this waits for
    the exit record.
    """
    deadline = time.monotonic() + timeout
    while True:
        run = _read_wandb_run(folder)
        if run["exit"] is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.05)


def _read_wandb_run(folder: Path) -> dict:
    (log,) = folder.glob("run-*.wandb")
    out = {"history": [], "exit": None, "summary": {}}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            out["history"].append(row)
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(
                    item.value_json
                )
        elif kind == "exit":
            out["exit"] = record.exit
    return out


def wandb_folders(run_dir: Path) -> list[Path]:
    return sorted(
        (run_dir / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime
    )


def history_numbers(history: list[dict]) -> list[dict]:
    """History rows without W&B's own keys, keyed by step."""
    return [
        {"step": r["_step"], **{k: v for k, v in r.items() if not k.startswith("_")}}
        for r in history
    ]


# --------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def tracked(offline_env, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    return lg.train(tiny(), run_dir, callbacks=[Extra()])


def test_every_row_reaches_tensorboard_and_wandb(tracked):
    res = tracked
    rows = MetricsLog(res.run_dir / "metrics.jsonl").read()
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 20]
    assert {"user_norm", "user_count", "probe_seconds"} <= rows[-1].keys()
    assert rows[0]["update_dimension"] is None  # None is left out

    scalars = tensorboard_scalars(res.run_dir / "tensorboard")
    expected_tags = set().union(*(numbers(r) for r in rows))
    assert set(scalars) == expected_tags  # no strings, booleans or step
    for row in rows:
        for key, value in numbers(row).items():
            (event,) = [e for e in scalars[key] if e[0] == row["step"]]
            assert event[1] == np.float32(value), (key, row["step"])
    assert sum(len(v) for v in scalars.values()) == sum(len(numbers(r)) for r in rows)

    (folder,) = wandb_folders(res.run_dir)
    run = wandb_run(folder)
    assert history_numbers(run["history"]) == [
        {"step": r["step"], **numbers(r)} for r in rows
    ]
    assert run["run"].project == "lossgeom"
    assert run["run"].display_name == "tracked"
    assert run["run"].run_id == (res.run_dir / "wandb" / "run_id").read_text().strip()
    config = {
        u.key: json.loads(u.value_json) for u in run["run"].config.update
    }  # the resolved config, as plain values
    config.pop("_wandb")
    assert config == res.config
    assert run["exit"] is not None and run["exit"].exit_code == 0
    assert run["summary"]["status"] == "finished"


def test_wandb_stays_offline(tracked):
    (folder,) = wandb_folders(tracked.run_dir)
    assert folder.name.startswith("offline-run-")  # WANDB_MODE=online was ignored
    assert wandb_run(folder)["run"].telemetry.feature.offline
    assert os.environ["WANDB_ERROR_REPORTING"] == "false"  # no crash reports sent


def test_a_failed_call_finishes_its_wandb_run_and_resume_continues(
    offline_env, tmp_path, capfd
):
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom") as excinfo:
        lg.train(tiny(), run_dir, callbacks=[FailAt(12)])
    del excinfo  # the last reference to the loop and its callbacks: W&B finishes
    (first,) = wandb_folders(run_dir)
    failed = wandb_run(first)
    assert failed["exit"] is not None and failed["exit"].exit_code == 1
    assert failed["summary"]["status"] == "failed"
    assert [r["_step"] for r in failed["history"]] == [0, 5, 10]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"

    res = lg.train(tiny(), run_dir)  # resumes from the checkpoint at step 10
    assert res.status == "finished" and res.resumed_from == 10
    rows = MetricsLog(run_dir / "metrics.jsonl").read()
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 20]

    first_again, second = wandb_folders(run_dir)
    assert first_again == first
    resumed = wandb_run(second)
    assert resumed["run"].run_id == failed["run"].run_id  # one W&B run
    assert [r["_step"] for r in resumed["history"]] == [10, 15, 20]
    assert history_numbers(resumed["history"]) == [
        {"step": r["step"], **numbers(r)} for r in rows[2:]
    ]
    assert resumed["exit"].exit_code == 0
    lg.train(tiny(), run_dir)  # a finished run: no hook fires, no W&B run opens
    assert len(wandb_folders(run_dir)) == 2

    # TensorBoard: the second call purged the first one's steps >= 10.
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    for row in rows:
        for key, value in numbers(row).items():
            events = [e for e in scalars[key] if e[0] == row["step"]]
            assert events == [(row["step"], np.float32(value))], (key, row["step"])
    out, err = capfd.readouterr()
    assert "wandb" not in (out + err).lower()  # quiet


def test_the_users_own_wandb_run_is_left_alone(offline_env, tmp_path):
    import wandb

    mine = wandb.init(
        mode="offline",
        dir=str(tmp_path),
        project="mine",
        reinit="create_new",
        settings=wandb.Settings(silent=True, console="off"),
    )
    try:
        res = lg.train(tiny(tracking={"wandb": "offline"}), tmp_path / "run")
        assert res.status == "finished"
        mine.log({"still": 1.0})  # raises if our finish had finished it
    finally:
        mine.finish()
    (folder,) = (tmp_path / "wandb").glob("offline-run-*")
    assert wandb_run(folder)["history"][0]["still"] == 1.0


@pytest.mark.parametrize(
    ("package", "tracking", "command"),
    [
        ("tensorboard", {"tensorboard": True}, "pip install tensorboard"),
        ("wandb", {"wandb": "offline"}, "pip install wandb"),
    ],
)
def test_a_missing_package_is_a_clear_error_before_training(
    monkeypatch, tmp_path, package, tracking, command
):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` fails
    with pytest.raises(ConfigError, match=command) as info:
        lg.train(tiny(tracking=tracking), tmp_path / "run")
    assert f"tracking.{package}" in str(info.value)
    assert MetricsLog(tmp_path / "run" / "metrics.jsonl").read() == []
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_tracking_needs_metrics(tmp_path):
    with pytest.raises(ConfigError, match="'metrics' is null"):
        lg.train(tiny(metrics=None), tmp_path / "a")
    res = lg.train(tiny(metrics=None, tracking={}), tmp_path / "b")  # asks nothing
    assert res.status == "finished"
    assert not (tmp_path / "b" / "tensorboard").exists()
