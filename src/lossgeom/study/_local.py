"""The local executor: one process per task, at most ``jobs`` at once.

Each task runs in a process of its own, forked by a fork server
(:mod:`lossgeom.study._forkserver`) that imported lossgeom once: a task starts
in milliseconds, not the seconds of a fresh interpreter importing torch, and
inherits no threads. A process of its own per task (not a reused pool worker)
means a task killed by the OS (out of memory) or by a user ends that task only:
the coordinator sees its exit status and records it; a ``concurrent.futures``
pool would break as a whole. A task's output goes to ``worker.log`` in its
directory.
"""

from __future__ import annotations

import base64
import os
import pickle
import signal
import subprocess
import sys
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path

from lossgeom.study._tasks import Finished, Task

__all__ = ["LocalExecutor", "default_jobs", "run_child"]

LOG = "worker.log"
_ERROR = "lossgeom-task-error: "


def default_jobs() -> int:
    """The number of cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def encode(fn: Callable[[Task], None], task: Task) -> bytes:
    """A request line of the fork server: the work function and the task."""
    return base64.b64encode(pickle.dumps((fn, task))) + b"\n"


def run_child(fn: Callable[[Task], None], task: Task) -> None:
    """A forked task's life: output to its log, the work, then exit (0, or 1)."""
    code = 1
    try:
        directory = Path(task.directory)
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        signal.signal(signal.SIGINT, signal.default_int_handler)
        fn(task)
        code = 0
    except BaseException as err:
        traceback.print_exc()
        message = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        print(f"\n{_ERROR}{message}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _last_error(directory: str) -> str | None:
    """The error line :func:`run_child` left at the end of the task's log."""
    try:
        with open(Path(directory) / LOG, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - 4096))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return None
    found = [
        line.removeprefix(_ERROR)
        for line in tail.splitlines()
        if line.startswith(_ERROR)
    ]
    return found[-1] if found else None


def exit_message(code: int, directory: str) -> str:
    """Why a task's process ended with ``code`` (not 0)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory, or killed)" if -code == signal.SIGKILL else ""
        return f"the worker process was killed by {name}{hint}"
    return _last_error(directory) or f"the worker process exited with code {code}"


class LocalExecutor:
    """Runs tasks in processes on this machine (see the module docstring).

    Args:
        fn: the work function, ``fn(task)`` (picklable: a module-level function).
        jobs: tasks at once (default: the cores this process may use).
    """

    def __init__(self, fn: Callable[[Task], None], jobs: int | None = None):
        self.fn, self.jobs = fn, jobs or default_jobs()
        self.queue: deque[Task] = deque()
        self.running: dict[str, Task] = {}
        self.pids: dict[str, int] = {}
        self.server: subprocess.Popen | None = None
        self.buffer = b""

    def _server(self) -> subprocess.Popen:
        if self.server is None:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "lossgeom.study._forkserver"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            os.set_blocking(self.server.stdout.fileno(), False)
        return self.server

    def submit(self, tasks: list[Task]) -> None:
        """Queue tasks; they start in :meth:`poll` as slots free up."""
        self.queue.extend(tasks)

    def poll(self) -> list[Finished]:
        """Collect the tasks that ended, then start queued tasks in free slots."""
        ended = self._events()
        while self.queue and len(self.running) < self.jobs:
            task = self.queue.popleft()
            server = self._server()
            server.stdin.write(encode(self.fn, task))
            server.stdin.flush()
            self.running[task.key] = task
        return ended

    def _events(self) -> list[Finished]:
        if self.server is None:
            return []
        try:
            chunk = self.server.stdout.read() or b""
        except BlockingIOError:
            chunk = b""
        self.buffer += chunk
        ended = []
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            kind, key, number = line.decode().split()
            if kind == "started":
                self.pids[key] = int(number)
                continue
            task = self.running.pop(key)
            self.pids.pop(key, None)
            code = int(number)
            ok = code == 0
            ended.append(
                Finished(task, ok, None if ok else exit_message(code, task.directory))
            )
        if self.server.poll() is not None and self.running and not chunk:
            message = f"the fork server ended (exit code {self.server.returncode})"
            ended += [Finished(t, False, message) for t in self.running.values()]
            self.running.clear()
            self.server = None
        return ended

    def active(self) -> int:
        """Tasks queued or running."""
        return len(self.queue) + len(self.running)

    def close(self, cancel: bool = False) -> None:
        """Forget queued tasks; with ``cancel``, also end the running ones."""
        self.queue.clear()
        if cancel:
            for pid in self.pids.values():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.server is not None:
            self.server.stdin.close()
            try:
                self.server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.server.kill()
            self.server.stdout.close()
            self.server = None
