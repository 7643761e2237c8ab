"""What a run is made of: device, run directory, data, model, loss, optimizer."""

from __future__ import annotations

import importlib
import inspect
import math
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from lossgeom._io import atomic_write_text
from lossgeom.objective import Objective
from lossgeom.train._callbacks import TrainState
from lossgeom.train._config import ConfigError, MetricsConfig, TrainConfig
from lossgeom.train._reading import read_yaml
from lossgeom.train._rundir import LOCK, DamagedFileError

__all__ = [
    "HalfSquaredError",
    "build_state",
    "check_factory",
    "prepare_run_dir",
    "resolve_device",
    "subset",
]


class HalfSquaredError(nn.Module):
    """``0.5 * ||f(x) - onehot(y)||^2`` summed over outputs, averaged over samples.

    Integer targets are one-hot encoded (by comparison with the class indices,
    which ``torch.func.vmap`` can batch for per-sample gradients, unlike
    ``one_hot``); float targets are used as given.
    """

    def forward(self, out: Tensor, y: Tensor) -> Tensor:
        if y.dtype in (torch.int64, torch.int32):
            classes = torch.arange(out.shape[-1], device=y.device)
            target = (y.unsqueeze(-1) == classes).to(out.dtype)
        else:
            target = y.reshape(out.shape).to(out.dtype)
        return 0.5 * ((out - target) ** 2).sum(-1).mean()


def resolve_device(cfg: TrainConfig) -> torch.device:
    """The run's device: ``cfg.device``, or CUDA when present, else the CPU."""
    try:
        device = torch.device(
            cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        )
    except RuntimeError as err:
        raise ValueError(
            f"device {cfg.device!r} is not a torch device: {err}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {cfg.device!r} asks for CUDA, which this machine does not have; "
            "set device: cpu (or leave it out to use CUDA only when present)."
        )
    return device


def check_factory(cfg: TrainConfig, allow_factory: bool) -> None:
    """Refuse a config whose model is a factory (code to run) unless allowed.

    Raises:
        ConfigError: ``model.factory`` is set and ``allow_factory`` is not.
    """
    if cfg.model.factory is not None and not allow_factory:
        raise ConfigError(
            f"model.factory {cfg.model.factory!r} names code to import and run; a "
            "config alone may not run code. If you trust this config, opt in with "
            "lg.train(config, allow_factory=True) or `lossgeom train "
            "--allow-factory` (build_model(config, allow_factory=True)); or use a "
            "zoo model (model.name)."
        )


