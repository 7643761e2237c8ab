"""The checkpointing callback: periodic and final checkpoints, and resuming."""

from __future__ import annotations

import warnings
from pathlib import Path

from lossgeom.train._callbacks import Callback, TrainState
from lossgeom.train._config import TrainConfig
from lossgeom.train._distributed import Ranks
from lossgeom.train._probes import Sharpness
from lossgeom.train._rundir import DamagedFileError, log_event
from lossgeom.train._schedule import StepSize
from lossgeom.train._state import (
    Checkpoint,
    apply_checkpoint,
    checkpoints,
    read_checkpoint,
    save_checkpoint,
)

__all__ = ["Checkpointer"]


class Checkpointer(Callback):
    """Save checkpoints at ``checkpoint.every`` / ``checkpoint.steps`` and the end.

    A checkpoint after ``s`` updates holds what the run needs to go on exactly
    as if never stopped: weights, optimizer, RNG, the batch loss of update
    ``s - 1``, and the warm starts of the tracked eigenpairs (the sharpness
    probe's and the adaptive step size's). A periodic checkpoint is written in
    ``on_step`` (before the step's measurements); the final one in
    ``on_train_end`` of a finished run (after the last measurements). With
    ``checkpoint.keep_last``, older periodic checkpoints are deleted.

    Resuming loads the newest checkpoint that verifies; damaged ones are
    skipped with a warning naming them, a line in the run's ``events.log``, and
    listed in ``skipped`` (``(sidecar name, reason)``).

    Under data parallelism only rank 0 writes checkpoints; on resume it chooses
    the checkpoint (and tidies and logs) and every rank loads that one.

    Args:
        folder: the run's ``checkpoints/`` folder.
        cfg: the run's config (saved in every checkpoint).
        step_size: the step size rule, whose ``lambda_max`` is saved.
        sharpness: the sharpness probe, whose warm start is saved (``None``:
            no sharpness probe).
        ranks: the run's ranks (default: one process).
    """

    def __init__(
        self,
        folder: Path,
        cfg: TrainConfig,
        step_size: StepSize,
        sharpness: Sharpness | None,
        ranks: Ranks | None = None,
    ):
        self.folder, self.cfg = folder, cfg
        self.step_size, self.sharpness = step_size, sharpness
        self.ranks = ranks if ranks is not None else Ranks()
        self.skipped: list[tuple[str, str]] = []

    def restore(self, state: TrainState) -> None:
        """Load the newest checkpoint that verifies, if any, into the run."""
        chosen: list[Checkpoint] = []  # rank 0's choice

        def choose() -> tuple[int | None, list[tuple[str, str]]]:
            ckpt = self._newest(state)
            if ckpt is None:
                return None, self.skipped
            chosen.append(ckpt)
            return ckpt.step, self.skipped

        step, self.skipped = self.ranks.from_writer(choose)
        if step is None:
            return
        if chosen:
            ckpt = chosen[0]
        else:  # another rank: the checkpoint rank 0 chose
            sidecar = self.folder / f"step_{step:07d}.json"
            try:
                ckpt = read_checkpoint(sidecar, state.model)
            except (OSError, DamagedFileError) as err:
                err.add_note(
                    f"rank {self.ranks.rank} loads the checkpoint rank 0 resumes "
                    "from; the run directory must be on a file system every rank "
                    "can read."
                )
                raise
        self._apply(state, ckpt)

    def _newest(self, state: TrainState) -> Checkpoint | None:
        """The newest checkpoint that verifies (damaged ones skipped and logged)."""
        if self.folder.is_dir():  # temp files of saves cut short (the run is locked)
            for tmp in self.folder.glob(".step_*"):
                tmp.unlink(missing_ok=True)
        ckpt = None
        for _, sidecar in reversed(checkpoints(self.folder)):
            try:
                ckpt = read_checkpoint(sidecar, state.model)
                break
            except DamagedFileError as err:
                self.skipped.append((sidecar.name, str(err)))
        if self.skipped:
            names = ", ".join(name for name, _ in self.skipped)
            where = f"step {ckpt.step}" if ckpt is not None else "the start"
            message = (
                f"skipped damaged checkpoints in {self.folder}: {names}; resuming "
                f"from {where}"
            )
            warnings.warn(message, RuntimeWarning, stacklevel=6)  # in train()
            log_event(state.run_dir, message)
            for _, reason in self.skipped:
                log_event(state.run_dir, f"  {reason}")
        return ckpt

    def _apply(self, state: TrainState, ckpt: Checkpoint) -> None:
        meta, tensors = apply_checkpoint(ckpt, state.model, state.optimizer)
        extra = meta["extra"]
        state.step = state.resumed_from = int(meta["step"])
        state.batch_loss = extra.get("last_loss")
        self.step_size.v0 = tensors.get("adapt_v0")
        self.step_size.lam = extra.get("adapt_lambda")
        if self.sharpness is not None:
            self.sharpness.v0 = tensors.get("probe_v0")
            self.sharpness.last = extra.get("last_sharpness")

    def on_step(self, state: TrainState) -> None:
        if self.ranks.writer and state.step < self.cfg.steps and self._due(state.step):
            self._save(state)

    def on_train_end(self, state: TrainState) -> None:
        if (
            self.ranks.writer
            and state.status == "finished"
            and state.step != state.resumed_from
        ):
            self._save(state)

    def _due(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return step in self.cfg.checkpoint.steps or (
            every is not None and step % every == 0
        )

    def _save(self, state: TrainState) -> None:
        tensors = {}
        probe_v0 = self.sharpness.v0 if self.sharpness is not None else None
        if probe_v0 is not None:
            tensors["probe_v0"] = probe_v0
        if self.step_size.v0 is not None:
            tensors["adapt_v0"] = self.step_size.v0
        save_checkpoint(
            self.folder,
            state.step,
            state.model,
            state.optimizer,
            config=self.cfg.model_dump(mode="json"),
            extra_tensors=tensors,
            extra={
                "adapt_lambda": self.step_size.lam,
                "last_sharpness": (
                    self.sharpness.last if self.sharpness is not None else None
                ),
                "last_loss": state.batch_loss,
            },
        )
        self._prune()

    def _prune(self) -> None:
        keep = self.cfg.checkpoint.keep_last
        if keep is None:
            return
        pinned = set(self.cfg.checkpoint.steps) | {self.cfg.steps}
        periodic = [(t, p) for t, p in checkpoints(self.folder) if t not in pinned]
        for _, p in periodic[:-keep]:
            p.unlink(missing_ok=True)  # the sidecar first: no sidecar, no checkpoint
            p.with_suffix(".safetensors").unlink(missing_ok=True)
