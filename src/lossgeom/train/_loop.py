"""The training loop: measure, adapt the step size, update; callbacks at each point."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lossgeom._results import Cost, Result, jsonable
from lossgeom.curvature import hessian
from lossgeom.objective import NonFiniteError
from lossgeom.train._advice import Advice
from lossgeom.train._batches import training_batch
from lossgeom.train._build import (
    build_model,
    build_state,
    check_factory,
    prepare_run_dir,
    resolve_device,
)
from lossgeom.train._callbacks import Callback, TrainState, check_callbacks
from lossgeom.train._checkpointing import Checkpointer
from lossgeom.train._config import TrainConfig, load_config
from lossgeom.train._distributed import Ranks, check_global_batch, data_parallel
from lossgeom.train._escape import descend_to_start, isotropic_gradients
from lossgeom.train._probes import GradientNorm, HessianTrace, LossAccuracy, Sharpness
from lossgeom.train._rundir import RunLock, log_event, record_failure
from lossgeom.train._schedule import StepSize
from lossgeom.train._state import MetricsLog, read_status, write_status
from lossgeom.train._trackers import Measures, UpdateDimension
from lossgeom.train._tracking import (
    TensorBoardTracker,
    WandbTracker,
    tracking_callbacks,
)

__all__ = ["TrainResult", "train"]


@dataclass(frozen=True, eq=False)
class TrainResult(Result):
    """What a run produced.

    Saved with :meth:`~lossgeom.Result.save`, the model goes as its state dict
    and is rebuilt from ``config`` on load (:func:`lossgeom.train.build_model`).

    Attributes:
        run_dir: the run directory (``config.yaml``, ``metrics.jsonl``,
            ``status.json``, ``checkpoints/``).
        status: ``finished`` or ``diverged``.
        step: updates done (for a diverged run: the step whose loss was not finite).
        model: the trained network (the last finite weights).
        metrics: the rows of ``metrics.jsonl``.
        resumed_from: the step this call resumed from (``None``: a fresh start).
        config: the resolved configuration, as plain values.
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`; ``cost.seconds`` is the wall time of this
            call.
    """

    run_dir: Path
    status: str
    step: int
    model: nn.Module
    metrics: list[dict] = field(default_factory=list)
    resumed_from: int | None = None
    config: dict = field(default_factory=dict)
    definition: str = field(
        default="a training run: the metrics rows of metrics.jsonl and the final "
        "weights (the last finite ones for a diverged run)",
        kw_only=True,
    )
    bulky: ClassVar[tuple[str, ...]] = ("model",)

    def scalars(self) -> dict[str, float]:
        """The numbers of the last metrics row (its ``step`` and timings left out)."""
        if not self.metrics:
            return {}
        last = self.metrics[-1]
        return {
            k: float(v)
            for k, v in last.items()
            if isinstance(v, (int, float))
            and not isinstance(v, bool)
            and k != "step"
            and not k.endswith("seconds")
        }

    def _fields_to_save(self) -> dict[str, Any]:
        out = super()._fields_to_save()
        out["model"] = {"state_dict": dict(self.model.state_dict())}
        return out

    @classmethod
    def _from_saved(cls, values: dict[str, Any]) -> TrainResult:
        values = dict(values)
        state = values["model"]["state_dict"]
        first = next(iter(state.values()), None)
        device = first.device if first is not None else torch.device("cpu")
        model = build_model(values["config"], device=device)
        model.load_state_dict(state)
        values["model"] = model
        return super()._from_saved(values)


def train(
    config: TrainConfig | dict | str | Path,
    run_dir: str | Path | None = None,
    *,
    resume: bool = True,
    progress: bool = False,
    callbacks: Sequence[Callback] = (),
    allow_factory: bool = False,
) -> TrainResult:
    """Train a model from a config, measuring curvature along the way.

    The run directory gets ``config.yaml`` (the resolved config), ``metrics.jsonl``
    (one row per measurement, every ``metrics.every`` steps: train/test loss and
    accuracy, probe-set loss and gradient norm, sharpness with its residual and
    the edge-of-stability ratio, optionally the trace with its standard error),
    ``checkpoints/step_NNNNNNN.safetensors`` + ``.json`` and ``status.json``.
    Step ``s`` in all of them means "after ``s`` updates".

    The measurements are callbacks (:class:`~lossgeom.train.Callback`); the
    user's ``callbacks`` run after the built-in ones at the same hooks and may
    add columns to the metrics rows.

    A run is a deterministic function of its config on CPU: batch order and
    augmentation come from generators seeded by ``(seed, step)``, and checkpoints
    restore weights, optimizer, RNG and probe state, so a run killed and resumed
    ends with the same weights as one that was never interrupted. A non-finite
    loss stops the run with status ``diverged`` and the step.

    One process at a time writes a run directory: the call holds a lock on
    ``run.lock`` while it runs (released by the OS however the process ends). A
    resume loads the newest checkpoint that verifies, skipping damaged ones with
    a warning (and a line in ``events.log``). An error once the directory is the
    run's leaves ``status.json`` at ``failed`` (with the error and the step) and
    the traceback in ``error.txt`` (where the directory can be written).

    Started by ``torchrun`` (``WORLD_SIZE`` > 1), the run is data-parallel: a
    process group is created where none exists (NCCL on CUDA, each rank on
    ``cuda:LOCAL_RANK``; gloo otherwise); every rank takes its equal shard of
    each step's global batch of ``batch_size`` and DistributedDataParallel
    averages the gradients; the metrics are reduced over the ranks, so rows
    and weights are those of one process (to float rounding). Only rank 0
    writes the run directory and prints; every rank returns the result
    (docs/training.md, "Data-parallel training").

    Args:
        config: a :class:`TrainConfig`, a dict, or a YAML file path.
        run_dir: the run directory (default ``runs/<config.name>``).
        resume: continue from the last complete checkpoint in ``run_dir``.
        progress: print one line per measurement.
        callbacks: :class:`~lossgeom.train.Callback` instances, run in this
            order after the built-in callbacks.
        allow_factory: allow ``model.factory``, which imports and runs the code
            the config names; a config cannot allow it itself.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: an invalid config, or a factory not allowed, before any work.
        TypeError: a callback without the hooks, before any work.
        RunLockedError: another process is writing to ``run_dir``.
        DamagedFileError: a file of the run directory is damaged (named).
        ValueError: data-parallel, a global batch the ranks do not divide.
    """
    start_time = time.perf_counter()
    cfg = load_config(config)
    check_factory(cfg, allow_factory)
    user_callbacks = check_callbacks(callbacks)
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / cfg.name
    with data_parallel(cfg, resolve_device(cfg)) as ranks, ExitStack() as held:

        def open_run_dir() -> dict | None:  # rank 0's, for every rank
            held.enter_context(RunLock(run_dir))
            prepare_run_dir(run_dir, cfg, resume)
            return read_status(run_dir)

        stored = ranks.from_writer(open_run_dir)
        step = stored["step"] if stored is not None else 0
        state = None
        try:
            state = build_state(cfg, run_dir, ranks.device, allow_factory=True)
            check_global_batch(cfg, ranks.world_size, state.train_data[0].shape[0])
            return _run(
                state,
                stored,
                resume,
                user_callbacks,
                progress and ranks.writer,
                start_time,
                ranks,
            )
        except BaseException as err:
            if ranks.writer:
                record_failure(run_dir, err, state.step if state is not None else step)
            raise


def _run(
    state: TrainState,
    stored: dict | None,
    resume: bool,
    user_callbacks: list[Callback],
    progress: bool,
    start_time: float,
    ranks: Ranks,
) -> TrainResult:
    """Resume (where asked) and train a built run; its directory is locked.

    Rank 0 alone writes; the other ranks read the rows once it has.
    """
    cfg, run_dir = state.config, state.run_dir
    _check_noise(cfg, state.train_data[0].shape[0], ranks)
    log = MetricsLog(run_dir / "metrics.jsonl")
    step_size = StepSize(cfg)
    sharpness = _sharpness_probe(cfg)  # its warm start goes into checkpoints
    checkpointer = Checkpointer(
        run_dir / "checkpoints", cfg, step_size, sharpness, ranks
    )
    probes = _probe_callbacks(state, sharpness)
    if not ranks.writer:  # the trackers write files: rank 0's
        probes = [p for p in probes if not isinstance(p, _TRACKERS)]
    builtins = [*probes, checkpointer]

    torch.manual_seed(cfg.seed)
    if resume:
        checkpointer.restore(state)
    if (
        resume
        and stored is not None
        and stored["status"] in ("finished", "diverged")
        and not checkpointer.skipped
    ):
        return _result(state, stored["status"], stored["step"], log, start_time)
    if ranks.writer:
        damaged = log.truncate(before_step=state.step)
        if damaged:
            log_event(
                run_dir,
                f"damaged lines {damaged} of metrics.jsonl moved to "
                "metrics.jsonl.damaged",
            )
        info = {}
        if checkpointer.skipped:
            info["skipped_checkpoints"] = [
                {"file": name, "reason": why} for name, why in checkpointer.skipped
            ]
        write_status(run_dir, "running", state.step, **info)
    if cfg.start is not None and state.resumed_from is None:
        _descend_to_start(state, ranks)

    loop = _Loop(state, builtins, user_callbacks, step_size, log, progress, ranks)
    try:
        loop.run()
    finally:  # drop DDP now: kept alive by a traceback, it would outlive the
        loop.net = state.model  # process group and block the next one's creation
    ranks.barrier()  # rank 0 has written the last row
    return _result(state, state.status, state.step, log, start_time)


_TRACKERS = (TensorBoardTracker, WandbTracker)


def _check_noise(cfg: TrainConfig, n: int, ranks: Ranks) -> None:
    """``optim.noise: isotropic`` needs minibatch noise and one process."""
    if cfg.optim.noise != "isotropic":
        return
    if ranks.parallel:
        raise ValueError(
            "optim.noise: isotropic takes a full-batch gradient each step and is "
            f"implemented for one process; this run has {ranks.world_size} ranks. "
            "Run it without torchrun."
        )
    if cfg.batch_size >= n:
        raise ValueError(
            f"optim.noise: isotropic scales its noise to the minibatch noise, but "
            f"batch_size {cfg.batch_size} covers the whole training set ({n} "
            "samples), which has none; choose a smaller batch_size."
        )


def _descend_to_start(state: TrainState, ranks: Ranks) -> None:
    """Reach step 0 by the config's full-batch descent (every rank alike)."""
    cfg = state.config
    try:
        before, after = descend_to_start(
            cfg, state.model, state.loss_fn, state.train_data
        )
    except FloatingPointError as err:
        state.status = "diverged"
        if ranks.writer:
            write_status(state.run_dir, "diverged", 0, reason=str(err))
        return
    if ranks.writer:
        log_event(
            state.run_dir,
            f"start: {cfg.start.steps} full-batch descent steps at lr "
            f"{cfg.start.lr:g}, training loss {before:.6g} -> {after:.6g}",
        )


def _sharpness_probe(cfg: TrainConfig) -> Sharpness | None:
    m = cfg.metrics
    return Sharpness(m, cfg.optim, cfg.seed) if m is not None and m.sharpness else None


def _probe_callbacks(state: TrainState, sharpness: Sharpness | None) -> list[Callback]:
    """The built-in measuring callbacks of ``state.config.metrics``, in their order.

    The trackers of ``config.tracking`` (TensorBoard, W&B) come last; they copy
    the rows as written to ``metrics.jsonl``, user columns included. Their
    packages are checked here, before the first step.
    """
    cfg = state.config
    m = cfg.metrics
    trackers = tracking_callbacks(cfg)  # ConfigError: no metrics, or no package
    if m is None:
        return []
    found: list[Callback] = [LossAccuracy(state, m.eval_samples, cfg.seed)]
    found.append(GradientNorm())
    if sharpness is not None:
        found.append(sharpness)
    if m.trace_max_matvecs:
        found.append(HessianTrace(m.trace_max_matvecs, cfg.seed))
    if m.measures:
        found.append(Measures(m.measures, cfg.seed))
    if m.update_dimension is not None:
        found.append(UpdateDimension(m.update_dimension))
    if m.advice:
        found.append(Advice())
    return [*found, *trackers]


def _result(
    state: TrainState, status: str, step: int, log: MetricsLog, start_time: float
) -> TrainResult:
    return TrainResult(
        run_dir=state.run_dir,
        status=status,
        step=step,
        model=state.model,
        metrics=log.read(),
        resumed_from=state.resumed_from,
        config=state.config.model_dump(mode="json"),
        cost=Cost(seconds=time.perf_counter() - start_time),
    )


class _Loop:
    """One call's loop over a built (and possibly resumed) run.

    Args:
        state: the run's state, updated in place.
        builtins: the built-in callbacks, in their order.
        users: the user's callbacks, run after the built-in ones.
        step_size: the step size of each update.
        log: the run's ``metrics.jsonl``.
        progress: print each metrics row.
        ranks: the run's ranks: each update trains on this rank's shard of the
            step's batch through DistributedDataParallel; only rank 0 writes.
    """

    def __init__(
        self,
        state: TrainState,
        builtins: list[Callback],
        users: list[Callback],
        step_size: StepSize,
        log: MetricsLog,
        progress: bool,
        ranks: Ranks | None = None,
    ):
        self.state, self.builtins, self.users = state, builtins, users
        self.callbacks = builtins + users
        self.step_size, self.log, self.progress = step_size, log, progress
        self.last_row: dict[str, object] = {}
        self.ranks = ranks if ranks is not None else Ranks()
        unused = bool(state.objective.unused_parameters)
        self.net = self.ranks.wrap(state.model, find_unused_parameters=unused)

    def run(self) -> None:
        """Train to ``config.steps`` or divergence; ``state.status`` says which."""
        state, cfg = self.state, self.state.config
        state.model.train()
        for cb in self.callbacks:
            cb.on_train_start(state)
        while state.status == "running" and state.step < cfg.steps:
            evaluate = self._metrics_step()
            self._probe(evaluate=evaluate, adapt=self.step_size.due(state.step))
            if evaluate and state.status == "running" and self._target_reached():
                break
            if state.status == "running":
                self._update()
        else:
            if state.status == "running":  # the last row
                self._probe(evaluate=cfg.metrics is not None, adapt=False)
        if state.status == "running":
            state.status = "finished"
        for cb in self.callbacks:
            cb.on_train_end(state)
        if state.status == "finished" and self.ranks.writer:
            info = {} if state.stop_reason is None else {"stopped": state.stop_reason}
            write_status(state.run_dir, "finished", state.step, **info)

    def _target_reached(self) -> bool:
        """Whether this step's row reached ``stop.train_loss`` (then noted)."""
        state = self.state
        target = state.config.stop.train_loss
        loss = self.last_row.get("train_loss")
        if target is None or loss is None or not loss <= target:
            return False
        state.stop_reason = (
            f"train_loss {loss:.6g} <= stop.train_loss {target:g} at step {state.step}"
        )
        return True

    def _metrics_step(self) -> bool:
        metrics = self.state.config.metrics
        return metrics is not None and self.state.step % metrics.every == 0

    def _probe(self, evaluate: bool, adapt: bool) -> None:
        """The adaptive step size's refresh, then the metrics row, before an update.

        The row's ``lr`` is then the step size the coming update uses.

        A probe that meets a non-finite value stops the run as diverged.
        """
        state = self.state
        try:
            if adapt:
                self.step_size.refresh(state.objective, state.step)
            if evaluate:
                self._evaluate()
        except NonFiniteError as err:
            self._diverge(str(err))

    def _evaluate(self) -> None:
        """Build this step's metrics row through the callbacks and write it."""
        state, cfg = self.state, self.state.config
        state.lr = self.step_size.lr(min(state.step, cfg.steps - 1))
        row: dict[str, object] = {"step": state.step, "lr": state.lr}
        if state.batch_loss is not None:
            row["batch_loss"] = state.batch_loss
        state.row, state.hessian = row, hessian(state.objective)
        try:
            start = time.perf_counter()
            for cb in self.builtins:
                cb.on_eval(state)
            row["probe_seconds"] = time.perf_counter() - start
            for cb in self.users:
                before = dict(row)
                cb.on_eval(state)
                _check_columns(cb, before, row)
        finally:
            state.row = state.hessian = None
        if self.ranks.writer:
            self.log.append(row)
        self.last_row = row
        if self.progress:
            _print_row(row)

    def _update(self) -> None:
        """One optimizer update on the step's batch, unless its loss is not finite."""
        state, cfg = self.state, self.state.config
        step, lr = state.step, self.step_size.lr(state.step)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        shard = (self.ranks.rank, self.ranks.world_size)
        xb, yb = training_batch(cfg, state.train_data, step, shard)
        state.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = state.loss_fn(self.net(xb), yb)
        # the global batch's loss on every rank (a mean of equal shards' means)
        state.lr, state.batch_loss = lr, self.ranks.mean(loss.detach())
        if not math.isfinite(state.batch_loss):
            if self.ranks.writer:
                self.log.append(
                    {"step": step, "batch_loss": state.batch_loss, "diverged": True}
                )
            self._diverge(
                f"the training loss was {state.batch_loss} at step {step} (lr {lr:g})"
            )
            return
        loss.backward()
        if cfg.optim.noise == "isotropic":
            isotropic_gradients(cfg, state.model, state.loss_fn, state.train_data, step)
        state.optimizer.step()
        state.step += 1
        for cb in self.callbacks:
            cb.on_step(state)

    def _diverge(self, reason: str) -> None:
        self.state.status = "diverged"
        if self.ranks.writer:
            write_status(self.state.run_dir, "diverged", self.state.step, reason=reason)


def _print_row(row: dict[str, object]) -> None:
    """One line: the step and the row's numbers, wall times left out."""
    shown = {
        k: v for k, v in row.items() if isinstance(v, float) and "seconds" not in k
    }
    print(
        f"step {row['step']:>7} " + " ".join(f"{k}={v:.4g}" for k, v in shown.items())
    )


def _check_columns(cb: Callback, before: dict, row: dict) -> None:
    """A user callback added columns only: it kept the others, its are JSON-ready."""
    changed = [k for k, v in before.items() if k not in row or row[k] is not v]
    if changed:
        raise ValueError(
            f"callback {type(cb).__name__} changed or removed the metrics columns "
            f"{changed}; a callback may only add columns. Write yours under new names."
        )
    for key in row.keys() - before.keys():
        try:
            json.dumps(jsonable(row[key]))
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"callback {type(cb).__name__} added column {key!r} holding "
                f"{type(row[key]).__name__}, which is not JSON-ready ({err}); use "
                "numbers, strings, booleans, None, lists or dicts of them."
            ) from None
