"""SlurmExecutor against a real SLURM cluster (scripts/slurm-up starts one).

Skipped when no cluster answers, unless LOSSGEOM_REQUIRE_SLURM=1 (as in CI):
then a missing cluster fails the tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lossgeom.study._tasks import Task

TESTS = Path(__file__).resolve().parent
REQUIRED = os.environ.get("LOSSGEOM_REQUIRE_SLURM") == "1"
WAIT_S = 45  # the longest any test waits for its jobs


def _cluster_problem() -> str | None:
    """Why SLURM jobs cannot run here, or None when they can."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed"
    if shutil.which("sinfo") is None:
        return "sinfo is not on PATH (start a cluster with scripts/slurm-up)"
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 10 s"
    states = proc.stdout.split()
    if proc.returncode != 0 or not states:
        return f"no SLURM cluster answers (run scripts/slurm-up): {proc.stderr.strip()}"
    # A trailing * (idle*) means the node does not answer.
    if not set(states) & {"idle", "mixed", "allocated", "completing"}:
        return f"no SLURM node takes jobs (states: {' '.join(states)})"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    problem = _cluster_problem()
    if problem is not None:
        if REQUIRED:
            pytest.fail(f"LOSSGEOM_REQUIRE_SLURM=1 but {problem}", pytrace=False)
        pytest.skip(problem)


def _executor(tmp_path, **kwargs):
    from _slurm_work import work
    from lossgeom.study._slurm import SlurmExecutor

    kwargs.setdefault("time_min", 5)
    kwargs.setdefault("result_grace_s", 3.0)
    return SlurmExecutor(
        tmp_path / "slurm",
        work,
        setup=[f"export PYTHONPATH={TESTS}:${{PYTHONPATH:-}}"],
        **kwargs,
    )


def _task(tmp_path, key, **payload):
    return Task(kind="run", key=key, directory=str(tmp_path / key), payload=payload)


def _wait(executor, n, timeout=WAIT_S):
    """Poll until n tasks have finished; fail after timeout seconds."""
    done = []
    deadline = time.monotonic() + timeout
    while len(done) < n:
        assert time.monotonic() < deadline, f"only {len(done)} of {n} ended: {done}"
        done += executor.poll()
        time.sleep(0.5)
    return {f.task.key: f for f in done}


def _listed(job_ids):
    """The jobs among job_ids (base ids) that squeue lists as not ended."""
    proc = subprocess.run(
        ["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return proc.stdout.split()


def _wait_started(task, timeout=WAIT_S):
    started = Path(task.directory) / "started.txt"
    deadline = time.monotonic() + timeout
    while not started.exists():
        assert time.monotonic() < deadline, f"{task.key} did not start"
        time.sleep(0.2)
    return started.read_text()


def test_a_job_array_runs_every_task(tmp_path):
    ex = _executor(tmp_path, array_parallelism=2)
    tasks = [_task(tmp_path, f"r{i}") for i in range(3)]
    ex.submit(tasks)
    assert ex.active() == 3
    jobs = {entry.job.job_id for entry in ex._active.values()}
    assert len({j.split("_")[0] for j in jobs}) == 1, f"not one array: {jobs}"
    done = _wait(ex, 3)
    assert ex.active() == 0
    for task in tasks:
        assert done[task.key].ok, done[task.key].message
        assert done[task.key].message is None
        assert (Path(task.directory) / "done.txt").read_text().startswith(task.key)
    assert ex.poll() == []


def test_failing_tasks_report_why_and_arrays_are_chunked(tmp_path):
    # max_array_size=1: each task its own sbatch (both run at once on 2 CPUs)
    ex = _executor(tmp_path, max_array_size=1)
    bad = _task(tmp_path, "bad", **{"raise": "the loss went NaN"})
    killed = _task(tmp_path, "killed", kill=int(signal.SIGKILL))
    ex.submit([bad, killed])
    bases = {e.job.job_id.split("_")[0] for e in ex._active.values()}
    assert len(bases) == 2, bases
    done = _wait(ex, 2)
    assert not done["bad"].ok
    assert "ValueError: the loss went NaN" in done["bad"].message
    assert "SLURM job" in done["bad"].message
    assert not done["killed"].ok
    assert "without a result" in done["killed"].message, done["killed"].message
    assert not (Path(bad.directory) / "done.txt").exists()


def test_a_cancelled_job_fails_in_bounded_time(tmp_path):
    ex = _executor(tmp_path)
    task = _task(tmp_path, "sleeper", sleep=300)
    ex.submit([task])
    job_id = _wait_started(task)
    subprocess.run(["scancel", job_id], check=True, timeout=10)
    start = time.monotonic()
    (finished,) = _wait(ex, 1, timeout=40).values()
    assert not finished.ok
    assert "cancelled" in finished.message, finished.message
    assert time.monotonic() - start < 40


def test_active_counts_and_close_cancels(tmp_path):
    ex = _executor(tmp_path)
    fast = _task(tmp_path, "fast")
    slow = [_task(tmp_path, f"slow{i}", sleep=300) for i in range(2)]
    ex.submit([fast])
    ex.submit(slow)
    assert ex.active() == 3
    bases = sorted({e.job.job_id.split("_")[0] for e in ex._active.values()})
    done = _wait(ex, 1)
    assert list(done) == ["fast"] and done["fast"].ok
    assert ex.active() == 2
    _wait_started(slow[0])
    ex.close(cancel=True)
    assert ex.active() == 0
    assert ex.poll() == []
    deadline = time.monotonic() + 30
    while _listed(bases):
        assert time.monotonic() < deadline, f"still in squeue: {_listed(bases)}"
        time.sleep(0.5)


def test_a_study_runs_on_slurm_like_on_the_local_executor(tmp_path):
    """The same study through SLURM job arrays and through the local executor."""
    import lossgeom as lg

    spec = {
        "name": "slurm",
        "base": {
            "model": {"name": "mlp", "options": {"width": 8}},
            "data": {"name": "digits", "subset": 128},
            "optim": {"name": "sgd", "lr": 0.1},
            "steps": 20,
            "batch_size": 32,
            "metrics": {"every": 10, "sharpness": False},
        },
        "seeds": [0, 1],
        "probes": [{"name": "trace", "options": {"max_matvecs": 10}}],
        "pairs": {"probes": [{"name": "interpolate", "options": {"n_points": 3}}]},
        "executor": {"kind": "slurm", "slurm": {"time_min": 5, "cpus_per_task": 1}},
    }
    on_slurm = lg.study.run(spec, tmp_path / "slurm", progress=False)
    assert on_slurm.counts == {"finished": 2}, on_slurm.summary()
    assert on_slurm.pair_counts == {"finished": 1}
    runs = lg.study.runs(tmp_path / "slurm")
    workers = [Path(d, "worker.json").read_text() for d in runs["run_dir"]]
    assert all('"slurm_job_id": "' in w for w in workers)  # ran inside SLURM jobs
    local = lg.study.run(spec, tmp_path / "local", executor="local", progress=False)
    assert local.counts == {"finished": 2}
    a = lg.study.load(tmp_path / "slurm").set_index(["run_id", "step"])
    b = lg.study.load(tmp_path / "local").set_index(["run_id", "step"])
    for col in ("train_loss", "test_accuracy", "grad_norm", "trace"):
        assert a[col].equals(b[col]), col
