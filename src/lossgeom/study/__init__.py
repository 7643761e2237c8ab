"""Layer 4: studies, sweeps over hyper-parameters and seeds, stored and resumable.

A study file (YAML) names a base training config, a sweep (``grid``, ``zip``,
``seeds``), probes at checkpoints and across seeds, and stop rules;
:func:`run` trains and probes every run with an executor (a local process pool,
or SLURM through submitit), each run in its own directory named by the content
hash of its resolved config, and indexes everything in one SQLite file.
Running a study again skips finished runs and resumes killed ones.
:func:`load` reads it back as a pandas DataFrame.

Example:
    >>> import lossgeom as lg                                   # doctest: +SKIP
    >>> lg.study.run("examples/studies/h1.yaml", "out")  # doctest: +SKIP
    >>> lg.study.table("out", by=["batch_size"], metrics=["test_error"])  # doctest: +SKIP
"""

from __future__ import annotations

import os

from lossgeom.study._config import (
    ExecutorConfig,
    PairProbeSpec,
    PairsConfig,
    ProbeAt,
    ProbeSpec,
    RunSpec,
    SlurmConfig,
    StopRule,
    Study,
    StudyConfig,
    StudyError,
    load_study,
)
from lossgeom.study._coordinator import StudyLockedError, run_study
from lossgeom.study._probes import PAIR_PROBES, PROBES
from lossgeom.study._tables import (
    StudyStatus,
    load,
    pairs,
    results,
    runs,
    status,
    table,
)

__all__ = [
    # study files
    "ExecutorConfig",
    "PairProbeSpec",
    "PairsConfig",
    "ProbeAt",
    "ProbeSpec",
    "RunSpec",
    "SlurmConfig",
    "StopRule",
    "Study",
    "StudyConfig",
    "StudyError",
    "load_study",
    "PAIR_PROBES",
    "PROBES",
    # running
    "StudyLockedError",
    "run",
    # reading
    "StudyStatus",
    "load",
    "pairs",
    "results",
    "runs",
    "status",
    "table",
]


def run(
    study: StudyConfig | dict | str | os.PathLike,
    out: str | os.PathLike,
    *,
    jobs: int | None = None,
    executor: str | None = None,
    retry_failed: bool = False,
    force: bool = False,
    progress: bool | None = None,
    allow_factory: bool = False,
) -> StudyStatus:
    """Run a study into the directory ``out``; return where it stands.

    Every run's config is validated before anything starts. Each run trains in
    ``out/runs/<run id>/`` (the training run directory, plus the probes'
    results) and is indexed in ``out/index.sqlite``. Running the same study
    again skips finished runs, resumes killed ones from their last checkpoint
    and re-runs failed ones only with ``retry_failed``. A run that raises is
    recorded as failed (its traceback in its ``error.txt``) and the study goes
    on. One coordinator per directory: a second one is refused.

    Args:
        study: the study file (path), a dict, or a :class:`StudyConfig`.
        out: the study directory (new, empty, or this study's).
        jobs: runs at once on the local executor (default: the study file's,
            else the number of cores); each run gets ``cores // jobs`` threads.
        executor: ``local`` or ``slurm`` (default: the study file's).
        retry_failed: run failed runs again (from their last checkpoint).
        force: take over a directory of another study: its index and study file
            are set aside (renamed), its run directories reused where configs
            match.
        progress: show a progress bar (default: only on a terminal).
        allow_factory: allow ``model.factory`` in the configs (runs user code).

    Returns:
        The :class:`StudyStatus` after the call.

    Raises:
        StudyError: an invalid study file or run config, or a directory of
            another study (before any run starts).
        StudyLockedError: another coordinator runs this study directory.
    """
    run_study(
        study,
        out,
        jobs=jobs,
        executor=executor,
        retry_failed=retry_failed,
        force=force,
        progress=progress,
        allow_factory=allow_factory,
    )
    return status(out)
