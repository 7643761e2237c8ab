"""Work functions for the SLURM tests; the jobs import this module (PYTHONPATH)."""

import os
import socket
import time
from pathlib import Path


def work(task):
    """Write ``done.txt`` into the task's directory; the payload may ask for more.

    payload keys: ``sleep`` (seconds to sleep first), ``raise`` (a message to raise
    a ValueError with), ``kill`` (a signal number to kill the process with).
    """
    directory = Path(task.directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "started.txt").write_text(os.environ.get("SLURM_JOB_ID", ""))
    time.sleep(task.payload.get("sleep", 0))
    if "raise" in task.payload:
        raise ValueError(task.payload["raise"])
    if "kill" in task.payload:
        os.kill(os.getpid(), task.payload["kill"])
    (directory / "done.txt").write_text(f"{task.key} {socket.gethostname()}")
    return task.key
