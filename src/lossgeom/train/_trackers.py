"""Built-in tracking callbacks: named measures, and the dimension of recent updates."""

from __future__ import annotations

from lossgeom.measures import TrajectoryRecorder, run_measure
from lossgeom.objective import Objective
from lossgeom.train._callbacks import Callback, TrainState
from lossgeom.train._config import MeasureConfig, UpdateDimensionConfig

__all__ = ["Measures", "UpdateDimension"]


class Measures(Callback):
    """The ``metrics.measures`` entries, each under its column.

    A measure runs at the metrics steps that are multiples of its ``every``
    (every metrics step for ``None``) and at the last step. One that cannot be
    taken at a step (e.g. the log determinant of an indefinite Hessian) writes
    ``None`` and ``<column>_failed`` with the reason; training goes on.

    Args:
        specs: the measures.
        seed: seed of their random probes (plus the step).
    """

    def __init__(self, specs: list[MeasureConfig], seed: int):
        self.specs, self.seed = specs, seed

    def on_eval(self, state: TrainState) -> None:
        last = state.step == state.config.steps
        for spec in self.specs:
            if spec.every is None or state.step % spec.every == 0 or last:
                state.row.update(
                    _measure(spec, state.objective, self.seed + state.step)
                )


def _measure(spec: MeasureConfig, objective: Objective, seed: int) -> dict:
    """The row entries of one measure, or its failure."""
    try:
        return run_measure(spec.name, objective, spec.options, seed, key=spec.column)
    except (ValueError, RuntimeError, ArithmeticError) as err:
        return {
            spec.column: None,
            f"{spec.column}_failed": f"{type(err).__name__}: {err}",
        }


class UpdateDimension(Callback):
    """``update_dimension`` of the recent updates and ``update_dimension_vectors``.

    Records the change of the weights every ``record_every`` updates (at most
    ``max_vectors``, the latest) from the start of each call of ``train``;
    ``update_dimension`` is ``None`` until two are recorded.

    Args:
        track: what to record and the variance threshold.
    """

    def __init__(self, track: UpdateDimensionConfig):
        self.track = track
        self.recorder: TrajectoryRecorder | None = None

    def on_train_start(self, state: TrainState) -> None:
        self.recorder = TrajectoryRecorder(
            state.model,
            what="updates",
            every=self.track.record_every,
            max_vectors=self.track.max_vectors,
        )

    def on_step(self, state: TrainState) -> None:
        self.recorder()

    def on_eval(self, state: TrainState) -> None:
        n = len(self.recorder)
        state.row["update_dimension_vectors"] = n
        state.row["update_dimension"] = (
            self.recorder.result(self.track.threshold).dimension if n >= 2 else None
        )
