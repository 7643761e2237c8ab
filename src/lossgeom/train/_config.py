"""The typed training configuration, read from YAML and validated before any work."""

from __future__ import annotations

import math
import os
from typing import Annotated, Any, Literal

from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from lossgeom.train._reading import format_errors, read_source

__all__ = [
    "AdaptiveConfig",
    "AugmentConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "ShiftConfig",
    "StartConfig",
    "StopConfig",
    "TrackingConfig",
    "TrainConfig",
    "load_config",
]

# Strict scalars: a boolean is not a number, a number not a boolean, a string
# neither; floats must be finite. (Integers are accepted where floats are asked.)
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]
PositiveFloat = Annotated[Float, Field(gt=0)]
PositiveInt = Annotated[Int, Field(gt=0)]


class ConfigError(ValueError):
    """An invalid training configuration; the message lists each bad field's path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Which network to train.

    Attributes:
        name: a name of ``lossgeom.zoo.models()`` (e.g. ``mlp``, ``resnet20``).
        factory: instead of ``name``, a user function ``"package.module:function"``
            returning an ``nn.Module`` (the only code a config may name).
        options: keyword options of the zoo model or the factory.
    """

    name: str | None = None
    factory: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.name is None) == (self.factory is None):
            raise ValueError(
                "give exactly one of model.name (a zoo model) or model.factory "
                "('package.module:function')"
            )
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(
                f"model.factory must look like 'package.module:function'; got "
                f"{self.factory!r}"
            )
        if self.name is not None:
            from lossgeom.zoo import models

            known = models()
            if self.name not in known:
                raise ValueError(
                    f"unknown zoo model {self.name!r}; valid names: {sorted(known)}"
                )
            bad = sorted(set(self.options) - set(known[self.name]))
            if bad:
                raise ValueError(
                    f"unknown option(s) {bad} for model {self.name!r}; valid options "
                    f"(with defaults): {known[self.name]}"
                )
        return self


class ShiftConfig(_Strict):
    """A domain shift applied to the test split (see ``lossgeom.zoo.shift``)."""

    kind: Literal["rotate", "noise", "rebalance"]
    severity: Annotated[Float, Field(ge=0)]


class DataConfig(_Strict):
    """The training data and the held-out evaluation data.

    Attributes:
        name: a name of ``lossgeom.zoo.datasets()`` (e.g. ``digits``, ``mnist1d``).
        root: folder of the standard files for data sets loaded from disk.
        subset: train on a seeded random subset of this many training samples.
        test_subset: evaluate on a seeded subset of the test split (``None``: all).
        seed: seed of the data set (generation, split and subsets).
        options: further options of the data set.
        test: evaluate on the test split (where the data set has one).
        shift: evaluate on a domain-shifted test split (``None``: as it is).
    """

    name: str
    root: str | None = None
    subset: PositiveInt | None = None
    test_subset: PositiveInt | None = None
    seed: Int = 0
    options: dict[str, Any] = Field(default_factory=dict)
    test: Bool = True
    shift: ShiftConfig | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from lossgeom.zoo import datasets

        known = datasets()
        if name not in known:
            raise ValueError(f"unknown data set {name!r}; valid names: {sorted(known)}")
        return name


class AdaptiveConfig(_Strict):
    """Curvature-adaptive step size ``eta_t = c / lambda_max`` (times the schedule).

    ``lambda_max`` is the top Hessian eigenvalue on the probe set, tracked by a
    warm-started Lanczos run every ``every`` steps. Gradient descent on a quadratic
    is stable for ``eta < 2 / lambda_max``, so ``c < 2`` keeps the step below the
    edge of stability and ``c = 1`` is the Newton step along the top direction.

    Attributes:
        c: numerator of the step size.
        every: steps between updates of ``lambda_max``.
        max_lr: upper bound on the step (guards against ``lambda_max`` near zero).
    """

    c: PositiveFloat = 1.0
    every: PositiveInt = 10
    max_lr: PositiveFloat = 10.0


