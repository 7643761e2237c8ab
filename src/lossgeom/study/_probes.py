"""Probes of a study: public functions by name, run at a run's checkpoints.

A probe runs inside the run's worker, on the weights in memory at the step it is
due (a :class:`StudyProbes` training callback), on the run's probe set (the
``metrics.probe_samples`` subset of the training data, as the training metrics).
Each result is saved whole with :func:`lossgeom.save_result` under
``probes/<key>/step_<step>/`` and its headline numbers are appended to
``probes.jsonl``; a probe already in ``probes.jsonl`` is not run again when a run
resumes.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lossgeom import curvature, geometry, measures, theory
from lossgeom._results import Result, jsonable, save_result
from lossgeom.measures import row_entries
from lossgeom.train import Callback, MetricsLog, TrainState, build_model

__all__ = [
    "PAIR_PROBES",
    "PROBES",
    "Probe",
    "StudyProbes",
    "check_probe",
    "probe_key",
    "record",
    "run_probe",
]

PROBE_LOG = "probes.jsonl"


@dataclass(frozen=True)
class Probe:
    """A public function and the inputs a study supplies to it.

    Attributes:
        fn: the function.
        supplies: the leading parameters filled from the run (``obj``: the probe
            objective; ``model, loss_fn, train_data, eval_data``: a copy of the
            model, its loss, the training set and the test set (the training set
            when there is none); ``init_model``: the model as initialised from the
            run's seed; ``test_data``: the test set or ``None``); the rest are
            options.
    """

    fn: Callable[..., Any]
    supplies: tuple[str, ...] = ("obj",)


def _objective_probes() -> dict[str, Probe]:
    found = {
        "eigenvalues": Probe(curvature.eigenvalues),
        "trace": Probe(curvature.trace),
        "density": Probe(curvature.density),
        "outliers": Probe(curvature.outliers),
        "negative_mass": Probe(curvature.negative_mass),
        "noise_alignment": Probe(measures.noise_alignment),
        "gradient_noise": Probe(measures.gradient_noise),
        "slice_1d": Probe(geometry.slice_1d),
        "pac_bayes": Probe(
            theory.pac_bayes_bounds,
            ("model", "loss_fn", "init_model", "train_data", "test_data"),
        ),
        "intrinsic_dimension": Probe(
            measures.intrinsic_dimension,
            ("model", "loss_fn", "train_data", "eval_data"),
        ),
    }
    for name, fn in measures.CALLBACKS.items():
        found.setdefault(name, Probe(fn))
    return dict(sorted(found.items()))


PROBES: dict[str, Probe] = _objective_probes()
"""Probes of one run, by name."""

PAIR_PROBES: dict[str, Probe] = {
    "interpolate": Probe(geometry.interpolate, ("obj", "theta_a", "theta_b")),
    "connect": Probe(geometry.connect, ("obj", "theta_a", "theta_b")),
    "align": Probe(geometry.align, ("model_a", "model_b")),
}
"""Probes between the final weights of two seeds, by name."""


def check_probe(registry: dict[str, Probe], name: str, options: dict) -> None:
    """Raise ``ValueError`` if ``name`` is unknown or ``options`` do not fit it."""
    if name not in registry:
        raise ValueError(f"unknown probe {name!r}; known: {sorted(registry)}")
    probe = registry[name]
    signature = inspect.signature(probe.fn)
    params = list(signature.parameters.values())[len(probe.supplies) :]
    allowed = [p.name for p in params if p.name not in ("obj",)]
    supplied = set(probe.supplies) | ({"obj"} if name == "align" else set())
    unknown = sorted(set(options) - set(allowed) - {"seed"})
    taken = sorted(set(options) & supplied)
    if taken or unknown:
        raise ValueError(
            f"probe {name!r} has no options {taken + unknown}; it takes {allowed}"
        )
    try:
        signature.bind(*([None] * len(probe.supplies)), **options)
    except TypeError as err:
        raise ValueError(
            f"probe {name!r} cannot be called with options {options}: {err}. It "
            f"takes {allowed}"
        ) from None


def probe_key(registry: dict[str, Probe], name: str, options: dict) -> str:
    """The column name: the probe's name, plus ``_<kind>`` if it has kinds."""
    params = inspect.signature(registry[name].fn).parameters
    if "kind" not in params:
        return name
    kind = options.get("kind", params["kind"].default)
    return name if kind is inspect.Parameter.empty else f"{name}_{kind}"


def run_probe(
    registry: dict[str, Probe], name: str, options: dict, inputs: dict, seed: int
) -> Result:
    """Call probe ``name`` with the run's ``inputs`` and the ``options``."""
    probe = registry[name]
    kwargs = dict(options)
    if "seed" in inspect.signature(probe.fn).parameters:
        kwargs.setdefault("seed", seed)
    args = [inputs[k] for k in probe.supplies]
    if name == "align":
        kwargs["obj"] = inputs["obj"]
    result = probe.fn(*args, **kwargs)
    if not isinstance(result, Result):
        raise TypeError(
            f"probe {name!r} returned a {type(result).__name__}, not a lossgeom Result"
        )
    return result


def record(
    folder: Path,
    log: Path,
    key: str,
    name: str,
    step: int,
    result: Result,
    seconds: float,
    **extra: Any,
) -> None:
    """Save ``result`` under ``folder/key/step_<step>`` and append its row to ``log``.

    The result is saved first: a row in the log means its result is on disk.
    """
    where = Path(key) / f"step_{step:07d}"
    save_result(result, folder / where)
    row = {"step": step, "key": key, "name": name, "path": str(where), **extra}
    row.update(row_entries(result, key, seconds=seconds))
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(jsonable(row), allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class StudyProbes(Callback):
    """Runs a study's probes at their steps during training (a training callback).

    Probes at ``every``/``steps`` run after the update that reaches the step
    (step 0: at the start); at ``train_loss`` once, after the first metrics row
    that reaches it; ``final`` at the end of a finished run, after the final
    checkpoint. A probe already in ``probes.jsonl`` is skipped, so a resumed run
    does not repeat probes.

    Args:
        probes: the probe specs (see :class:`~lossgeom.study.ProbeSpec`).
        seed: the run's seed; a probe's random seed is this plus the step
            unless its options give one.
    """

    def __init__(self, probes: list, seed: int):
        self.probes, self.seed = probes, seed
        self.done: set[tuple[int, str]] = set()
        self.loss_reached: set[str] = set()

    def on_train_start(self, state: TrainState) -> None:
        self.log = state.run_dir / PROBE_LOG
        rows = MetricsLog(self.log).read()
        self.done = {(row["step"], row.get("key")) for row in rows}
        self.loss_reached = {
            row.get("key") for row in rows if row.get("trigger") == "train_loss"
        }
        if state.step == 0:
            self._run(state, lambda at: bool(at.every) or 0 in at.steps)

    def on_step(self, state: TrainState) -> None:
        s = state.step
        self._run(state, lambda at: (at.every and s % at.every == 0) or s in at.steps)

    def on_eval(self, state: TrainState) -> None:
        loss = state.row.get("train_loss")
        if loss is None:
            return
        self._run(
            state,
            lambda at: at.train_loss is not None and loss <= at.train_loss,
            trigger="train_loss",
        )

    def on_train_end(self, state: TrainState) -> None:
        if state.status == "finished":
            self._run(state, lambda at: at.final)

    def _run(self, state: TrainState, due, trigger: str | None = None) -> None:
        inputs: dict[str, Any] | None = None
        for spec in self.probes:
            key = spec.column
            if not due(spec.at) or (state.step, key) in self.done:
                continue
            if trigger == "train_loss" and key in self.loss_reached:
                continue
            if inputs is None:
                inputs = _Inputs(state)
            start = time.perf_counter()
            result = run_probe(
                PROBES, spec.name, spec.options, inputs, self.seed + state.step
            )
            extra = {"trigger": trigger} if trigger else {}
            record(
                state.run_dir / "probes",
                self.log,
                key,
                spec.name,
                state.step,
                result,
                time.perf_counter() - start,
                **extra,
            )
            self.done.add((state.step, key))
            if trigger == "train_loss":
                self.loss_reached.add(key)


class _Inputs(dict):
    """The inputs probes take from a run, built when first asked for."""

    def __init__(self, state: TrainState):
        super().__init__()
        self.state = state

    def __missing__(self, name: str) -> Any:
        s = self.state
        value = {
            "obj": lambda: s.objective,
            "model": lambda: copy.deepcopy(s.model),
            "loss_fn": lambda: s.loss_fn,
            "train_data": lambda: s.train_data,
            "eval_data": lambda: s.test_data or s.train_data,
            "test_data": lambda: s.test_data,
            # the run's own model was built from this config, factory or not
            "init_model": lambda: build_model(
                s.config, device=s.device, allow_factory=True
            ),
        }[name]()
        self[name] = value
        return value
