"""Running a study: claim its directory, hand runs to an executor, index results.

The coordinator is the only process that writes the study's index. On every
start it first reconciles the index with the run directories (which the
workers write), so a coordinator killed at any moment loses nothing: a run
finished meanwhile is indexed, a run cut short resumes from its last checkpoint,
a run still held by a live worker of the earlier coordinator is waited for.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from lossgeom._io import (
    LockHeldError,
    atomic_write_json,
    atomic_write_text,
    is_locked,
    lock_file,
)
from lossgeom.study._config import Study, StudyError, content_hash, load_study
from lossgeom.study._local import LocalExecutor, default_jobs
from lossgeom.study._store import Store
from lossgeom.study._tasks import Executor, Finished, Task
from lossgeom.study._worker import PAIR_LOG, WORKER, execute
from lossgeom.train import MetricsLog

__all__ = ["StudyLockedError", "run_study"]

STUDY_FILE = "study.yaml"
STUDY_META = "study.json"
STUDY_LOCK = "study.lock"
_OWN = {STUDY_LOCK, STUDY_FILE, STUDY_META}
_DONE = ("finished", "diverged")


class StudyLockedError(RuntimeError):
    """Another coordinator is running the study in this directory."""


class _StudyLock:
    """An OS lock (``fcntl.flock``) on ``study.lock``, released however we end."""

    def __init__(self, root: Path):
        self.root = root
        self.fd: int | None = None

    def __enter__(self) -> _StudyLock:
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(
                errno.ENOTDIR,
                f"the study directory {self.root} is a file",
                str(self.root),
            )
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            fd = lock_file(self.root / STUDY_LOCK)
        except LockHeldError as held:
            raise StudyLockedError(
                f"the study in {self.root} is being run by another coordinator (pid "
                f"{held.holder}); wait for it to end or stop it. `lossgeom study "
                f"status {self.root}` shows its progress."
            ) from None
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _locked(run_dir: Path) -> bool:
    """Whether a live process holds the run directory's ``run.lock``."""
    return is_locked(run_dir / "run.lock")


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _claim(root: Path, study: Study, force: bool) -> None:
    """Make ``root`` this study's directory, or refuse: another study's is not ours.

    With ``force``, another study's index and file are renamed aside (nothing is
    deleted) and the run directories stay, reused where configs match.
    """
    meta = _read(root / STUDY_META)
    others = sorted(p.name for p in root.iterdir() if p.name not in _OWN)
    if meta is None and others:
        raise StudyError(
            f"{root} is not empty and holds no study ({others[:5]}...); give a new "
            "or empty --out directory"
        )
    if meta is not None and meta.get("fingerprint") != study.fingerprint:
        if not force:
            raise StudyError(
                f"{root} holds another study ({meta.get('name')!r} from "
                f"{meta.get('source')}); this study file differs from it. Give a new "
                "--out directory, or --force to set the old index and study file "
                "aside (their names get a .replaced-<time> suffix; run directories "
                "are kept and reused where configs match)."
            )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in (
            STUDY_META,
            STUDY_FILE,
            "index.sqlite",
            "index.sqlite-wal",
            "index.sqlite-shm",
        ):
            if (root / name).exists():
                os.replace(root / name, root / f"{name}.replaced-{stamp}")
    if meta is None or meta.get("fingerprint") != study.fingerprint:
        plain = study.config.model_dump(mode="json")
        atomic_write_text(root / STUDY_FILE, yaml.safe_dump(plain, sort_keys=False))
        atomic_write_json(
            root / STUDY_META,
            {
                "name": study.config.name,
                "fingerprint": study.fingerprint,
                "source": study.source,
                "created": time.time(),
                "runs": len(study.runs),
            },
        )


