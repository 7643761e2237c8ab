"""Run study tasks as SLURM jobs, through submitit.

:class:`SlurmExecutor` implements the :class:`~lossgeom.study._tasks.Executor`
protocol on a SLURM cluster: ``submit`` sends tasks as job arrays (one ``sbatch``
per chunk of up to ``max_array_size`` tasks, at most ``array_parallelism`` of them
running at once), ``poll`` reports the jobs that ended, ``close(cancel=True)``
runs ``scancel``.

Why submitit: it pickles the work function and its task for the job, submits
many of them as one job array, runs them with the submitting interpreter
(``sys.executable``), and keeps per job in ``folder`` its sbatch script, its
stdout and stderr (``<job>_<task>_log.out`` / ``.err``) and a result pickle that
says whether the function returned or raised (with the traceback).

How a job's end is seen: submitit's own job states come from ``sacct``, which
fails on clusters without accounting (the state is then ``UNKNOWN`` forever), so
this executor does not use them. Each :meth:`SlurmExecutor.poll` makes one
``squeue --states=all`` call for the jobs still active and reads their result
pickles:

- a result pickle: the function returned (``ok``) or raised (not ``ok``; the
  message is the exception, e.g. ``ValueError: boom``);
- ``CANCELLED``, ``TIMEOUT``, ``OUT_OF_MEMORY``, ``NODE_FAIL``, ... without a
  result: not ``ok`` at once, with the reason;
- ``COMPLETED``/``FAILED`` without a result, or no longer listed by ``squeue``
  at all (ended jobs leave it after the cluster's ``MinJobAge``): not ``ok``
  once ``result_grace_s`` has passed without a result pickle appearing (a
  network file system may show it late).

No call waits on a job: ``squeue`` and ``scancel`` run with a timeout
(``poll_timeout_s``), and a ``squeue`` that fails leaves every job as it was.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lossgeom.study._tasks import Finished, Task

if TYPE_CHECKING:  # submitit is imported when an executor is made
    import submitit

__all__ = ["SlurmExecutor"]

_log = logging.getLogger(__name__)

# SLURM job states (squeue %T) of a job that has not ended yet.
_LIVE = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "STOPPED",
        "PREEMPTED",  # submitit requeues preempted jobs
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "SPECIAL_EXIT",
        "RESV_DEL_HOLD",
    }
)

# Ended states that leave no doubt: the function did not return.
_FAILED = {
    "CANCELLED": "was cancelled",
    "TIMEOUT": "timed out (ran past its time limit)",
    "OUT_OF_MEMORY": "ran out of memory",
    "NODE_FAIL": "ended because its node failed",
    "BOOT_FAIL": "ended because its node failed to boot",
    "DEADLINE": "missed its deadline",
    "REVOKED": "was revoked",
}

# A log line that says why a job ended.
_TELLING = re.compile(r"error|killed|cancelled|memory|time limit", re.IGNORECASE)

# squeue's %i of a job array's pending part: 123_[0-4,7%2].
_ARRAY_RANGE = re.compile(r"^(\d+)_\[([0-9,\-]+)(?:%\d+)?\]$")


@dataclass
class _Job:
    """A submitted task and what is known of its job."""

    task: Task
    job: Any  # submitit.slurm.slurm.SlurmJob
    submitted: float  # wall-clock time of the submission (to spot stale results)
    ended: float | None = None  # monotonic time the job was first seen ended


class SlurmExecutor:
    """Runs tasks as SLURM job arrays with submitit; see the module docstring.

    Args:
        folder: where submitit writes each job's sbatch script, logs and pickles
            (one folder per study; it is created).
        fn: the picklable work function, called as ``fn(task)`` in the job;
            what it returns is not used.
        partition: the SLURM partition (None: the cluster's default).
        time_min: each job's time limit in minutes.
        cpus_per_task: CPUs per job (``--cpus-per-task``).
        gpus_per_node: GPUs per job (``--gpus-per-node``; 0: none asked for).
        mem_gb: memory per job in GB (``--mem``; None: the cluster's default).
        array_parallelism: at most this many jobs of one array run at once
            (None: submitit's default, 256).
        max_array_size: at most this many tasks per job array (None: 1000, the
            largest array SLURM accepts by default).
        setup: shell lines run in the job before the work function (e.g.
            ``export PYTHONPATH=...`` or ``module load ...``).
        poll_timeout_s: the longest one ``squeue`` or ``scancel`` call may take.
        result_grace_s: how long a job that ended normally, or vanished from
            ``squeue``, may go without a result pickle before it is reported
            as failed.
        job_name: the SLURM job name.

    Raises:
        ValueError: on a non-positive time, CPU count or array size.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        fn: Callable[[Task], Any],
        *,
        partition: str | None = None,
        time_min: int = 60,
        cpus_per_task: int = 1,
        gpus_per_node: int = 0,
        mem_gb: float | None = None,
        array_parallelism: int | None = None,
        max_array_size: int | None = None,
        setup: Sequence[str] = (),
        poll_timeout_s: float = 10.0,
        result_grace_s: float = 10.0,
        job_name: str = "lossgeom",
    ) -> None:
        import submitit

        if time_min < 1 or cpus_per_task < 1:
            raise ValueError("time_min and cpus_per_task must be at least 1")
        if max_array_size is not None and max_array_size < 1:
            raise ValueError("max_array_size must be at least 1")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fn = fn
        self._max_array_size = max_array_size or 1000
        self._time_min = int(time_min)
        self._poll_timeout_s = poll_timeout_s
        self._result_grace_s = result_grace_s
        # max_num_timeout=0: a job that times out is not requeued; submitit then
        # writes a result pickle with the error "timed-out too many times".
        self._executor: submitit.SlurmExecutor = submitit.SlurmExecutor(
            folder=self.folder, max_num_timeout=0
        )
        params: dict[str, Any] = {
            "job_name": job_name,
            "time": int(time_min),
            "cpus_per_task": int(cpus_per_task),
            "setup": list(setup),
            # SIGUSR2 this long before the time limit (submitit's timeout signal).
            "signal_delay_s": max(10, min(90, int(time_min) * 60 // 5)),
        }
        if partition:
            params["partition"] = partition
        if gpus_per_node:
            params["gpus_per_node"] = int(gpus_per_node)
        if mem_gb is not None:
            params["mem"] = f"{max(1, round(mem_gb * 1024))}M"
        if array_parallelism is not None:
            params["array_parallelism"] = int(array_parallelism)
        self._executor.update_parameters(**params)
        self._active: dict[str, _Job] = {}

    # -- the Executor protocol --------------------------------------------------

    def submit(self, tasks: list[Task]) -> None:
        """Submit tasks as job arrays of at most ``max_array_size`` tasks.

        Args:
            tasks: the tasks; each becomes one job (one array element).

        Raises:
            RuntimeError: ``sbatch`` refused a submission (tasks of earlier
                chunks stay submitted).
        """
        for chunk in _chunks(tasks, self._max_array_size):
            submitted = time.time()
            try:
                jobs = self._executor.map_array(self._fn, chunk)
            except Exception as error:
                raise RuntimeError(
                    f"sbatch refused {len(chunk)} task(s) ({chunk[0].key}, ...): {error}"
                ) from error
            for task, job in zip(chunk, jobs, strict=True):
                self._active[job.job_id] = _Job(task, job, submitted)

    def poll(self) -> list[Finished]:
        """Return the tasks whose jobs ended since the last call; never waits.

        Returns:
            One :class:`Finished` per ended job: ``ok`` when the function
            returned, else not ``ok`` with the reason (the exception raised, or
            the SLURM state: cancelled, timed out, out of memory, node failure,
            ended without a result).
        """
        if not self._active:
            return []
        states = self._states()  # before the pickles: a result can only appear
        now = time.monotonic()
        done: list[Finished] = []
        for job_id, entry in list(self._active.items()):
            finished = self._check(job_id, entry, states, now)
            if finished is not None:
                del self._active[job_id]
                done.append(finished)
        return done

    def active(self) -> int:
        """Return the number of tasks submitted and not yet returned by ``poll``."""
        return len(self._active)

    def close(self, cancel: bool = False) -> None:
        """Stop tracking the submitted jobs; with ``cancel``, ``scancel`` them.

        Cancelled jobs leave ``squeue`` once SLURM has killed them (after the
        cluster's ``KillWait``, as submitit's job ignores SIGTERM).

        Args:
            cancel: also cancel the jobs that have not ended.
        """
        if cancel and self._active:
            ids = sorted({job_id.split("_")[0] for job_id in self._active})
            try:
                proc = subprocess.run(
                    ["scancel", *ids],
                    capture_output=True,
                    text=True,
                    timeout=self._poll_timeout_s,
                )
            except (OSError, subprocess.TimeoutExpired) as error:
                _log.warning("scancel %s failed: %s", " ".join(ids), error)
            else:
                if proc.returncode != 0:
                    _log.warning("scancel %s: %s", " ".join(ids), proc.stderr.strip())
        self._active.clear()

    # -- helpers ------------------------------------------------------------------

    def _check(
        self, job_id: str, entry: _Job, states: dict[str, str] | None, now: float
    ) -> Finished | None:
        """What is known of one job: ended (a Finished) or not (None)."""
        result = _read_result(entry)
        if result is not None:
            ok, message = result
            if not ok:
                if message and "not requeued because: timed-out" in message:
                    message = (
                        f"timed out (ran past its time limit of {self._time_min} min)"
                    )
                message = (
                    f"{message} [SLURM job {job_id}; log {entry.job.paths.stderr}]"
                )
            return Finished(entry.task, ok, message)
        if states is None:  # squeue did not answer: nothing to conclude
            return None
        state = states.get(job_id)
        if state in _LIVE:
            entry.ended = None
            return None
        if state in _FAILED:
            return Finished(
                entry.task, False, self._message(job_id, entry, _FAILED[state])
            )
        # COMPLETED or FAILED without a result yet, or gone from squeue.
        if entry.ended is None:
            entry.ended = now
        if now - entry.ended < self._result_grace_s:
            return None
        if state is None:
            why = "ended without a result: cancelled, timed out or killed"
        else:
            why = f"ended ({state}) without a result"
        return Finished(entry.task, False, self._message(job_id, entry, why))

    def _message(self, job_id: str, entry: _Job, why: str) -> str:
        """A failure message: the job, why, and the end of its error log."""
        stderr = Path(entry.job.paths.stderr)
        message = f"SLURM job {job_id} {why}"
        tail = _log_tail(stderr)
        if tail:
            message += f"; its log ends: {tail}"
        return f"{message} [log {stderr}]"

    def _states(self) -> dict[str, str] | None:
        """The squeue states of the active jobs, by submitit job id.

        Returns:
            ``{job id: state}`` for the jobs squeue lists (ended ones included
            while SLURM keeps them); a job it does not list is absent. None when
            squeue failed.
        """
        ids = sorted({job_id.split("_")[0] for job_id in self._active}, key=int)
        command = ["squeue", "--noheader", "--states=all", "--format=%i|%T"]
        command += ["--jobs", ",".join(ids)]
        try:
            proc = subprocess.run(
                command, capture_output=True, text=True, timeout=self._poll_timeout_s
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            _log.warning("squeue failed: %s", error)
            return None
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:  # none of them is known any more
                return {}
            _log.warning("squeue failed: %s", proc.stderr.strip())
            return None
        return _parse_squeue(proc.stdout)


def _chunks(tasks: Sequence[Task], size: int) -> Iterable[list[Task]]:
    """``tasks`` in consecutive lists of at most ``size``."""
    for start in range(0, len(tasks), size):
        yield list(tasks[start : start + size])


def _parse_squeue(text: str) -> dict[str, str]:
    r"""Read ``squeue --format=%i|%T`` lines into ``{job id: state}``.

    A job array's pending part (``12_[2-4%2]``) becomes one entry per element,
    so that the keys are submitit's job ids (``12_3``, or ``12`` for a job that
    is no array).

    Example:
        >>> _parse_squeue("12_[2-3,5%2]|PENDING\n12_0|RUNNING\n13|COMPLETED\n")
        {'12_2': 'PENDING', '12_3': 'PENDING', '12_5': 'PENDING', '12_0': 'RUNNING', '13': 'COMPLETED'}
    """
    states: dict[str, str] = {}
    for line in text.splitlines():
        job_id, sep, state = line.strip().partition("|")
        if not sep:
            continue
        state = state.split()[0] if state.strip() else "UNKNOWN"
        match = _ARRAY_RANGE.match(job_id)
        if match is None:
            states[job_id] = state
            continue
        base, ranges = match.groups()
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for index in range(int(first), int(last or first) + 1):
                states[f"{base}_{index}"] = state
    return states


def _read_result(entry: _Job) -> tuple[bool, str | None] | None:
    """Read a job's result pickle: ``(ok, message)``, or None when there is none.

    A pickle older than the submission was left by an earlier job of the same id
    (the cluster's job ids restarted) and is ignored.
    """
    path = Path(entry.job.paths.result_pickle)
    try:
        if path.stat().st_mtime < entry.submitted - 5.0:
            return None
    except OSError:
        return None
    from submitit.core.utils import pickle_load

    try:
        outcome, value = pickle_load(path)
    except Exception as error:  # a corrupt pickle, or a result that won't load
        return False, f"unreadable result pickle {path}: {error!r}"
    if outcome == "success":
        return True, None
    return False, _exception_text(str(value))


def _exception_text(trace: str) -> str:
    r"""The exception at the end of a formatted traceback (``Type: message``).

    Example:
        >>> _exception_text(
        ...     'Traceback (most recent call last):\n  File "x.py", line 1, in f\n'
        ...     "    raise ValueError('boom')\nValueError: boom\n"
        ... )
        'ValueError: boom'
    """
    lines = trace.rstrip().splitlines()
    last_frame = max(
        (i for i, line in enumerate(lines) if line.startswith((" ", "\t"))),
        default=-1,
    )
    text = "\n".join(lines[last_frame + 1 :]).strip()
    return text or (lines[-1] if lines else "raised an exception")


def _log_tail(path: Path, max_bytes: int = 4096) -> str:
    r"""The telling line at the end of a log: the last error line, else the last line.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     log = Path(d) / "x.err"
        ...     _ = log.write_text("srun: error: vm: task 0: Killed\nsrun: Force Terminated\n")
        ...     _log_tail(log)
        'srun: error: vm: task 0: Killed'
    """
    try:
        with path.open("rb") as stream:
            stream.seek(0, os.SEEK_END)
            stream.seek(max(0, stream.tell() - max_bytes))
            tail = stream.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    telling = [line for line in lines if _TELLING.search(line)]
    return (telling or lines or [""])[-1]
