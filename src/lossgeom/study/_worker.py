"""The work function of every executor: one task, written to its own directory.

A worker writes only its task's directory; the coordinator reads it. A run task
trains with :func:`lossgeom.train` (resuming from the run's last checkpoint) and
the study's probes as a callback; a pair task measures between the final weights
of two finished runs. ``worker.json`` records the host, process, threads and
times of the latest attempt.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from lossgeom._io import atomic_write_json, atomic_write_text
from lossgeom._results import jsonable
from lossgeom.study._probes import PAIR_PROBES, StudyProbes, record, run_probe
from lossgeom.study._tasks import Task
from lossgeom.train import (
    build_model,
    latest_checkpoint,
    load_checkpoint,
    load_config,
    train,
)
from lossgeom.train._build import build_state, resolve_device
from lossgeom.train._rundir import RunLock, record_failure

__all__ = ["PAIR_LOG", "WORKER", "execute"]

WORKER = "worker.json"
PAIR_LOG = "pair.jsonl"


def execute(task: Task) -> None:
    """Run ``task`` in this process (see the module docstring).

    An error of the training or the probes is recorded in the task's directory
    (``status.json`` ``failed``, ``error.txt``) and raised again, so the
    executor sees the task fail too.
    """
    from lossgeom.study._config import PairProbeSpec, ProbeSpec

    if task.threads:
        torch.set_num_threads(task.threads)
    directory = Path(task.directory)
    directory.mkdir(parents=True, exist_ok=True)
    if task.kind == "run":
        write_run_config(task)
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        "started": time.time(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    atomic_write_json(directory / WORKER, jsonable(info))
    payload = task.payload
    if task.kind == "run":
        probes = [ProbeSpec.model_validate(p) for p in payload.get("probes", [])]
        train(
            payload["config"],
            directory,
            resume=True,
            callbacks=[StudyProbes(probes, payload["config"]["seed"])],
            allow_factory=payload.get("allow_factory", False),
        )
    elif task.kind == "pair":
        specs = [PairProbeSpec.model_validate(p) for p in payload["probes"]]
        _pair(directory, payload, specs)
    else:
        raise ValueError(f"unknown task kind {task.kind!r}; expected run or pair")
    info["ended"] = time.time()
    info["seconds"] = info["ended"] - info["started"]
    atomic_write_json(directory / WORKER, jsonable(info))


def write_run_config(task: Task) -> None:
    """Write the run's ``config.yaml`` unless it is there.

    The run directory's own file comes first: :func:`lossgeom.train` adopts a
    directory that holds its resolved config and refuses other non-empty ones,
    and the worker's log and ``worker.json`` go into the run directory too.
    """
    path = Path(task.directory) / "config.yaml"
    if not path.exists():
        plain = load_config(task.payload["config"]).model_dump(mode="json")
        atomic_write_text(path, yaml.safe_dump(plain, sort_keys=False))


def _pair(directory: Path, payload: dict, specs: list) -> None:
    """The pairwise probes between the final weights of two runs."""
    run_a, run_b = (Path(p) for p in payload["runs"])
    allow = payload.get("allow_factory", False)
    with RunLock(directory):
        try:
            (directory / PAIR_LOG).unlink(missing_ok=True)
            cfg = load_config(payload["config"])
            inputs: dict[int | None, dict] = {}
            for spec in specs:
                if spec.step not in inputs:
                    inputs[spec.step] = _pair_inputs(
                        cfg, payload, run_a, run_b, spec.step, allow
                    )
                start = time.perf_counter()
                result = run_probe(
                    PAIR_PROBES, spec.name, spec.options, inputs[spec.step], cfg.seed
                )
                record(
                    directory / "results",
                    directory / PAIR_LOG,
                    spec.column,
                    spec.name,
                    0,
                    result,
                    time.perf_counter() - start,
                )
            atomic_write_json(
                directory / "status.json",
                {"status": "finished", "step": 0, "runs": [str(run_a), str(run_b)]},
            )
        except BaseException as err:
            record_failure(directory, err, 0)
            raise


def _pair_inputs(
    cfg, payload: dict, run_a: Path, run_b: Path, step: int | None, allow: bool
) -> dict:
    """Both runs' models at ``step`` (``None``: final) and run a's objective."""
    state = build_state(cfg, run_a, resolve_device(cfg), allow_factory=allow)
    model_a = state.model
    _load_weights(run_a, model_a, step)
    model_b = build_model(payload["config_b"], device=state.device, allow_factory=allow)
    _load_weights(run_b, model_b, step)
    obj = state.objective
    theta_b = obj.flatten(dict(model_b.named_parameters())).detach()
    return {
        "obj": obj,
        "theta_a": obj.theta,
        "theta_b": theta_b,
        "model_a": model_a,
        "model_b": model_b,
    }


def _load_weights(run_dir: Path, model: torch.nn.Module, step: int | None) -> None:
    """Load the run's final checkpoint, or its checkpoint at ``step``."""
    folder = run_dir / "checkpoints"
    if step is None:
        sidecar = latest_checkpoint(folder)
        what = "the final weights"
    else:
        sidecar = folder / f"step_{step:07d}.json"
        sidecar = sidecar if sidecar.exists() else None
        what = f"the weights at step {step} (checkpoint.steps: [{step}])"
    if sidecar is None:
        raise FileNotFoundError(
            f"{run_dir} has no checkpoint with {what}; a pairwise probe needs them "
            "in both runs (a run that stopped earlier never reached the step)"
        )
    load_checkpoint(sidecar, model, restore_rng=False)
