"""The training loop: optimizer, schedule, augmentation, probes, checkpoints, resume."""

from __future__ import annotations

import importlib
import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from lossgeom._io import atomic_write_text
from lossgeom.curvature import hessian
from lossgeom.measures import TrajectoryRecorder
from lossgeom.objective import NonFiniteError
from lossgeom.train._config import MetricsConfig, TrainConfig, load_config
from lossgeom.train._probes import Prober
from lossgeom.train._state import (
    MetricsLog,
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    read_status,
    save_checkpoint,
    write_status,
)

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        run_dir: the run directory (``config.yaml``, ``metrics.jsonl``,
            ``status.json``, ``checkpoints/``).
        status: ``finished`` or ``diverged``.
        step: updates done (for a diverged run: the step whose loss was not finite).
        model: the trained network (the last finite weights).
        metrics: the rows of ``metrics.jsonl``.
        seconds: wall time of this call.
        resumed_from: the step this call resumed from (``None``: a fresh start).
    """

    run_dir: Path
    status: str
    step: int
    model: nn.Module
    metrics: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int | None = None


class HalfSquaredError(nn.Module):
    """``0.5 * ||f(x) - onehot(y)||^2`` summed over outputs, averaged over samples.

    Integer targets are one-hot encoded; float targets are used as given.
    """

    def forward(self, out: Tensor, y: Tensor) -> Tensor:
        if y.dtype in (torch.int64, torch.int32):
            target = nn.functional.one_hot(y, out.shape[-1]).to(out.dtype)
        else:
            target = y.reshape(out.shape).to(out.dtype)
        return 0.5 * ((out - target) ** 2).sum(-1).mean()


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


def _load_data(cfg: TrainConfig):
    from lossgeom.zoo import dataset

    d = cfg.data
    train = dataset(
        d.name, root=d.root, split="train", subset=d.subset, seed=d.seed, **d.options
    )
    test = None
    if d.test:
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
    if cfg.model.factory is not None:
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


def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    o = cfg.optim
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


def _step_generator(seed: int, step: int, salt: int) -> torch.Generator:
    """A generator that depends on (seed, step) only: resuming needs no saved state."""
    return torch.Generator().manual_seed(
        (seed * 1_000_003 + step * 7_919 + salt) % 2**63
    )


def _batch_indices(cfg: TrainConfig, n: int, step: int) -> Tensor | None:
    if cfg.full_batch or cfg.batch_size >= n:
        return None
    per_epoch = n // cfg.batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=_step_generator(cfg.seed, epoch, 1))
    return perm[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]


def augment(X: Tensor, crop_padding: int, flip: bool, gen: torch.Generator) -> Tensor:
    """Random crop after zero padding, and random horizontal flip, per image.

    Args:
        X: images ``(n, C, H, W)``.
        crop_padding: pixels of zero padding before cropping back to ``H x W``.
        flip: flip each image left-right with probability 1/2.
        gen: the generator of the random choices (on the CPU).

    Returns:
        The augmented batch (a new tensor).

    Example:
        >>> X = torch.arange(16.0).view(1, 1, 4, 4)
        >>> out = augment(X, 0, True, torch.Generator().manual_seed(0))
        >>> bool((out == X).all() or (out == X.flip(-1)).all())
        True
    """
    if X.ndim != 4:
        raise ValueError(
            f"augmentation works on images of shape (n, C, H, W); got inputs of shape "
            f"{tuple(X.shape)}. Set augment: null for this data set."
        )
    n, _, h, w = X.shape
    out = X
    if crop_padding:
        p = crop_padding
        padded = nn.functional.pad(X, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        rows = (dy.view(n, 1) + torch.arange(h)).to(X.device)  # (n, h)
        cols = (dx.view(n, 1) + torch.arange(w)).to(X.device)  # (n, w)
        idx_r = rows.view(n, 1, h, 1).expand(n, X.shape[1], h, w + 2 * p)
        out = padded.gather(2, idx_r)
        idx_c = cols.view(n, 1, 1, w).expand(n, X.shape[1], h, w)
        out = out.gather(3, idx_c)
    if flip:
        mask = (torch.rand(n, generator=gen) < 0.5).to(X.device).view(n, 1, 1, 1)
        out = torch.where(mask, out.flip(-1), out)
    return out


def _prepare_dir(run_dir: Path, cfg: TrainConfig, resume: bool) -> None:
    stored = run_dir / "config.yaml"
    dumped = cfg.model_dump(mode="json")
    if stored.is_file():
        old = yaml.safe_load(stored.read_text(encoding="utf-8"))
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
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(
            f"{run_dir} is not empty and holds no lossgeom run (no config.yaml); "
            "choose an empty or new run directory."
        )
    atomic_write_text(stored, yaml.safe_dump(dumped, sort_keys=False))


def train(
    config: TrainConfig | dict | str | Path,
    run_dir: str | Path | None = None,
    *,
    resume: bool = True,
    progress: bool = False,
) -> TrainResult:
    """Train a model from a config, measuring curvature along the way.

    The run directory gets ``config.yaml`` (the resolved config), ``metrics.jsonl``
    (one row per measurement, every ``metrics.every`` steps: train/test loss and
    accuracy, probe-set loss and gradient norm, sharpness with its residual and
    the edge-of-stability ratio, optionally the trace with its standard error),
    ``checkpoints/step_NNNNNNN.safetensors`` + ``.json`` and ``status.json``.
    Step ``s`` in all of them means "after ``s`` updates".

    A run is a deterministic function of its config on CPU: batch order and
    augmentation come from generators seeded by ``(seed, step)``, and checkpoints
    restore weights, optimizer, RNG and probe state, so a run killed and resumed
    ends with the same weights as one that was never interrupted. A non-finite
    loss stops the run with status ``diverged`` and the step.

    Args:
        config: a :class:`TrainConfig`, a dict, or a YAML file path.
        run_dir: the run directory (default ``runs/<config.name>``).
        resume: continue from the last complete checkpoint in ``run_dir``.
        progress: print one line per measurement.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: an invalid config, before any work.
    """
    start_time = time.perf_counter()
    cfg = load_config(config)
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / cfg.name
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
    _prepare_dir(run_dir, cfg, resume)
    log = MetricsLog(run_dir / "metrics.jsonl")
    ckpt_dir = run_dir / "checkpoints"

    status = read_status(run_dir)
    dtype = getattr(torch, cfg.dtype)
    (X, y), test = _load_data(cfg)

    def place(part: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Inputs (flat for an MLP) and float targets in the run's dtype, on its device."""
        inputs, targets = part
        if cfg.model.name == "mlp" and inputs.ndim > 2:
            inputs = inputs.flatten(1)
        target_dtype = dtype if targets.is_floating_point() else targets.dtype
        return (
            inputs.to(device=device, dtype=dtype),
            targets.to(device=device, dtype=target_dtype),
        )

    X, y = place((X, y))
    test = None if test is None else place(test)
    classification = not y.is_floating_point()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = _build_model(cfg, X, y).to(device=device, dtype=dtype)
    if cfg.grad_checkpointing:
        _enable_checkpointing(model)
    loss_fn = (
        nn.CrossEntropyLoss() if cfg.loss == "cross_entropy" else HalfSquaredError()
    )
    if cfg.loss == "cross_entropy" and not classification:
        raise ValueError(
            f"loss cross_entropy needs class labels; data set {cfg.data.name!r} has "
            "float targets. Use loss: mse."
        )
    optimizer = _optimizer(cfg, model.parameters())
    prober = Prober(
        model,
        loss_fn,
        (X, y),
        test,
        cfg.metrics or MetricsConfig(),
        cfg.optim,
        cfg.seed,
        classification,
    )
    adapt_lambda: float | None = None
    adapt_v0: Tensor | None = None

    step, resumed_from, last_loss = 0, None, None
    torch.manual_seed(cfg.seed)
    last = latest_checkpoint(ckpt_dir) if resume else None
    if last is not None:
        meta, extra = load_checkpoint(last, model, optimizer)
        step = resumed_from = int(meta["step"])
        prober.v0 = extra.get("probe_v0")
        adapt_v0 = extra.get("adapt_v0")
        adapt_lambda = meta["extra"].get("adapt_lambda")
        prober.last_sharpness = meta["extra"].get("last_sharpness")
        last_loss = meta["extra"].get("last_loss")
    if status and status["status"] in ("finished", "diverged") and resume:
        return TrainResult(
            run_dir,
            status["status"],
            status["step"],
            model,
            log.read(),
            time.perf_counter() - start_time,
            resumed_from,
        )
    log.truncate(before_step=step)
    write_status(run_dir, "running", step)

    def save(s: int) -> None:
        extra_tensors = {}
        if prober.v0 is not None:
            extra_tensors["probe_v0"] = prober.v0
        if adapt_v0 is not None:
            extra_tensors["adapt_v0"] = adapt_v0
        save_checkpoint(
            ckpt_dir,
            s,
            model,
            optimizer,
            config=cfg.model_dump(mode="json"),
            extra_tensors=extra_tensors,
            extra={
                "adapt_lambda": adapt_lambda,
                "last_sharpness": prober.last_sharpness,
                "last_loss": last_loss,
            },
        )
        keep = cfg.checkpoint.keep_last
        if keep is not None:
            pinned = set(cfg.checkpoint.steps) | {cfg.steps}
            periodic = [(t, p) for t, p in checkpoints(ckpt_dir) if t not in pinned]
            for _, p in periodic[:-keep]:
                p.with_suffix(".safetensors").unlink(missing_ok=True)
                p.unlink(missing_ok=True)

    def due_checkpoint(s: int) -> bool:
        every = cfg.checkpoint.every
        return s in cfg.checkpoint.steps or (
            every is not None and s % every == 0 and s > 0
        )

    def lr_at(s: int) -> float:
        base = cfg.optim.lr
        if cfg.optim.adaptive is not None and adapt_lambda is not None:
            a = cfg.optim.adaptive
            base = min(a.c / adapt_lambda, a.max_lr) if adapt_lambda > 0 else a.max_lr
        return base * schedule_factor(cfg, s)

    track = cfg.metrics.update_dimension if cfg.metrics is not None else None
    recorder = (
        TrajectoryRecorder(
            model,
            what="updates",
            every=track.record_every,
            max_vectors=track.max_vectors,
        )
        if track is not None
        else None
    )

    def measure(s: int, batch_loss: float | None) -> None:
        lr = lr_at(min(s, cfg.steps - 1))
        row: dict[str, object] = {"step": s, "lr": lr}
        if recorder is not None and track is not None:
            n = len(recorder)
            row["update_dimension_vectors"] = n
            row["update_dimension"] = (
                recorder.result(track.threshold).dimension if n >= 2 else None
            )
        if batch_loss is not None:
            row["batch_loss"] = batch_loss
        row.update(prober.measure(s, lr, optimizer, last=s == cfg.steps))
        log.append(row)
        if progress:
            shown = {k: v for k, v in row.items() if isinstance(v, float)}
            print(
                f"step {s:>7} "
                + " ".join(
                    f"{k}={v:.4g}" for k, v in shown.items() if "seconds" not in k
                )
            )

    n = X.shape[0]
    model.train()
    status_out = "finished"
    while step < cfg.steps:
        if step > 0 and due_checkpoint(step) and step != resumed_from:
            save(step)
        try:
            if cfg.metrics is not None and step % cfg.metrics.every == 0:
                measure(step, last_loss)
            if cfg.optim.adaptive is not None and step % cfg.optim.adaptive.every == 0:
                res = prober.top_eigenpair(
                    hessian(prober.objective), cfg.seed + step, adapt_v0
                )
                adapt_v0, adapt_lambda = res.vectors, float(res.values[0])
        except NonFiniteError as err:
            status_out = "diverged"
            write_status(run_dir, "diverged", step, reason=str(err))
            break
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = _batch_indices(cfg, n, step)
        xb, yb = (X, y) if idx is None else (X[idx.to(device)], y[idx.to(device)])
        if cfg.augment is not None:
            a = cfg.augment
            xb = augment(xb, a.crop_padding, a.flip, _step_generator(cfg.seed, step, 2))
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = loss_fn(model(xb), yb)
        last_loss = float(loss.detach())
        if not math.isfinite(last_loss):
            status_out = "diverged"
            log.append({"step": step, "batch_loss": last_loss, "diverged": True})
            write_status(
                run_dir,
                "diverged",
                step,
                reason=f"the training loss was {last_loss} at step {step} (lr {lr:g})",
            )
            break
        loss.backward()
        optimizer.step()
        if recorder is not None:
            recorder()
        step += 1
    if status_out == "finished":
        try:
            if cfg.metrics is not None:
                measure(cfg.steps, last_loss)
        except NonFiniteError as err:
            status_out = "diverged"
            write_status(run_dir, "diverged", step, reason=str(err))
        if status_out == "finished":
            if cfg.steps != resumed_from:
                save(cfg.steps)
            write_status(run_dir, "finished", cfg.steps)
    return TrainResult(
        run_dir,
        status_out,
        step,
        model,
        log.read(),
        time.perf_counter() - start_time,
        resumed_from,
    )