def prepare_run_dir(run_dir: Path, cfg: TrainConfig, resume: bool) -> None:
    """Write ``config.yaml`` in a new run directory, or check the one it holds."""
    stored = run_dir / "config.yaml"
    dumped = cfg.model_dump(mode="json")
    if stored.is_file():
        try:
            old = read_yaml(stored.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise DamagedFileError(
                f"{stored} (the run's resolved config) is damaged: not valid YAML "
                f"({err}). Restore it from a checkpoint's sidecar (its 'config'), "
                "or choose another run directory."
            ) from None
        if old != dumped:
            raise ValueError(
                f"{run_dir} holds a run with a different config; resuming would mix "
                "two runs. Choose another run directory, or delete this one."
            )
        if not resume:
            raise ValueError(
                f"{run_dir} already holds this run and resume=False; pass "
                "resume=True to continue it, or choose another run directory."
            )
        return
    if run_dir.exists() and any(p.name != LOCK for p in run_dir.iterdir()):
        raise ValueError(
            f"{run_dir} is not empty and holds no lossgeom run (no config.yaml); "
            "choose an empty or new run directory."
        )
    atomic_write_text(stored, yaml.safe_dump(dumped, sort_keys=False))


def build_model(
    config: TrainConfig | dict,
    *,
    device: torch.device | str | None = None,
    allow_factory: bool = False,
) -> nn.Module:
    """The model a config trains, initialised from its seed as training starts.

    The training data is loaded to size the model (input shape, classes), as
    :func:`~lossgeom.train` does; the model is placed on ``device`` (default: the
    config's) in the config's dtype. Loading a trained state dict into it gives
    back a trained model (this is how a saved :class:`TrainResult` reloads).

    Args:
        config: a :class:`TrainConfig` or its plain-dict form.
        device: where to put the model.
        allow_factory: build a ``model.factory`` (runs the code it names).

    Returns:
        The freshly initialised model.

    Raises:
        ConfigError: ``model.factory`` is set and ``allow_factory`` is not.
    """
    cfg = (
        config
        if isinstance(config, TrainConfig)
        else TrainConfig.model_validate(config)
    )
    check_factory(cfg, allow_factory)
    device = torch.device(device) if device is not None else resolve_device(cfg)
    dtype = getattr(torch, cfg.dtype)
    train, _ = _load_data(cfg, test=False)
    X, y = _place(train, cfg, device, dtype)
    return _init_model(cfg, X, y, device, dtype)


def _init_model(
    cfg: TrainConfig, X: Tensor, y: Tensor, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = _build_model(cfg, X, y).to(device=device, dtype=dtype)
    if cfg.grad_checkpointing:
        _enable_checkpointing(model)
    return model


def build_state(
    cfg: TrainConfig, run_dir: Path, device: torch.device, allow_factory: bool = False
) -> TrainState:
    """Data, model (initialised from ``cfg.seed``), loss, optimizer, probe objective.

    The global random state is left as it was.
    """
    check_factory(cfg, allow_factory)
    dtype = getattr(torch, cfg.dtype)
    train, test = _load_data(cfg)
    X, y = _place(train, cfg, device, dtype)
    test = None if test is None else _place(test, cfg, device, dtype)
    classification = not y.is_floating_point()
    model = _init_model(cfg, X, y, device, dtype)
    if cfg.loss == "cross_entropy" and not classification:
        raise ValueError(
            f"loss cross_entropy needs class labels; data set {cfg.data.name!r} has "
            "float targets. Use loss: mse."
        )
    loss_fn = (
        nn.CrossEntropyLoss() if cfg.loss == "cross_entropy" else HalfSquaredError()
    )
    metrics = cfg.metrics or MetricsConfig()
    probe_set = subset((X, y), metrics.probe_samples, cfg.seed + 2)
    return TrainState(
        config=cfg,
        run_dir=run_dir,
        model=model,
        optimizer=_optimizer(cfg, model),
        loss_fn=loss_fn,
        objective=Objective(model, loss_fn, probe_set, mode=metrics.probe_mode),
        train_data=(X, y),
        test_data=test,
        device=device,
        classification=classification,
    )


def subset(
    data: tuple[Tensor, Tensor], size: int | None, seed: int
) -> tuple[Tensor, Tensor]:
    """A seeded random subset of ``size`` samples (all of them for ``None``)."""
    X, y = data
    if size is None or size >= X.shape[0]:
        return X, y
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(X.shape[0], generator=gen)[:size].to(X.device)
    return X[idx], y[idx]


def _place(
    part: tuple[Tensor, Tensor],
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Inputs (flat for an MLP) and float targets in the run's dtype, on its device."""
    inputs, targets = part
    if cfg.model.name == "mlp" and inputs.ndim > 2:
        inputs = inputs.flatten(1)
    target_dtype = dtype if targets.is_floating_point() else targets.dtype
    return (
        inputs.to(device=device, dtype=dtype),
        targets.to(device=device, dtype=target_dtype),
    )


def _load_data(cfg: TrainConfig, test: bool = True):
    from lossgeom.zoo import dataset

    d = cfg.data
    train = dataset(
        d.name, root=d.root, split="train", subset=d.subset, seed=d.seed, **d.options
    )
    want_test, test = test, None
    if d.test and want_test:
        test = dataset(
            d.name,
            root=d.root,
            split="test",
            subset=d.test_subset,
            seed=d.seed,
            **d.options,
        )
    if test is not None and d.shift is not None:
        from lossgeom.zoo import shift

        test = shift(*test, d.shift.kind, d.shift.severity, seed=d.seed)
    for name, part in (("train", train), ("test", test)):
        if part is not None and not (
            isinstance(part, tuple) and all(isinstance(t, Tensor) for t in part)
        ):
            raise ValueError(
                f"training needs the {name} data in memory as (inputs, targets) "
                f"tensors; data set {d.name!r} gave {type(part).__name__}. Pass "
                "data.subset to load a subset into memory."
            )
    return train, test


def _data_options(params, options: dict, X: Tensor, y: Tensor) -> dict:
    """Fill size options the user left out (input size, classes) from the data."""
    out = dict(options)
    guesses = {
        "in_features": math.prod(X.shape[1:]),
        "in_channels": X.shape[1] if X.ndim >= 3 else None,
        "image_size": X.shape[-1] if X.ndim == 4 else None,
        "seq_len": X.shape[-1] if X.ndim in (2, 3) else None,
        "num_classes": int(y.max()) + 1
        if not y.is_floating_point()
        else (y.shape[1] if y.ndim > 1 else 1),
    }
    for key, value in guesses.items():
        if key in params and key not in out and value is not None:
            out[key] = value
    return out


def _build_model(cfg: TrainConfig, X: Tensor, y: Tensor) -> nn.Module:
    if cfg.model.factory is not None:  # allowed by the caller (check_factory)
        module_name, _, fn_name = cfg.model.factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as err:
            raise ValueError(
                f"model.factory {cfg.model.factory!r} cannot be imported: {err}"
            ) from err
        params = inspect.signature(factory).parameters
        model = factory(**_data_options(params, cfg.model.options, X, y))
    else:
        from lossgeom.zoo import model as zoo_model
        from lossgeom.zoo import models

        params = models()[cfg.model.name]
        model = zoo_model(
            cfg.model.name, **_data_options(params, cfg.model.options, X, y)
        )
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"the model factory returned {type(model).__name__}, not an nn.Module."
        )
    return model


class _Checkpointed(nn.Module):
    """Run ``block`` under activation checkpointing while training."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            return _checkpoint(self.block, x, use_reentrant=False)
        return self.block(x)


def _enable_checkpointing(model: nn.Module) -> int:
    """Wrap the model's repeated blocks; returns how many were wrapped."""
    container = getattr(model, "blocks", None)
    if not isinstance(container, (nn.Sequential, nn.ModuleList)):
        container = model if isinstance(model, nn.Sequential) else None
    if container is None or len(container) == 0:
        raise ValueError(
            f"grad_checkpointing needs a model whose blocks are an nn.Sequential or "
            f"nn.ModuleList (attribute 'blocks', as in the zoo's ResNets and ViT) "
            f"or an nn.Sequential; {type(model).__name__} has neither. Set "
            "grad_checkpointing: false."
        )
    for i in range(len(container)):
        container[i] = _Checkpointed(container[i])
    return len(container)


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "kfac":  # hooks the model's layers (lossgeom.optim.KFAC)
        from lossgeom.optim import KFAC
        from lossgeom.train._config import KFACConfig

        k = o.kfac or KFACConfig()
        return KFAC(
            model,
            lr=o.lr,
            loss=cfg.loss,
            fisher=k.fisher,
            damping=k.damping,
            factor_decay=k.factor_decay,
            cov_every=k.cov_every,
            inv_every=k.inv_every,
            momentum=o.momentum,
            nesterov=o.nesterov,
            weight_decay=o.weight_decay,
            seed=cfg.seed,
        )
    params = model.parameters()
    if o.name in ("gd", "sgd"):
        return torch.optim.SGD(
            params,
            lr=o.lr,
            momentum=o.momentum,
            nesterov=o.nesterov,
            weight_decay=o.weight_decay,
        )
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
