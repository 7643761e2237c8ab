"""A fork server for the local executor: import once, fork a process per task.

Started as ``python -m lossgeom.study._forkserver`` by :class:`LocalExecutor`, it
imports lossgeom (and torch) once, then reads tasks on stdin and forks a child
per task; it writes ``started <key> <pid>`` and ``ended <key> <exit code>``
lines on stdout (a negative code: killed by that signal). It forks before any
parallel torch work, so children inherit no thread pools.

Why not ``multiprocessing``'s forkserver: its children import the parent's
``__main__`` module, so a user's script without an ``if __name__ ==
"__main__":`` guard would start the study again in every run. Here the
children know only lossgeom.

When its stdin closes (the coordinator ended, however it ended) the server
exits and leaves running children to finish their runs: a killed coordinator
loses no run.
"""

from __future__ import annotations

import base64
import os
import pickle
import select
import signal
import sys

__all__ = ["main"]


def _warm() -> None:
    """Import once what every run would import on its first steps.

    lossgeom and torch; ``torch._dynamo``, which the first optimizer imports
    (about 1.5 s on a 2-core CPU); scikit-learn's data sets (digits), where
    installed. Imports only: no torch operation runs here, so no thread pool
    exists when the server forks.
    """
    import importlib.util

    import torch

    import lossgeom.study._worker  # noqa: F401

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    if importlib.util.find_spec("sklearn") is not None:
        import sklearn.datasets  # noqa: F401


def _write(fd: int, text: str) -> None:
    os.write(fd, text.encode())


def main() -> None:
    """Serve until stdin closes (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the children
    _warm()
    from lossgeom.study._local import run_child

    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    keys: dict[int, str] = {}
    buffer = b""
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.05)
        if ready:
            chunk = os.read(stdin, 1 << 16)
            if not chunk:
                return  # the coordinator is gone: its children finish on their own
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                fn, task = pickle.loads(base64.b64decode(line))
                pid = os.fork()
                if pid == 0:
                    os.close(stdin)
                    os.close(stdout)
                    run_child(fn, task)  # never returns
                keys[pid] = task.key
                _write(stdout, f"started {task.key} {pid}\n")
        while keys:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            key = keys.pop(pid, None)
            if key is not None:
                code = os.waitstatus_to_exitcode(status)
                _write(stdout, f"ended {key} {code}\n")


if __name__ == "__main__":
    main()