class KFACConfig(_Strict):
    """K-FAC's options, those of ``lossgeom.optim.KFAC`` (docs/training.md, "K-FAC")."""

    damping: PositiveFloat = 0.03
    factor_decay: Annotated[Float, Field(ge=0, lt=1)] = 0.95
    cov_every: PositiveInt = 1
    inv_every: PositiveInt = 10
    fisher: Literal["mc", "ggn", "empirical"] = "mc"


class OptimConfig(_Strict):
    """The optimizer.

    Attributes:
        name: ``gd`` (full-batch gradient descent; ``batch_size`` is ignored),
            ``sgd``, ``adam``, ``adamw`` or ``kfac`` (its options: ``kfac``).
        lr: base step size.
        momentum, nesterov: heavy-ball (PyTorch's form), Nesterov; of gd, sgd, kfac.
        betas, eps: Adam's moment decay rates and denominator offset.
        weight_decay: L2 penalty (``adamw``: decoupled).
        adaptive: curvature-adaptive step size; ``None``: off.
        noise: the noise of ``sgd``'s steps: ``sgd``, the minibatch gradient's own;
            ``isotropic``, the full-batch gradient plus a uniformly random
            direction scaled to the norm of that step's minibatch noise (the same
            total variance, step by step, without its shape; one extra
            full-batch gradient per step; single-process training only).
    """

    name: Literal["gd", "sgd", "adam", "adamw", "kfac"] = "sgd"
    lr: PositiveFloat = 0.1
    momentum: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    nesterov: Bool = False
    betas: tuple[
        Annotated[Float, Field(ge=0, lt=1)], Annotated[Float, Field(ge=0, lt=1)]
    ] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    weight_decay: Annotated[Float, Field(ge=0)] = 0.0
    adaptive: AdaptiveConfig | None = None
    kfac: KFACConfig | None = None
    noise: Literal["sgd", "isotropic"] = "sgd"

    @model_validator(mode="after")
    def _consistent(self) -> OptimConfig:
        if self.noise == "isotropic" and self.name != "sgd":
            raise ValueError(
                "noise: isotropic replaces the minibatch noise of sgd; got optimizer "
                f"{self.name!r}. Use optim.name: sgd with a batch_size smaller "
                "than the training set."
            )
        if self.kfac is not None and self.name != "kfac":
            raise ValueError(f"a kfac section needs name: kfac; got {self.name!r}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0 (e.g. momentum: 0.9)")
        if self.name in ("adam", "adamw") and (self.momentum or self.nesterov):
            raise ValueError(
                f"momentum/nesterov: options of gd, sgd, kfac; {self.name} uses betas"
            )
        if self.adaptive is not None and self.name not in ("gd", "sgd"):
            raise ValueError(
                "the curvature-adaptive step size is defined for gd and sgd "
                f"(eta = c / lambda_max); got optimizer {self.name!r}"
            )
        return self


class ScheduleConfig(_Strict):
    """Step-size schedule: a factor multiplying ``lr`` at each step.

    Attributes:
        kind: ``constant``; ``step`` (times ``gamma`` every ``step_size`` steps);
            ``cosine`` (from 1 to ``min_factor`` over the steps after warm-up).
        warmup_steps: linear warm-up from ``1 / warmup_steps`` to 1.
        step_size: steps between decays of ``step``.
        gamma: decay factor of ``step``.
        min_factor: final factor of ``cosine``.
    """

    kind: Literal["constant", "step", "cosine"] = "constant"
    warmup_steps: Annotated[Int, Field(ge=0)] = 0
    step_size: PositiveInt = 1000
    gamma: Annotated[Float, Field(gt=0, le=1)] = 0.1
    min_factor: Annotated[Float, Field(ge=0, le=1)] = 0.0


class AugmentConfig(_Strict):
    """Image augmentation on tensors (inputs of shape ``(n, C, H, W)``).

    Attributes:
        crop_padding: random crop after zero padding by this many pixels (0: off).
        flip: random horizontal flip with probability 1/2.
    """

    crop_padding: Annotated[Int, Field(ge=0)] = 4
    flip: Bool = True


