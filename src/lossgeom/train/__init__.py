"""Layer 3: training that measures its own geometry.

``lossgeom.train(config)`` (re-exported at the top level) runs a training loop from a
typed, validated config: full-batch GD, SGD (momentum, Nesterov), Adam/AdamW,
schedules with warm-up, weight decay, image augmentation on tensors, bf16 autocast,
activation checkpointing; callbacks (:class:`Callback`, built-in and the user's)
every k steps write losses, accuracy, gradient norm, sharpness (warm-started
Lanczos) against the edge-of-stability threshold and the Hessian trace with its
standard error to ``metrics.jsonl``; an optional curvature-adaptive step size
``c / lambda_max``; atomic safetensors checkpoints that resume to the same final
weights, verified on load; one writer per run directory (an OS file lock);
divergence recorded, not raised; a failure recorded in ``status.json``; the
training advisor (:func:`advise`, ``metrics.advice``), whose rules turn early
probes into recommended config changes (docs/advice.md).
"""

import sys
import types

from lossgeom.train._advice import Advice, AdviceResult, recommend
from lossgeom.train._advice_base import AdviceThresholds
from lossgeom.train._advice_rules import RULES
from lossgeom.train._advise import advise
from lossgeom.train._batches import augment
from lossgeom.train._build import HalfSquaredError, build_model
from lossgeom.train._callbacks import Callback, TrainState
from lossgeom.train._config import (
    AdaptiveConfig,
    AugmentConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    MeasureConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    ShiftConfig,
    StartConfig,
    StopConfig,
    TrackingConfig,
    TrainConfig,
    UpdateDimensionConfig,
    load_config,
)
from lossgeom.train._loop import TrainResult, train
from lossgeom.train._probes import stability_threshold
from lossgeom.train._rundir import DamagedFileError, RunLockedError
from lossgeom.train._schedule import schedule_factor
from lossgeom.train._state import (
    MetricsLog,
    checkpoint_states,
    latest_checkpoint,
    load_checkpoint,
)

__all__ = [
    # config
    "AdaptiveConfig",
    "AugmentConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "MeasureConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "ShiftConfig",
    "StartConfig",
    "StopConfig",
    "TrackingConfig",
    "TrainConfig",
    "UpdateDimensionConfig",
    "load_config",
    # running
    "HalfSquaredError",
    "TrainResult",
    "augment",
    "build_model",
    "schedule_factor",
    "stability_threshold",
    "train",
    # callbacks
    "Callback",
    "TrainState",
    # advice
    "RULES",
    "Advice",
    "AdviceResult",
    "AdviceThresholds",
    "advise",
    "recommend",
    # run directories
    "DamagedFileError",
    "MetricsLog",
    "RunLockedError",
    "checkpoint_states",
    "latest_checkpoint",
    "load_checkpoint",
]


class _CallableModule(types.ModuleType):
    """Makes ``lossgeom.train(config)`` call :func:`train`.

    ``lossgeom.train`` stays this module, so ``import lossgeom.train as t`` and
    ``t.TrainConfig`` work as usual.
    """

    def __call__(self, *args, **kwargs) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
