"""Studies under faults: failing runs, killed workers, a coordinator killed at random."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import lossgeom as lg

BASE = {
    "model": {"name": "mlp", "options": {"width": 16}},
    "data": {"name": "digits", "subset": 256},
    "optim": {"name": "sgd", "lr": 0.1},
    "steps": 60,
    "batch_size": 32,
    "metrics": {"every": 10, "sharpness": False, "eval_samples": 256},
    "checkpoint": {"every": 10},
}


def _cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "lossgeom", "study", *args],
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def test_a_failing_run_is_recorded_and_the_study_goes_on(tmp_path):
    spec = {
        "name": "faults",
        "base": BASE,
        # width 4 has 310 parameters: asking for 500 eigenvalues raises at the end;
        # lr 1e4 diverges (a result, not a failure)
        "zip": [
            {
                "model.options.width": [16, 4, 16],
                "model.options.activation": ["tanh", "tanh", "relu"],
                "optim.lr": [0.1, 0.1, 1e4],
            }
        ],
        "probes": [
            {
                "name": "eigenvalues",
                "options": {"k": 500, "tol": 1e-2, "max_matvecs": 40},
            }
        ],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    proc = _cli("run", str(path), "--out", str(out), "--jobs", "2")
    assert proc.returncode == 3, proc.stderr
    status = lg.study.status(out)
    assert status.counts == {"finished": 1, "failed": 1, "diverged": 1}
    (failure,) = status.failures
    assert "ValueError" in failure["error"]
    assert "error.txt" in os.listdir(failure["run_dir"])
    assert "Traceback" in (Path(failure["run_dir"]) / "error.txt").read_text()
    assert "failed" in proc.stdout and failure["run_id"] in proc.stdout
    # again: the failed run is not retried unless asked
    assert _cli("run", str(path), "--out", str(out)).returncode == 3
    runs = lg.study.runs(out).set_index("run_id")
    assert runs.loc[failure["run_id"], "attempts"] == 1
    assert _cli("run", str(path), "--out", str(out), "--retry-failed").returncode == 3
    runs = lg.study.runs(out).set_index("run_id")
    assert runs.loc[failure["run_id"], "attempts"] == 2
    assert sorted(runs["attempts"]) == [1, 1, 2]


def _study_file(tmp_path, steps=60, seeds=(0, 1)):
    spec = {
        "name": "kills",
        "base": {**BASE, "steps": steps},
        "grid": {"batch_size": [16, 64]},
        "seeds": list(seeds),
        "probes": [
            {"name": "trace", "options": {"max_matvecs": 10}, "at": {"every": 20}}
        ],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_orphans(out: Path, timeout: float = 120) -> None:
    """Wait until no worker of a killed coordinator still runs."""
    end = time.time() + timeout
    for w in out.glob("runs/*/worker.json"):
        pid = json.loads(w.read_text())["pid"]
        while _pid_alive(pid) and time.time() < end:
            time.sleep(0.1)


def check_index_against_run_directories(out: Path) -> None:
    """Every run's index rows equal its directory's rows; nothing twice."""
    con = sqlite3.connect(out / "index.sqlite")
    runs = con.execute("SELECT run_id, run_dir, status FROM runs").fetchall()
    for run_id, run_dir, status in runs:
        d = out / run_dir
        assert json.loads((d / "status.json").read_text())["status"] == status
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows]
        assert steps == sorted(set(steps)), f"{d}: rows repeated after resumes: {steps}"
        expected = {
            (r["step"], k)
            for r in rows
            for k in r
            if k != "step" and not k.endswith("_stderr")
        }
        indexed = con.execute(
            "SELECT step, key FROM metrics WHERE run_id=? AND source='metrics'",
            (run_id,),
        ).fetchall()
        assert len(indexed) == len(set(indexed)) == len(expected)
        assert set(indexed) == expected
        probes = [json.loads(x) for x in (d / "probes.jsonl").read_text().splitlines()]
        keys = [(p["step"], p["key"]) for p in probes]
        assert len(keys) == len(set(keys)), f"{d}: a probe ran twice"
        n_probe_rows = con.execute(
            "SELECT COUNT(*) FROM metrics WHERE run_id=? AND source='probe' AND key=?",
            (run_id, "trace"),
        ).fetchone()[0]
        assert n_probe_rows == len(probes)
    con.close()


def _run_command(path: Path, out: Path) -> list[str]:
    """``lossgeom study run`` of a study file with two jobs, as a command."""
    return [
        sys.executable,
        "-m",
        "lossgeom",
        "study",
        "run",
        str(path),
        "--out",
        str(out),
        "--jobs",
        "2",
    ]


def _kill_coordinator_at_random(tmp_path, seed: int, kills: int) -> Path:
    path = _study_file(tmp_path)
    out = tmp_path / "out"
    rng = random.Random(seed)
    cmd = _run_command(path, out)
    for _ in range(kills):
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(0.5, 6.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if rng.random() < 0.5:  # sometimes its workers die too (a node lost)
            for w in out.glob("runs/*/worker.json"):
                try:
                    os.kill(json.loads(w.read_text())["pid"], signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
    final = _cli("run", str(path), "--out", str(out), "--jobs", "2")
    assert final.returncode == 0, final.stderr
    _wait_orphans(out)
    return out


def test_kill_9_of_the_coordinator_loses_nothing_and_duplicates_nothing(tmp_path):
    out = _kill_coordinator_at_random(tmp_path, seed=0, kills=3)
    assert lg.study.status(out).counts == {"finished": 4}
    check_index_against_run_directories(out)
    # the runs resumed to the same result as one never interrupted
    run = lg.study.runs(out).iloc[0]
    fresh = lg.train(
        json.loads(json.dumps(lg.study.load_study(out / "study.yaml").runs[0].config)),
        tmp_path / "fresh",
    )
    rows = [
        json.loads(x)
        for x in (Path(run.run_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[-1]["train_loss"] == fresh.metrics[-1]["train_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_random_moments_many_times(tmp_path, seed):
    out = _kill_coordinator_at_random(tmp_path, seed=seed, kills=8)
    assert lg.study.status(out).counts == {"finished": 4}
    check_index_against_run_directories(out)


def test_a_killed_worker_is_recorded_and_resumes_only_when_asked(tmp_path):
    path = _study_file(tmp_path, steps=400, seeds=(0,))
    out = tmp_path / "out"
    cmd = _run_command(path, out)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    victim = None
    end = time.time() + 120
    while victim is None and time.time() < end:
        for d in out.glob("runs/*"):
            ckpts = (
                list((d / "checkpoints").glob("step_*.json"))
                if (d / "checkpoints").is_dir()
                else []
            )
            if (d / "worker.json").is_file() and len(ckpts) >= 2:
                victim = d
                break
        time.sleep(0.05)
    assert victim is not None
    os.kill(json.loads((victim / "worker.json").read_text())["pid"], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 3, stderr
    status = lg.study.status(out)
    assert status.counts == {"finished": 1, "failed": 1}
    assert "killed by SIGKILL" in status.failures[0]["error"]
    assert status.failures[0]["run_dir"].endswith(victim.name)
    # not retried without the flag; resumed from its checkpoint with it
    assert _cli("run", str(path), "--out", str(out)).returncode == 3
    again = _cli("run", str(path), "--out", str(out), "--retry-failed")
    assert again.returncode == 0, again.stderr
    assert lg.study.status(out).counts == {"finished": 2}
    events = (victim / "status.json").read_text()
    assert json.loads(events)["status"] == "finished"
    check_index_against_run_directories(out)