_BUILT_IN_COLUMNS = frozenset(
    {
        "step",
        "lr",
        "batch_loss",
        "train_loss",
        "train_accuracy",
        "test_loss",
        "test_accuracy",
        "grad_norm",
        "sharpness",
        "sharpness_residual",
        "eos_threshold",
        "eos_formula",
        "eos_ratio",
        "preconditioned_sharpness",
        "trace",
        "trace_stderr",
        "trace_method",
        "probe_seconds",
    }
)


class MeasureConfig(_Strict):
    """A measure of ``lossgeom.measures.CALLBACKS`` run on the probe set.

    Attributes:
        name: the measure (e.g. ``sharpness``, ``noise_scale``, ``effective_rank``).
        options: its keyword arguments (checked against its signature).
        every: steps between runs (``None``: at every metrics step); it runs at
            metrics steps divisible by it, and at the last step.
        key: the metrics column (default: the name, plus ``_<kind>`` for
            measures with kinds, e.g. ``sharpness_worst``).
    """

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    every: PositiveInt | None = None
    key: str | None = None

    @model_validator(mode="after")
    def _known(self) -> MeasureConfig:
        from lossgeom.measures import check_options, default_key

        check_options(self.name, self.options)
        column = self.key or default_key(self.name, self.options)
        if column in _BUILT_IN_COLUMNS:
            raise ValueError(
                f"measure column {column!r} is a built-in metric; give the measure "
                "another key (e.g. key: my_" + column + ")."
            )
        return self

    @property
    def column(self) -> str:
        """The metrics column this measure writes."""
        from lossgeom.measures import default_key

        return self.key or default_key(self.name, self.options)


class UpdateDimensionConfig(_Strict):
    """Effective dimension of the recent parameter updates, tracked while training.

    Every ``record_every`` steps the change of the parameters since the last record
    is kept (at most ``max_vectors``, the latest); each metrics row gets
    ``update_dimension``: the number of principal components explaining
    ``threshold`` of their variance (``lossgeom.effective_dimension``), and
    ``update_dimension_vectors``. After a resume the window starts again.

    Attributes:
        record_every: steps between records.
        max_vectors: window length.
        threshold: fraction of variance, in (0, 1].
    """

    record_every: PositiveInt = 1
    max_vectors: PositiveInt = 200
    threshold: Annotated[Float, Field(gt=0, le=1)] = 0.9


class MetricsConfig(_Strict):
    """What the callbacks measure, every ``every`` steps, into ``metrics.jsonl``.

    Attributes:
        every: steps between measurements (step 0 and the last step included).
        eval_samples: train/test loss and accuracy on seeded subsets of this size
            (``None``: the whole split).
        probe_samples: curvature (gradient norm, sharpness, trace) on a fixed
            seeded subset of the training data of this size (``None``: all of it).
        probe_mode: ``eval`` or ``train`` mode of the model during probes
            (BatchNorm: running or batch statistics).
        sharpness: top Hessian eigenvalue, warm-started from the last one.
        sharpness_tol: its relative residual tolerance.
        sharpness_max_matvecs: its product budget per measurement.
        trace_max_matvecs: Hessian trace with standard error (0: off).
        measures: further measures by name (sharpness, gradient noise, ...),
            each writing ``<name>``, ``<name>_stderr`` and ``<name>_seconds``.
        update_dimension: track the effective dimension of recent updates.
        advice: the training advisor (docs/advice.md): each row gets ``advice``
            (the ids of the rules that fire on the rows so far) and
            ``advice_count``; the recommendations go to ``<run_dir>/advice/``.
    """

    every: PositiveInt = 50
    eval_samples: PositiveInt | None = 2048
    probe_samples: PositiveInt | None = 1024
    probe_mode: Literal["eval", "train"] = "eval"
    sharpness: Bool = True
    sharpness_tol: PositiveFloat = 1e-3
    sharpness_max_matvecs: PositiveInt = 60
    trace_max_matvecs: Annotated[Int, Field(ge=0)] = 0
    measures: list[MeasureConfig] = Field(default_factory=list)
    update_dimension: UpdateDimensionConfig | None = None
    advice: Bool = False

    @model_validator(mode="after")
    def _distinct_columns(self) -> MetricsConfig:
        columns = [m.column for m in self.measures]
        taken = sorted({"advice", "advice_count"} & set(columns)) if self.advice else []
        if taken:
            raise ValueError(
                f"measure column {taken} is written by the advisor (advice: true); "
                "give the measure another key."
            )
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise ValueError(
                f"two measures write the same column {twice}; give them distinct keys."
            )
        return self