def _executor(
    study: Study, root: Path, kind: str | None, jobs: int | None
) -> tuple[Executor, int]:
    """The executor and the torch threads of each task."""
    cfg = study.config.executor
    kind = kind or cfg.kind
    if kind == "local":
        jobs = jobs or cfg.jobs or default_jobs()
        return LocalExecutor(execute, jobs), max(1, default_jobs() // jobs)
    if kind == "slurm":
        from lossgeom.study._slurm import SlurmExecutor

        s = cfg.slurm
        ex = SlurmExecutor(
            root / "slurm",
            execute,
            partition=s.partition,
            time_min=s.time_min,
            cpus_per_task=s.cpus_per_task,
            gpus_per_node=s.gpus_per_node,
            mem_gb=s.mem_gb,
            array_parallelism=s.array_parallelism,
            max_array_size=s.max_array_size,
        )
        return ex, s.cpus_per_task
    raise StudyError(f"unknown executor {kind!r}; expected local or slurm")


def run_study(
    study: Any,
    out: str | os.PathLike,
    *,
    jobs: int | None = None,
    executor: str | None = None,
    retry_failed: bool = False,
    force: bool = False,
    progress: bool | None = None,
    allow_factory: bool = False,
    poll_seconds: float = 0.1,
) -> None:
    """Run a study into ``out``; finished runs are skipped, killed ones resumed.

    See :func:`lossgeom.study.run` for the arguments.
    """
    study = load_study(study)
    root = Path(out)
    with _StudyLock(root):
        _claim(root, study, force)
        store = Store(root)
        try:
            ex, threads = _executor(study, root, executor, jobs)
            coordinator = _Coordinator(
                study, root, store, ex, threads, retry_failed, allow_factory, progress
            )
            try:
                coordinator.run(poll_seconds)
            finally:
                ex.close(cancel=False)
        finally:
            store.close()


class _Coordinator:
    """One call's bookkeeping: what is to run, what runs, what is indexed."""

    def __init__(
        self,
        study: Study,
        root: Path,
        store: Store,
        executor: Executor,
        threads: int,
        retry_failed: bool,
        allow_factory: bool,
        progress: bool | None,
    ):
        self.study, self.root, self.store, self.ex = study, root, store, executor
        self.threads, self.retry, self.allow = threads, retry_failed, allow_factory
        self.dirs = {r.run_id: f"runs/{r.run_id}" for r in study.runs}
        self.specs = {r.run_id: r for r in study.runs}
        store.register(study.runs, self.dirs)
        self.waiting: set[str] = set()  # held by a live worker of another process
        self.tried_pairs: set[str] = set()  # pairs started by this call
        self.changed = True  # a run ended since the pairs were last looked at
        self.bar = tqdm(
            total=len(study.runs),
            desc=study.config.name,
            unit="run",
            disable=None if progress is None else not progress,
        )

    # ------------------------------------------------------------- runs
    def run(self, poll_seconds: float) -> None:
        todo = self._reconcile()
        self._submit(todo)
        self._pairs()
        while self.ex.active() or self.waiting:
            for done in self.ex.poll():
                self._finished(done)
            self._check_waiting()
            if self.changed:
                self.changed = False
                self._pairs()
            self._show()
            if self.ex.active() or self.waiting:
                time.sleep(poll_seconds)
        self._show()
        self.bar.close()

    def _reconcile(self) -> list[str]:
        """Index what the run directories hold; the runs to start (or resume)."""
        todo = []
        index = self.store.statuses()
        for run_id in self.specs:
            d = self.root / self.dirs[run_id]
            if _locked(d):
                self.waiting.add(run_id)
                continue
            status = _read(d / "status.json")
            state = (status or {}).get("status")
            if state in _DONE or state == "failed":
                self._ingest(run_id)
                interrupted = (status.get("error") or {}).get(
                    "type"
                ) == "KeyboardInterrupt"
                if state == "failed" and (self.retry or interrupted):
                    todo.append(run_id)
                continue
            if index[run_id]["status"] == "failed" and not self.retry:
                continue  # its worker was killed: retried only when asked
            todo.append(run_id)
        return todo

    def _submit(self, run_ids: list[str]) -> None:
        if not run_ids:
            return
        tasks = [
            Task(
                "run",
                run_id,
                str(self.root / self.dirs[run_id]),
                {
                    "config": self.specs[run_id].config,
                    "probes": [
                        p.model_dump(mode="json") for p in self.study.config.probes
                    ],
                    "allow_factory": self.allow,
                },
                self.threads,
            )
            for run_id in run_ids
        ]
        self.store.submitted(run_ids, time.time())
        self.ex.submit(tasks)

    def _finished(self, done: Finished) -> None:
        task = done.task
        if task.kind == "pair":
            self._ingest_pair(task.key, None if done.ok else done.message)
            return
        status = _read(Path(task.directory) / "status.json")
        state = (status or {}).get("status")
        error = None
        if not done.ok and state not in (*_DONE, "failed"):
            error = done.message  # killed before it could say so itself
        self._ingest(task.key, error)

    def _check_waiting(self) -> None:
        for run_id in list(self.waiting):
            d = self.root / self.dirs[run_id]
            if _locked(d):
                continue
            self.waiting.discard(run_id)
            state = (_read(d / "status.json") or {}).get("status")
            if state in _DONE or state == "failed":
                self._ingest(run_id)
            else:
                self._submit([run_id])

    def _ingest(self, run_id: str, error: str | None = None) -> None:
        self.changed = True
        d = self.root / self.dirs[run_id]
        self.store.ingest_run(
            run_id,
            _read(d / "status.json"),
            MetricsLog(d / "metrics.jsonl").read(),
            MetricsLog(d / "probes.jsonl").read(),
            _read(d / WORKER),
            error,
        )

    # ------------------------------------------------------------ pairs
    def _pairs(self) -> None:
        """Start the pairwise probes of settings whose runs all ended.

        A pair is tried at most once per call: a failed one waits for the next
        call with ``retry_failed``.
        """
        probes = [p.model_dump(mode="json") for p in self.study.config.pairs.probes]
        if not probes:
            return
        index = self.store.statuses()
        couples = []
        for setting_id, runs in self.study.settings().items():
            if any(
                index[r.run_id]["status"] in ("pending", "running")
                or r.run_id in self.waiting
                for r in runs
            ):
                continue
            done = [r for r in runs if index[r.run_id]["status"] == "finished"]
            if self.study.config.pairs.between == "all":
                couples += [(setting_id, *c) for c in itertools.combinations(done, 2)]
            else:
                couples += [(setting_id, *c) for c in itertools.pairwise(done)]
        rows = []
        for setting_id, a, b in couples:
            pair_id = content_hash({"a": a.run_id, "b": b.run_id, "probes": probes})
            rows.append(
                {
                    "pair_id": pair_id,
                    "setting_id": setting_id,
                    "run_a": a.run_id,
                    "run_b": b.run_id,
                    "seed_a": a.seed,
                    "seed_b": b.seed,
                    "pair_dir": f"pairs/{pair_id}",
                }
            )
        self.store.register_pairs(rows)
        known = self.store.pair_statuses()
        start = []
        for row in rows:
            pair_id = row["pair_id"]
            state = known[pair_id]["status"]
            if pair_id in self.tried_pairs or state == "finished":
                continue
            if state == "failed" and not self.retry:
                continue
            d = self.root / row["pair_dir"]
            if (_read(d / "status.json") or {}).get("status") == "finished":
                self._ingest_pair(pair_id, None)
                continue
            self.tried_pairs.add(pair_id)
            start.append(
                Task(
                    "pair",
                    pair_id,
                    str(d),
                    {
                        "runs": [
                            str(self.root / self.dirs[row["run_a"]]),
                            str(self.root / self.dirs[row["run_b"]]),
                        ],
                        "config": self.specs[row["run_a"]].config,
                        "config_b": self.specs[row["run_b"]].config,
                        "probes": probes,
                        "allow_factory": self.allow,
                    },
                    self.threads,
                )
            )
        if start:
            self.ex.submit(start)

    def _ingest_pair(self, pair_id: str, error: str | None) -> None:
        d = self.root / "pairs" / pair_id
        self.store.ingest_pair(
            pair_id, _read(d / "status.json"), MetricsLog(d / PAIR_LOG).read(), error
        )

    def _show(self) -> None:
        counts = self.store.con.execute(
            "SELECT status, COUNT(*) FROM runs GROUP BY status"
        ).fetchall()
        counts = dict(counts)
        ended = sum(counts.get(s, 0) for s in ("finished", "diverged", "failed"))
        self.bar.n = ended
        self.bar.set_postfix(failed=counts.get("failed", 0), refresh=False)
        self.bar.refresh()
