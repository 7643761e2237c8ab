"""The step size of each update: the schedule, and the curvature-adaptive rule."""

from __future__ import annotations

import math

from torch import Tensor

from lossgeom.curvature import hessian
from lossgeom.objective import Objective
from lossgeom.train._config import MetricsConfig, TrainConfig
from lossgeom.train._probes import top_eigenpair

__all__ = ["StepSize", "schedule_factor"]


def schedule_factor(cfg: TrainConfig, step: int) -> float:
    """The schedule's multiplier of the step size at ``step`` (0-based update)."""
    s = cfg.schedule
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    t = step - s.warmup_steps
    if s.kind == "step":
        return s.gamma ** (t // s.step_size)
    if s.kind == "cosine":
        span = max(cfg.steps - s.warmup_steps, 1)
        return s.min_factor + (1 - s.min_factor) * 0.5 * (
            1 + math.cos(math.pi * t / span)
        )
    return 1.0


class StepSize:
    """The step size of each update: base step size times the schedule.

    With ``optim.adaptive`` the base is ``min(c / lambda_max, max_lr)``, where
    ``lambda_max`` (the top Hessian eigenvalue on the probe set) is refreshed
    every ``adaptive.every`` steps, warm-started from the last eigenvector, with
    the tolerance and budget of ``metrics`` (the defaults without metrics); until
    the first refresh the base is ``optim.lr``.

    Attributes:
        lam: the last ``lambda_max`` (``None`` before the first refresh;
            checkpointed).
        v0: its eigenvector (checkpointed).
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.metrics = cfg.metrics or MetricsConfig()
        self.lam: float | None = None
        self.v0: Tensor | None = None

    def lr(self, step: int) -> float:
        """The step size of update ``step`` with the current ``lambda_max``."""
        base = self.cfg.optim.lr
        a = self.cfg.optim.adaptive
        if a is not None and self.lam is not None:
            base = min(a.c / self.lam, a.max_lr) if self.lam > 0 else a.max_lr
        return base * schedule_factor(self.cfg, step)

    def due(self, step: int) -> bool:
        """Whether ``lambda_max`` is refreshed before update ``step``."""
        a = self.cfg.optim.adaptive
        return a is not None and step % a.every == 0

    def refresh(self, objective: Objective, step: int) -> None:
        """Measure ``lambda_max`` of ``objective`` at its model's current weights."""
        top = top_eigenpair(
            hessian(objective), self.metrics, self.cfg.seed + step, self.v0
        )
        self.v0, self.lam = top.vector, top.value