class CheckpointConfig(_Strict):
    """When to save weights, optimizer state and RNG state.

    Attributes:
        every: save every this many steps (``None``: only at ``steps`` and the end).
        steps: extra steps to save at.
        keep_last: keep only this many periodic checkpoints (``None``: all); the
            ones at ``steps`` and the final one are always kept.
    """

    every: PositiveInt | None = None
    steps: list[Annotated[Int, Field(ge=0)]] = Field(default_factory=list)
    keep_last: PositiveInt | None = None


class StartConfig(_Strict):
    """A starting point reached before step 0 by full-batch gradient descent.

    From the seeded initialisation, ``steps`` plain gradient-descent updates at
    ``lr`` on the whole training set (no momentum, schedule, metrics or
    checkpoints) give the weights of step 0. Every run of a seed with the same
    model, data and ``start`` begins at the same point, as escape experiments
    need: reach a minimum by full-batch descent, then compare the noise of the
    steps that follow (``optim.noise``). A resumed run does not descend again.

    Attributes:
        steps: descent steps.
        lr: their step size.
    """

    steps: PositiveInt
    lr: PositiveFloat


class StopConfig(_Strict):
    """Stopping before ``steps``.

    Attributes:
        train_loss: stop at the first metrics step whose ``train_loss`` (on the
            ``metrics.eval_samples`` subset) is at most this value; the run ends
            ``finished`` there, with the final checkpoint and the reason in
            ``status.json``. Runs compared "at the same train loss" use it; its
            resolution is ``metrics.every`` steps. ``None``: train all ``steps``.
    """

    train_loss: PositiveFloat | None = None


class TrackingConfig(_Strict):
    """Copies of every metrics row for experiment trackers.

    Attributes:
        tensorboard: write TensorBoard event files to ``<run_dir>/tensorboard``.
        wandb: ``offline``: a Weights & Biases offline run in ``<run_dir>/wandb``
            (never contacts a server); ``None``: off.
    """

    tensorboard: Bool = False
    wandb: Literal["offline"] | None = None


