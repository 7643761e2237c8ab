"""Training under faults: damaged files, two writers, kills, full or read-only disks.

Everything here is real: real files damaged byte by byte, real processes killed
with SIGKILL, real file locks, real (tmpfs) file systems.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lossgeom as lg
from lossgeom.train import ConfigError, DamagedFileError, MetricsLog, load_config
from lossgeom.train._state import read_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny(**over) -> dict:
    """A 64-8-10 MLP on 128 digits: 20 steps, a row every 2, a checkpoint every 5."""
    cfg = {
        "name": "tiny",
        "model": {"name": "mlp", "options": {"width": 8, "depth": 1}},
        "data": {"name": "digits", "subset": 128, "test_subset": 64},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "steps": 20,
        "batch_size": 32,
        "metrics": {"every": 2, "probe_samples": 64, "sharpness": False},
        "checkpoint": {"every": 5},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def numbers(rows) -> list[dict]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from lossgeom.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=120,
    )


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "from lossgeom.cli import main; main()", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=ENV,
    )


def wait_for(predicate, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def last_logged_step(run_dir: Path) -> int:
    """The step of the last complete row of ``metrics.jsonl`` (-1: none yet)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return -1
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return -1


def is_running(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "status.json").read_text())["status"] == "running"
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted run of ``tiny()``."""
    return lg.train(tiny(), tmp_path_factory.mktemp("whole") / "r")


def copy_run(whole, dst: Path) -> Path:
    shutil.copytree(whole.run_dir, dst)
    (dst / "run.lock").unlink(missing_ok=True)
    return dst


# ------------------------------------------------------- 1. damaged checkpoints
def test_damaged_checkpoints_are_refused_by_name_and_resume_falls_back(whole, tmp_path):
    run = copy_run(whole, tmp_path / "run")
    ck = run / "checkpoints"
    # bytes flipped in the data section of the newest checkpoint
    weights = ck / "step_0000020.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-40:-8] = bytes(b ^ 0xFF for b in raw[-40:-8])
    weights.write_bytes(bytes(raw))
    with pytest.raises(DamagedFileError, match="step_0000020.safetensors"):
        read_checkpoint(ck / "step_0000020.json")
    # an older step's weights copied over a newer one's
    shutil.copy(ck / "step_0000005.safetensors", ck / "step_0000015.safetensors")
    with pytest.raises(DamagedFileError, match="mixes two saves"):
        read_checkpoint(ck / "step_0000015.json")
    with pytest.warns(RuntimeWarning, match="step_0000020.json, step_0000015.json"):
        res = lg.train(tiny(), run)
    assert res.status == "finished" and res.resumed_from == 10
    assert same_weights(res.model.state_dict(), whole.model.state_dict())
    assert numbers(res.metrics) == numbers(whole.metrics)
    events = (run / "events.log").read_text()
    assert "step_0000020.json" in events and "step_0000015.json" in events
    # the new checkpoints verify again
    read_checkpoint(ck / "step_0000020.json")


def test_truncated_edited_or_renamed_checkpoints_name_the_file(whole, tmp_path):
    run = copy_run(whole, tmp_path / "run")
    ck = run / "checkpoints"
    weights = ck / "step_0000010.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(DamagedFileError, match="step_0000010.safetensors"):
        read_checkpoint(ck / "step_0000010.json")
    # the sidecar's step edited by hand
    side = ck / "step_0000015.json"
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "step": 14}))
    with pytest.raises(DamagedFileError, match="step_0000015.json"):
        read_checkpoint(side)
    # ... even with its checksum made to match: the file name says 15
    from lossgeom._io import record_sha256

    forged = {**meta, "step": 14}
    forged["sha256"] = record_sha256(forged)
    side.write_text(json.dumps(forged))
    with pytest.raises(DamagedFileError, match="file name"):
        read_checkpoint(side)
    # a whole checkpoint renamed to another step
    for suffix in (".json", ".safetensors"):
        (ck / f"step_0000005{suffix}").rename(ck / f"step_0000007{suffix}")
    with pytest.raises(DamagedFileError, match="step_0000007.json"):
        read_checkpoint(ck / "step_0000007.json")
    # a garbage RNG state (checksum made to match) is refused before use
    side = ck / "step_0000020.json"
    meta = json.loads(side.read_text())
    meta["rng"]["torch"] = "bm90IGFuIFJORyBzdGF0ZQ=="
    meta["sha256"] = record_sha256(meta)
    side.write_text(json.dumps(meta))
    with pytest.raises(DamagedFileError, match="RNG state"):
        read_checkpoint(side)
    # nothing verifies: the run starts again from step 0, saying so
    with pytest.warns(RuntimeWarning, match="resuming from the start"):
        res = lg.train(tiny(), run)
    assert res.status == "finished" and res.resumed_from is None
    assert same_weights(res.model.state_dict(), whole.model.state_dict())


# -------------------------------------------------------------- 2. one writer
def test_a_second_writer_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    cfg = tiny(steps=400, metrics={"every": 10}, checkpoint={"every": 20})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "s"
    first = start_cli("train", str(path), "--out", str(out), "--quiet")
    try:
        wait_for(lambda: (out / "checkpoints" / "step_0000020.json").is_file(), first)
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock while the second tries
        second = cli("train", str(path), "--out", str(out), "--quiet")
        assert first.poll() is None
        assert second.returncode == 5, second.stderr
        assert f"{out} is in use" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL
    res = lg.train(path, out)  # the kernel released the lock
    assert res.status == "finished" and res.resumed_from >= 20
    steps = [r["step"] for r in MetricsLog(out / "metrics.jsonl").read()]
    assert steps == list(range(0, 401, 10))


# ------------------------------------------------------------ 3. metrics lines
def test_a_damaged_metrics_line_loses_no_other_row(whole, tmp_path):
    run = copy_run(whole, tmp_path / "run")
    log = MetricsLog(run / "metrics.jsonl")
    lines = log.path.read_text().splitlines(keepends=True)
    assert len(lines) == 11
    lines[3] = '{"step": 6, "train_lo\x00ss": 1.\n'
    log.path.write_text("".join(lines))
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl line 4 is damaged"):
        rows = log.read()
    assert [r["step"] for r in rows] == [0, 2, 4, 8, 10, 12, 14, 16, 18, 20]
    # resume from step 15: rows before it stay, the damaged line is set aside
    for suffix in (".json", ".safetensors"):
        (run / "checkpoints" / f"step_0000020{suffix}").unlink()
    (run / "status.json").write_text(json.dumps({"status": "running", "step": 17}))
    with pytest.warns(RuntimeWarning, match="line 4"):
        res = lg.train(tiny(), run)
    assert res.resumed_from == 15
    expected = [r for r in numbers(whole.metrics) if r["step"] != 6]
    assert numbers(res.metrics) == expected
    assert "train_lo" in (run / "metrics.jsonl.damaged").read_text()
    # a torn last line (a kill mid-write) is dropped quietly
    with open(log.path, "a") as fh:
        fh.write('{"step": 22, "x"')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["step"] for r in log.read()][-1] == 20
        log.truncate(before_step=30)
    assert log.path.read_text().endswith("\n") and len(log.read()) == 10


# ---------------------------------------------------------------- 4. failures
def test_failures_leave_a_failed_status_and_one_clear_line(tmp_path):
    # a non-finite number is a config error, before any work
    path = tmp_path / "inf.yaml"
    path.write_text(yaml.safe_dump(tiny()).replace("lr: 0.1", "lr: .inf"))
    res = cli("train", str(path), "--out", str(tmp_path / "inf"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("config error:") and "optim.lr" in res.stderr
    assert "finite" in res.stderr and not (tmp_path / "inf").exists()
    # --out naming a file
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny()))
    (tmp_path / "afile").write_text("x")
    res = cli("train", str(path), "--out", str(tmp_path / "afile"))
    assert res.returncode == 6 and res.stderr.startswith("I/O error:")
    assert "afile" in res.stderr and "Traceback" not in res.stderr

    # an error while training: status failed, traceback in error.txt
    class Fails(lg.train.Callback):
        def on_step(self, state):
            if state.step == 7:
                raise RuntimeError("the probe broke")

    run = tmp_path / "fails"
    with pytest.raises(RuntimeError, match="the probe broke") as info:
        lg.train(tiny(), run, callbacks=[Fails()])
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and status["step"] == 7
    assert status["error"] == {"type": "RuntimeError", "message": "the probe broke"}
    assert "the probe broke" in (run / status["traceback"]).read_text()
    assert info.value.traceback_file == run / "error.txt"
    # it resumes from its last checkpoint
    assert lg.train(tiny(), run).resumed_from == 5


def root_mount(*args: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount is not permitted here: {done.stderr.strip()}")


def test_a_full_disk_fails_clearly(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    root_mount("-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk))
    try:
        path = tmp_path / "cfg.yaml"
        cfg = tiny(model={"options": {"width": 256}}, checkpoint={"every": 2})
        path.write_text(yaml.safe_dump(cfg))
        res = cli("train", str(path), "--out", str(disk / "run"), "--quiet")
        assert res.returncode == 6, res.stderr
        assert res.stderr.startswith("I/O error:") and "No space left" in res.stderr
        assert "Traceback" not in res.stderr
        assert f"traceback: {disk / 'run' / 'error.txt'}" in res.stderr
        status = json.loads((disk / "run" / "status.json").read_text())
        assert status["status"] == "failed" and status["error"]["type"] == "OSError"
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_read_only_run_directory_fails_clearly(whole, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    root_mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk))
    try:
        run = copy_run(whole, disk / "run")
        (run / "status.json").write_text(json.dumps({"status": "running", "step": 3}))
        done = subprocess.run(
            ["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"remounting read-only is not permitted: {done.stderr}")
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(tiny()))
        res = cli("train", str(path), "--out", str(run), "--quiet")
        assert res.returncode == 6, res.stderr
        assert res.stderr.startswith("I/O error:") and "Read-only" in res.stderr
        assert "Traceback" not in res.stderr
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# --------------------------------------------------------- 5. damaged files
def test_damaged_run_files_are_named(whole, tmp_path):
    run = copy_run(whole, tmp_path / "run")
    side = run / "checkpoints" / "step_0000020.json"
    side.write_text(side.read_text()[:200])
    with pytest.raises(DamagedFileError, match="step_0000020.json.*not valid JSON"):
        read_checkpoint(side)
    (run / "status.json").write_text('{"status": "fini')
    with pytest.raises(DamagedFileError, match=r"status.json.*Delete"):
        lg.train(tiny(), run)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny()))
    res = cli("train", str(path), "--out", str(run), "--quiet")
    assert res.returncode == 4 and res.stderr.startswith("damaged file:")
    assert "status.json" in res.stderr and "Traceback" not in res.stderr
    (run / "status.json").unlink()
    (run / "config.yaml").write_text("model: [unclosed")
    with pytest.raises(DamagedFileError, match="config.yaml"):
        lg.train(tiny(), run)


# ------------------------------------------------------- 6. no code from configs
def test_a_config_alone_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = {
        **tiny(),
        "model": {"factory": "os:system", "options": {"command": "touch PWNED"}},
    }
    with pytest.raises(ConfigError, match="allow_factory=True"):
        lg.train(evil, tmp_path / "r")
    with pytest.raises(ConfigError, match="allow_factory=True"):
        lg.train.build_model(evil)
    with pytest.raises(ConfigError, match="allow_factory"):
        lg.train({**evil, "allow_factory": True}, tmp_path / "r")
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(evil))
    res = cli("train", str(path), "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert res.returncode == 2 and "--allow-factory" in res.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "r").exists()
    # opting in runs a factory
    linear = {
        **tiny(),
        "model": {"factory": "torch.nn:Linear", "options": {"out_features": 10}},
    }
    res = lg.train(linear, tmp_path / "ok", allow_factory=True)
    assert res.status == "finished" and isinstance(res.model, torch.nn.Linear)


# --------------------------------------------------------------- 7. YAML quirks
def test_yaml_quirks_are_refused(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny(steps=True)))
    with pytest.raises(ConfigError, match=r"  steps: Input should be a valid integer"):
        load_config(path)
    for field, value in (("bf16", 1), ("seed", 1.0), ("steps", "20")):
        with pytest.raises(ConfigError, match=f"  {field}: "):
            load_config(tiny(**{field: value}))
    path.write_text(yaml.safe_dump(tiny()) + "steps: 30\n")
    with pytest.raises(ConfigError, match=r"'steps' appears twice \(lines \d+ and \d+"):
        load_config(path)
    path.write_text(yaml.safe_dump(tiny()).replace("lr: 0.1", "lr: 1e-3"))
    assert load_config(path).optim.lr == 0.001
    path.write_text(
        yaml.safe_dump(tiny()) + f"name: !!python/object/apply:os.system "
        f"['touch {tmp_path / 'PWNED'}']\n"
    )
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(ConfigError, match=r"model.options.width: must be a finite"):
        load_config(tiny(model={"options": {"width": float("nan")}}))


# -------------------------------------------------------------- 8. logged lr
def test_the_logged_lr_is_the_one_the_step_used(tmp_path):
    class Used(lg.train.Callback):
        def __init__(self):
            self.lrs = {}

        def on_step(self, state):
            self.lrs[state.step - 1] = state.lr

    used = Used()
    res = lg.train(
        tiny(
            optim={"name": "gd", "momentum": 0, "adaptive": {"c": 1.0, "every": 4}},
            metrics={"every": 2},
        ),
        tmp_path / "r",
        callbacks=[used],
    )
    for row in res.metrics[:-1]:
        assert row["lr"] == used.lrs[row["step"]], row["step"]
    assert res.metrics[-1]["lr"] == used.lrs[19]


# -------------------------------------------------- 9. SIGKILL at random times
def test_random_kills_resume_to_the_same_run(tmp_path):
    cfg = tiny(
        steps=160,
        metrics={"every": 4, "sharpness": True, "sharpness_max_matvecs": 20},
        checkpoint={"every": 8},
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    whole = lg.train(path, tmp_path / "whole")
    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    # Kill at seeded random steps spread over the run (each past the rows a
    # killed process left behind), then a seeded few milliseconds later, so the
    # kills land in probes, updates and checkpoint writes alike.
    for base in (16, 48, 80, 112, 140):
        target = base + rng.randrange(0, 8)
        proc = start_cli("train", str(path), "--out", str(out), "--quiet")
        try:
            wait_for(lambda t=target: last_logged_step(out) >= t, proc)
            time.sleep(rng.uniform(0.0, 0.02))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert kills == 5
    res = lg.train(path, out)
    assert res.status == "finished"
    assert same_weights(res.model.state_dict(), whole.model.state_dict())
    final = load_file(str(out / "checkpoints" / "step_0000160.safetensors"))
    assert same_weights(
        final,
        load_file(str(whole.run_dir / "checkpoints" / "step_0000160.safetensors")),
    )
    assert numbers(res.metrics) == numbers(whole.metrics)


# ------------------------------------------------------------------ 10. umask
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        res = lg.train(tiny(steps=10), tmp_path / "r")
    finally:
        os.umask(old)
    files = [p for p in res.run_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {
        "metrics.jsonl",
        "status.json",
        "config.yaml",
        "step_0000010.safetensors",
        "step_0000010.json",
    }
    for p in files:
        assert p.stat().st_mode & 0o777 == mode, p
