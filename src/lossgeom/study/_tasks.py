"""What the coordinator hands to an executor, and what comes back.

A :class:`Task` is plain, picklable data: the work function
(:func:`lossgeom.study._worker.execute`) reads it in any process on any host that
sees the study directory. An executor only starts tasks and says when they ended;
what a task produced is read from its directory, never from the executor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = ["Executor", "Finished", "Task"]


@dataclass(frozen=True)
class Task:
    """One unit of work: a training run, or the pairwise probes of two runs.

    Attributes:
        kind: ``run`` (train and probe one config) or ``pair`` (probes across the
            final weights of two runs of one setting).
        key: the run id, or the pair's id; unique within a study.
        directory: the folder the task writes (its run or pair directory);
            nothing else is written by the task.
        payload: the task's inputs as plain data (JSON-ready).
        threads: torch intra-op threads for the task (0: leave as it is).
    """

    kind: Literal["run", "pair"]
    key: str
    directory: str
    payload: dict[str, Any] = field(default_factory=dict)
    threads: int = 0


@dataclass(frozen=True)
class Finished:
    """A task that ended: normally (``ok``) or not, with the reason.

    Attributes:
        task: the task.
        ok: the work function returned (the task's directory says how it went).
        message: why not, when not ``ok`` (e.g. "killed by signal 9").
    """

    task: Task
    ok: bool
    message: str | None = None


class Executor(Protocol):
    """Runs tasks somewhere; the coordinator polls it.

    ``submit`` queues tasks and returns at once; ``poll`` starts what capacity
    allows and returns the tasks that ended since the last call; ``active`` is
    the number submitted and not yet returned by ``poll``; ``close`` stops
    waiting (``cancel``: also stop what still runs).
    """

    def submit(self, tasks: list[Task]) -> None: ...

    def poll(self) -> list[Finished]: ...

    def active(self) -> int: ...

    def close(self, cancel: bool = False) -> None: ...
