"""Owning a run directory: its lock, damaged files, the event log, failures.

A run directory has one writer at a time. :class:`RunLock` holds an OS file lock
(``fcntl.flock``) on ``run.lock`` for as long as the run trains; the kernel
releases it when the process ends, however it ends, so a killed run leaves no
stale lock behind. A second writer is refused at once, naming the holder's pid.
"""

from __future__ import annotations

import errno
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

from lossgeom._io import LockHeldError, atomic_write_json, atomic_write_text, lock_file
from lossgeom._results import jsonable

__all__ = [
    "EVENTS",
    "LOCK",
    "STATUS",
    "TRACEBACK",
    "DamagedFileError",
    "RunLock",
    "RunLockedError",
    "log_event",
    "read_json",
    "record_failure",
]

LOCK = "run.lock"
EVENTS = "events.log"
TRACEBACK = "error.txt"
STATUS = "status.json"


class DamagedFileError(ValueError):
    """A file of a run directory is damaged, truncated or from another save.

    The message names the file and what to do.
    """


class RunLockedError(RuntimeError):
    """Another process is writing to the run directory."""


def read_json(path: Path, what: str, fix: str) -> Any:
    """The JSON content of ``path``, or a :class:`DamagedFileError` naming it.

    Args:
        path: the file.
        what: what the file is, for the message (e.g. ``"the run's status"``).
        fix: what to do about a damaged one.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedFileError(
            f"{path} ({what}) is damaged: not valid JSON ({err}). {fix}"
        ) from None


class RunLock:
    """An exclusive lock on a run directory, held while the ``with`` block runs.

    Entering creates the directory (and ``run.lock`` in it) when needed, takes a
    non-blocking ``fcntl.flock`` and writes this process's pid into the lock file.

    Raises:
        RunLockedError: another process holds the lock (the message names the
            directory and that process's pid).
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise NotADirectoryError(
                errno.ENOTDIR,
                f"the run directory {self.run_dir} is a file; name a directory "
                "(new or holding a run)",
                str(self.run_dir),
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = lock_file(self.run_dir / LOCK)
        except LockHeldError as held:
            raise RunLockedError(
                f"{self.run_dir} is in use by another lossgeom process (pid "
                f"{held.holder}); wait for it to end or stop it, or choose another "
                "run directory."
            ) from None
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def log_event(run_dir: Path, message: str) -> None:
    """Append a time-stamped line to the run's ``events.log``."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(Path(run_dir) / EVENTS, "a", encoding="utf-8") as fh:
        fh.write(f"{stamp} {message}\n")


def record_failure(run_dir: Path, err: BaseException, step: int) -> Path | None:
    """Write ``status.json`` as ``failed`` and the traceback to ``error.txt``.

    Best effort: a directory that cannot be written (full, read-only) leaves the
    error to speak for itself. The traceback file's path is attached to the
    error as ``traceback_file`` and returned (``None`` when it was not written).
    """
    tb_file: Path | None = Path(run_dir) / TRACEBACK
    try:
        text = "".join(traceback.format_exception(err))
        atomic_write_text(tb_file, text)
    except OSError:
        tb_file = None
    try:
        status = {
            "status": "failed",
            "step": step,
            "error": {"type": type(err).__name__, "message": str(err)},
            "traceback": TRACEBACK if tb_file is not None else None,
        }
        atomic_write_json(Path(run_dir) / STATUS, jsonable(status))
    except OSError:
        pass
    if tb_file is not None:
        try:
            err.traceback_file = tb_file  # type: ignore[attr-defined]
        except AttributeError:
            pass
    return tb_file
