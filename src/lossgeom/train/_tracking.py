"""Copies of the metrics rows for experiment trackers: TensorBoard and W&B offline.

``config.tracking`` adds one callback per tracker. Each forwards **the rows that
were written to** ``metrics.jsonl``, not the row being built: a row is complete
only after every callback (the user's too) ran ``on_eval`` and the loop appended
it, so a tracker reads the lines appended since its last look at its next hook
(``on_step`` after a metrics step, and ``on_train_end``). What a tracker shows is
then exactly what ``metrics.jsonl`` holds, user columns, ``probe_seconds`` and
the divergence row included, and a row that was not written (a probe that met a
non-finite value) is not shown either.

Of each row the numbers are forwarded: every ``int`` or ``float`` column, keyed
by its name, at the row's ``step`` (``step`` itself is the x axis, not a
series). Strings (non-finite values are written as ``"NaN"`` or
``"Infinity"``), ``None``, booleans, lists and dicts are left out.

Both packages are optional and imported only when a config asks for them; a
missing one is a :class:`~lossgeom.train.ConfigError` naming the ``pip``
command, raised when the run is built, before the first step.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import weakref
from pathlib import Path
from typing import Any

from lossgeom._io import atomic_write_text
from lossgeom.train._callbacks import Callback, TrainState
from lossgeom.train._config import ConfigError, TrainConfig

__all__ = ["TensorBoardTracker", "WandbTracker", "tracking_callbacks"]

METRICS = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_RUN_ID = "run_id"  # in <run_dir>/wandb: the W&B id every call of the run uses
WANDB_MIN_VERSION = (0, 19, 10)  # reinit="create_new": several runs per process


def tracking_callbacks(config: TrainConfig) -> list[Callback]:
    """The tracker callbacks ``config.tracking`` asks for, checked before training.

    Args:
        config: the run's config.

    Returns:
        A :class:`TensorBoardTracker` and/or a :class:`WandbTracker` (empty when
        ``tracking`` is ``None`` or asks for nothing).

    Raises:
        ConfigError: a tracker's package is missing or too old. (Tracking
            without ``metrics`` is refused when the config is validated.)
    """
    tracking = config.tracking
    if tracking is None or not (tracking.tensorboard or tracking.wandb):
        return []
    found: list[Callback] = []
    if tracking.tensorboard:
        found.append(TensorBoardTracker())
    if tracking.wandb is not None:
        found.append(WandbTracker(config))
    return found


class _RowTracker(Callback):
    """Forwards each row appended to ``metrics.jsonl`` to a sink.

    The sink is opened in ``on_train_start`` (a call that finds a finished run
    fires no hook and opens nothing) and closed in ``on_train_end``. A call that
    raises fires no further hook; the sink is then closed, as failed, when this
    callback is garbage-collected (in CPython as soon as the exception is
    dropped) or at interpreter exit, whichever comes first, after forwarding
    the rows written before the failure.
    """

    def __init__(self) -> None:
        self._sink: _Sink | None = None
        self._rows: _NewRows | None = None
        self._closer: weakref.finalize | None = None
        self._due = False

    def _open(self, state: TrainState) -> _Sink:
        raise NotImplementedError

    def on_train_start(self, state: TrainState) -> None:
        """Open the sink; rows already in ``metrics.jsonl`` were forwarded before."""
        self._rows = _NewRows(state.run_dir / METRICS)
        self._sink = self._open(state)
        self._closer = weakref.finalize(self, _abandon, self._sink, self._rows)

    def on_eval(self, state: TrainState) -> None:
        """Note that a row is coming; it is written after every callback ran."""
        self._due = True

    def on_step(self, state: TrainState) -> None:
        """Forward the row written at the metrics step before this update."""
        if self._due:
            self._due = False
            _forward(self._sink, self._rows)

    def on_train_end(self, state: TrainState) -> None:
        """Forward the last rows (the final one, a divergence) and close the sink."""
        if self._closer is not None and self._closer.detach() is not None:
            _close(self._sink, self._rows, state.status)


class TensorBoardTracker(_RowTracker):
    """Every metrics row as TensorBoard scalars in ``<run_dir>/tensorboard``.

    Uses ``torch.utils.tensorboard.SummaryWriter``: one scalar series per
    numeric column (its name is the tag), ``global_step`` the row's step, the
    value stored as float32; the writer is flushed after each row. A resumed
    call writes a new event file with ``purge_step`` at the resumed step, so
    TensorBoard hides the rows of the earlier call from that step on and shows
    the ones written again.

    Raises:
        ConfigError: ``tensorboard`` is not installed.
    """

    def __init__(self) -> None:
        super().__init__()
        self._writer_class = _import_tensorboard()

    def _open(self, state: TrainState) -> _Sink:
        log_dir = state.run_dir / TENSORBOARD_DIR
        earlier = log_dir.is_dir() and any(log_dir.glob("events.out.tfevents.*"))
        writer = self._writer_class(
            log_dir=str(log_dir), purge_step=state.step if earlier else None
        )
        return _TensorBoardSink(writer)


class WandbTracker(_RowTracker):
    """Every metrics row in a Weights & Biases offline run in ``<run_dir>/wandb``.

    ``wandb.init(mode="offline", dir=run_dir, project="lossgeom",
    name=config.name, config=<the resolved config>)`` with
    ``reinit="create_new"``: several runs (and the user's own) live side by side
    in one process, and none is finished but this one. It never contacts a
    server, whatever ``WANDB_MODE`` says, and prints nothing (``silent``, no
    console capture, no system metrics). Each row goes to ``run.log(numbers,
    step=row_step)``; the run finishes in ``on_train_end`` (exit code 0 for
    ``finished`` and ``diverged``; the status in the summary) or, for a call
    that raised, with exit code 1 (see :class:`_RowTracker`).

    Every call of :func:`~lossgeom.train` on one run directory logs under one
    W&B run id, stored in ``<run_dir>/wandb/run_id``, with ``resume="allow"``:
    each call writes its own ``offline-run-*`` folder, and ``wandb sync`` of
    them in order rebuilds one W&B run (a resumed call's rows at steps already
    logged repeat those of a deterministic run).

    Args:
        config: the run's config (its name, and its plain form as W&B config).

    Raises:
        ConfigError: ``wandb`` is not installed or older than 0.19.10.
    """

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        self._wandb = _import_wandb()
        self._config = config

    def _open(self, state: TrainState) -> _Sink:
        wandb = self._wandb
        run = wandb.init(
            mode="offline",
            dir=str(state.run_dir),
            project="lossgeom",
            name=self._config.name,
            id=_stable_id(state.run_dir / WANDB_DIR),
            resume="allow",
            config=self._config.model_dump(mode="json"),
            reinit="create_new",
            settings=_quiet_settings(wandb),
        )
        return _WandbSink(run)


# ------------------------------------------------------------------------- sinks
class _Sink:
    """Where rows go: numbers by column at a step."""

    def write(self, step: int, numbers: dict[str, int | float]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make the rows written so far durable."""

    def close(self, status: str) -> None:
        raise NotImplementedError


class _TensorBoardSink(_Sink):
    def __init__(self, writer: Any):
        self.writer = writer

    def write(self, step: int, numbers: dict[str, int | float]) -> None:
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class _WandbSink(_Sink):
    def __init__(self, run: Any):
        self.run = run

    def write(self, step: int, numbers: dict[str, int | float]) -> None:
        self.run.log(numbers, step=step)

    def close(self, status: str) -> None:
        self.run.summary["status"] = status
        self.run.finish(exit_code=1 if status == "failed" else 0)


def _forward(sink: _Sink, rows: _NewRows) -> None:
    """Write the rows appended since the last call, then flush."""
    for row in rows.read():
        numbers = {
            k: v
            for k, v in row.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
        }
        if numbers:
            sink.write(row["step"], numbers)
    sink.flush()


def _close(sink: _Sink, rows: _NewRows, status: str) -> None:
    """Forward what is left, then close the sink (also when forwarding fails)."""
    try:
        _forward(sink, rows)
    finally:
        sink.close(status)


def _abandon(sink: _Sink, rows: _NewRows) -> None:
    """Close the sink of a call that raised (a finalizer: it must not raise)."""
    with contextlib.suppress(Exception):
        _close(sink, rows, "failed")


class _NewRows:
    """The rows appended to ``metrics.jsonl`` since the last read.

    Starts at the file's end when made (rows written by earlier calls, or kept
    when resuming, are not read again); reads complete lines only.
    """

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.is_file() else 0

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits
        self.offset += end
        rows = []
        for raw in data[:end].splitlines():
            try:
                row = json.loads(raw)
            except ValueError:  # damaged: MetricsLog reports it
                continue
            step = row.get("step") if isinstance(row, dict) else None
            if isinstance(step, int) and not isinstance(step, bool):
                rows.append(row)
        return rows


# ----------------------------------------------------------------------- imports
def _import_tensorboard() -> type:
    """``SummaryWriter``, or a ``ConfigError`` saying how to install it."""
    try:
        import tensorboard  # noqa: F401 - torch.utils.tensorboard may be cached
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError(
            "tracking.tensorboard needs the 'tensorboard' package, which is not "
            f"installed ({err}); install it with `pip install tensorboard` (or "
            "`pip install 'lossgeom[tracking]'`), or set tracking.tensorboard: false"
        ) from err
    return SummaryWriter


def _import_wandb() -> Any:
    """The ``wandb`` module, or a ``ConfigError`` saying how to install it.

    Turns W&B's error reporting off unless ``WANDB_ERROR_REPORTING`` is set: it
    is read from the environment when the W&B service starts, and would send
    crash reports over the network.
    """
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    try:
        import wandb
    except ImportError as err:
        raise ConfigError(
            "tracking.wandb needs the 'wandb' package, which is not installed "
            f"({err}); install it with `pip install wandb` (or `pip install "
            "'lossgeom[tracking]'`), or set tracking.wandb: null"
        ) from err
    version = getattr(wandb, "__version__", "0")
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:3])
    if numbers < WANDB_MIN_VERSION:
        raise ConfigError(
            f"tracking.wandb needs wandb >= 0.19.10 (several runs in one process); "
            f"found {version}. Upgrade it with `pip install -U wandb`."
        )
    return wandb


def _quiet_settings(wandb: Any) -> Any:
    """Settings that print nothing, capture no console and sample no system stats."""
    wanted = {
        "silent": True,
        "console": "off",
        "save_code": False,
        "disable_git": True,
        "x_disable_stats": True,
        "x_disable_meta": True,
        "x_disable_machine_info": True,
    }
    known = getattr(wandb.Settings, "model_fields", wanted)
    return wandb.Settings(**{k: v for k, v in wanted.items() if k in known})


def _stable_id(folder: Path) -> str:
    """The W&B run id of this run directory, made and stored on first use."""
    path = folder / WANDB_RUN_ID
    if path.is_file():
        stored = path.read_text(encoding="utf-8").strip()
        if re.fullmatch(r"[a-z0-9]{8,32}", stored):
            return stored
    folder.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(4)
    atomic_write_text(path, run_id + "\n")
    return run_id