class TrainConfig(_Strict):
    """A whole training run; every default is visible here.

    Attributes:
        name: a label recorded with the run.
        seed: seed of initialisation, batch order, augmentation and probes.
        model, data, optim, schedule, checkpoint: see their classes.
        metrics: the callbacks (``None``: no measurements; ``metrics.jsonl``
            stays empty).
        loss: ``cross_entropy``, or ``mse``: ``0.5 * ||f(x) - onehot(y)||^2``
            summed over classes and averaged over samples (regression targets
            are used as given).
        steps: optimizer steps (at most; see ``stop``).
        start: reach step 0 by full-batch gradient descent first (``None``: start
            at the initialisation).
        stop: stop earlier, at a train loss.
        batch_size: samples per step (``None`` or ``gd``: the whole training set).
        augment: image augmentation (``None``: off).
        bf16: forward and backward passes under bfloat16 autocast.
        grad_checkpointing: recompute activations of the model's blocks in the
            backward pass instead of storing them.
        device: ``cpu``, ``cuda``, ... (``None``: CUDA when present).
        dtype: parameter dtype.
        tracking: copies of the metrics rows for TensorBoard or W&B (``None``:
            off).
    """

    name: str = "run"
    seed: Int = 0
    model: ModelConfig
    data: DataConfig
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    steps: PositiveInt = 1000
    start: StartConfig | None = None
    stop: StopConfig = Field(default_factory=StopConfig)
    batch_size: PositiveInt | None = 128
    augment: AugmentConfig | None = None
    bf16: Bool = False
    grad_checkpointing: Bool = False
    metrics: MetricsConfig | None = Field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    device: str | None = None
    dtype: Literal["float32", "float64"] = "float32"
    tracking: TrackingConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        tracked = self.tracking is not None and (
            self.tracking.tensorboard or self.tracking.wandb is not None
        )
        if tracked and self.metrics is None:
            raise ValueError(
                "tracking copies the metrics rows, but 'metrics' is null, so no row "
                "is ever written; set 'metrics' (e.g. metrics: {every: 50}) or "
                "remove 'tracking'"
            )
        if self.stop.train_loss is not None and self.metrics is None:
            raise ValueError(
                "stop.train_loss needs the metrics callbacks (they measure "
                "train_loss); remove 'metrics: null' or the stop rule"
            )
        if self.schedule.warmup_steps >= self.steps:
            raise ValueError(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) must be "
                f"smaller than steps ({self.steps})"
            )
        late = [s for s in self.checkpoint.steps if s > self.steps]
        if late:
            raise ValueError(
                f"checkpoint.steps {late} lie after the last step ({self.steps})"
            )
        if self.optim.noise == "isotropic" and self.batch_size is None:
            raise ValueError(
                "optim.noise: isotropic needs minibatches to take the noise's size "
                "from; set batch_size smaller than the training set"
            )
        if self.bf16 and self.dtype == "float64":
            raise ValueError("bf16 autocast needs dtype float32")
        return self

    @property
    def full_batch(self) -> bool:
        """Whether every step uses the whole training set."""
        return self.optim.name == "gd" or self.batch_size is None


def _non_finite(value: Any, path: str) -> list[str]:
    """Paths of the non-finite floats in plain data (options dicts included)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"  {path}: must be a finite number (got {value!r})"]
    if isinstance(value, dict):
        found = []
        for k, v in value.items():
            found += _non_finite(v, f"{path}.{k}" if path else str(k))
        return found
    if isinstance(value, (list, tuple)):
        found = []
        for i, v in enumerate(value):
            found += _non_finite(v, f"{path}.{i}")
        return found
    return []


def load_config(source: TrainConfig | dict | str | os.PathLike) -> TrainConfig:
    """Validate a training config from a dict, a YAML file, or a ready config.

    Args:
        source: a :class:`TrainConfig`, a dict, or the path of a YAML file.

    Returns:
        The validated config.

    Raises:
        ConfigError: naming each invalid field by its path and the reason.
        FileNotFoundError: the YAML file does not exist.

    Example:
        >>> cfg = load_config({"model": {"name": "mlp"}, "data": {"name": "digits"},
        ...                    "optim": {"name": "gd", "lr": 0.1}, "steps": 10})
        >>> cfg.full_batch, cfg.optim.momentum
        (True, 0.0)
        >>> load_config({"model": {"name": "mlp"}, "data": {"name": "digits"},
        ...              "optim": {"lr": -1}})
        Traceback (most recent call last):
        ...
        lossgeom.train._config.ConfigError: invalid training config (dict):
          optim.lr: Input should be greater than 0 (got -1)
    """
    if isinstance(source, TrainConfig):
        return source
    source, where = read_source(
        source, "training config", "model, data, optim", ConfigError
    )
    if not isinstance(source, dict):
        raise ConfigError(
            f"a training config is a mapping of fields (model, data, optim, ...); "
            f"got a {type(source).__name__}."
        )
    bad = _non_finite(source, "")
    if bad:
        raise ConfigError("\n".join([f"invalid training config ({where}):", *bad]))
    try:
        return TrainConfig.model_validate(source)
    except ValidationError as err:
        raise ConfigError(
            format_errors(err, f"invalid training config ({where})")
        ) from None
