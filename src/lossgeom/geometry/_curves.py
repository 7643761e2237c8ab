"""Mode-connecting curves: trained low-loss paths between two solutions.

Garipov et al. 2018, "Loss Surfaces, Mode Connectivity, and Fast Ensembling of
DNNs": two independently trained networks ``theta_a`` and ``theta_b`` are usually
separated by a loss barrier along the straight line between them, yet a simple
curve with a few trainable control points joins them at low loss. A curve is
``phi(t) = sum_k w_k(t) c_k`` for ``t`` in ``[0, 1]``, with fixed ends
``c_0 = theta_a`` and ``c_n = theta_b``:

* ``"bezier"``: ``w_k`` are the Bernstein polynomials of degree ``n = bends + 1``
  (``bends=1``: the quadratic Bezier curve
  ``(1-t)^2 a + 2t(1-t) c + t^2 b``);
* ``"polychain"``: a polygonal chain through ``bends`` bend points placed at
  ``t = i / (bends + 1)``, linear in between (``w_k`` are hat functions).

:func:`connect` trains the control points by stochastic gradient descent on
``E_t[L(phi(t))]`` (or on a maximum over ``t``), then evaluates the curve and the
straight line on a grid of ``t`` and reports both barriers.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from lossgeom.geometry._evaluation import barrier, evaluate_points, second_objective
from lossgeom.geometry._paths import BARRIER_DEFINITION, interpolate
from lossgeom.geometry._store import save_result, saveable
from lossgeom.linalg._operator import NonFiniteError
from lossgeom.objective import Objective

__all__ = ["CURVES", "ConnectResult", "connect", "curve_weights"]

CurveKind = Literal["bezier", "polychain"]
CURVES: tuple[str, ...] = ("bezier", "polychain")
_OBJECTIVES = ("mean", "minimax")
_TRAIN_MODES = ("auto", "train", "eval")


def curve_weights(kind: str, t: Tensor, n_ctrl: int) -> Tensor:
    """Weights of the control points at parameters ``t``: ``phi(t) = W @ C``.

    Args:
        kind: ``"bezier"`` (Bernstein polynomials of degree ``n_ctrl - 1``) or
            ``"polychain"`` (hat functions with knots at ``i / (n_ctrl - 1)``).
        t: curve parameters in ``[0, 1]``, shape ``(m,)``.
        n_ctrl: number of control points, the two ends included (``>= 2``).

    Returns:
        ``W`` of shape ``(m, n_ctrl)``; every row sums to one.

    Example:
        >>> t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
        >>> curve_weights("bezier", t, 3).tolist()
        [[1.0, 0.0, 0.0], [0.25, 0.5, 0.25], [0.0, 0.0, 1.0]]
        >>> curve_weights("polychain", t, 3).tolist()
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    _check_kind(kind)
    _check_int("n_ctrl", n_ctrl, 2, "control points, the two ends included")
    n = n_ctrl - 1
    t = t.reshape(-1, 1)
    k = torch.arange(n_ctrl, device=t.device, dtype=t.dtype)
    if kind == "bezier":
        binom = t.new_tensor([math.comb(n, i) for i in range(n_ctrl)])
        return binom * t**k * (1 - t) ** (n - k)
    return (1 - (t * n - k).abs()).clamp_min(0)


@saveable
@dataclass(frozen=True, eq=False)
class ConnectResult:
    """A trained curve between two parameter vectors, and the loss along it.

    The curve is callable: ``result(t)`` (or ``result.point(t)``) gives the
    parameters at ``t`` from :attr:`control_points`, so it survives
    :func:`~lossgeom.geometry.save_result` / ``load_result``.

    Attributes:
        control_points: ``(n_ctrl, d)``, the fixed ends first and last, on the
            objective's device and in its dtype (the per-``t`` arrays below are
            on the CPU).
        kind: ``"bezier"`` or ``"polychain"``.
        ts: the evaluation grid, ``(m,)`` from 0 to 1.
        loss: the loss along the curve at ``ts``.
        accuracy: the accuracy along the curve (``None`` unless the objective
            knows accuracy).
        barrier: ``max_t loss(t) - ((1 - t) loss(0) + t loss(1))`` over ``ts``
            (:data:`~lossgeom.geometry.BARRIER_DEFINITION`; NaN if a loss is not
            finite).
        barrier_t: the ``t`` where the barrier is attained.
        linear_loss: the loss along the straight line at ``ts``.
        linear_accuracy: its accuracy (or ``None``).
        linear_barrier: the barrier of the straight line, same definition.
        history_step: training steps at which the loss was logged.
        history_loss: mean training (minibatch) loss since the previous log.
        steps: training steps taken.
        seconds: wall-clock time of training and evaluation.
        eval_loss: loss along the curve on the second evaluation set
            (``eval_data``; ``None`` without one), ``eval_barrier`` its barrier.
        linear_eval_loss: the straight line on that set, ``linear_eval_barrier``.
        settings: the arguments of :func:`connect` and the objective's
            description, for the record.
    """

    control_points: Tensor
    kind: str
    ts: Tensor
    loss: Tensor
    accuracy: Tensor | None
    barrier: float
    barrier_t: float
    linear_loss: Tensor
    linear_accuracy: Tensor | None
    linear_barrier: float
    history_step: Tensor
    history_loss: Tensor
    steps: int
    seconds: float
    settings: dict
    eval_loss: Tensor | None = None
    eval_barrier: float | None = None
    linear_eval_loss: Tensor | None = None
    linear_eval_barrier: float | None = None

    @property
    def bends(self) -> int:
        """Number of trainable control points."""
        return int(self.control_points.shape[0]) - 2

    @property
    def barrier_reduction(self) -> float:
        """``1 - barrier / linear_barrier`` (NaN when the line has no barrier)."""
        if not self.linear_barrier > 0:
            return math.nan
        return 1.0 - self.barrier / self.linear_barrier

    def point(self, t: float | Sequence[float] | Tensor) -> Tensor:
        """Parameters on the curve: ``t`` a number gives ``(d,)``; ``(m,)`` gives ``(m, d)``.

        Args:
            t: curve parameter(s) in ``[0, 1]``: a number, a 0-d or 1-D tensor, or
                a sequence of numbers.

        Returns:
            ``phi(t)`` in the dtype and on the device of :attr:`control_points`.
        """
        C = self.control_points
        tt = torch.as_tensor(t, dtype=C.dtype, device=C.device)
        scalar = tt.ndim == 0
        if tt.ndim > 1:
            raise ValueError(
                f"expected t as a number or a 1-D tensor of curve parameters; got "
                f"shape {tuple(tt.shape)}. Flatten it with t.reshape(-1)."
            )
        tt = tt.reshape(-1)
        if not bool(((tt >= 0) & (tt <= 1)).all()):
            raise ValueError(
                f"expected curve parameters t in [0, 1]; got values from "
                f"{tt.min().item():.4g} to {tt.max().item():.4g}. The curve is "
                "defined between its ends only."
            )
        out = curve_weights(self.kind, tt, C.shape[0]) @ C
        return out[0] if scalar else out

    __call__ = point

    def save(self, path: str | os.PathLike) -> Path:
        """Write to the folder ``path`` (safetensors + JSON); see ``load_result``."""
        return save_result(self, path)

    def to_dict(self) -> dict:
        """Plain numbers for JSON (the control points left out)."""

        def floats(x: Tensor | None) -> list[float] | None:
            return None if x is None else [float(v) for v in x.tolist()]

        return {
            "kind": self.kind,
            "bends": self.bends,
            "barrier": self.barrier,
            "barrier_t": self.barrier_t,
            "linear_barrier": self.linear_barrier,
            "barrier_reduction": self.barrier_reduction,
            "barrier_definition": BARRIER_DEFINITION,
            "ts": floats(self.ts),
            "loss": floats(self.loss),
            "accuracy": floats(self.accuracy),
            "linear_loss": floats(self.linear_loss),
            "linear_accuracy": floats(self.linear_accuracy),
            "history_step": [int(s) for s in self.history_step.tolist()],
            "history_loss": floats(self.history_loss),
            "steps": self.steps,
            "seconds": self.seconds,
            "settings": self.settings,
        }


def connect(
    obj: Objective,
    theta_a: Tensor,
    theta_b: Tensor,
    curve: CurveKind = "bezier",
    bends: int = 1,
    *,
    steps: int = 1000,
    lr: float = 1e-2,
    batch_size: int | None = 128,
    objective: Literal["mean", "minimax"] = "mean",
    t_samples: int | None = None,
    init_noise: float = 0.0,
    train_mode: Literal["auto", "train", "eval"] = "auto",
    recompute_norm: bool | None = None,
    eval_points: int = 21,
    log_every: int | None = None,
    chunk_size: int | None | str = "auto",
    seed: int = 0,
    eval_data: object | None = None,
) -> ConnectResult:
    """Train a low-loss curve from ``theta_a`` to ``theta_b`` (Garipov et al. 2018).

    **Initialisation.** The control points start on the straight line: Bezier
    point ``k`` at ``a + k/n (b - a)`` and polychain bend ``i`` at
    ``a + i/(bends+1) (b - a)``, so the initial curve *is* the line
    ``(1-t) a + t b``. With ``init_noise > 0`` each trainable point gets Gaussian
    noise of standard deviation ``init_noise * |b - a| / sqrt(d)`` per
    coordinate (a perturbation of norm about ``init_noise * |b - a|``). Where the
    loss is symmetric about the line, the line is a critical point of the curve
    objective and noise is needed to leave it.

    **Training.** Each step draws a minibatch and ``t ~ U(0, 1)`` (a seeded
    generator on the objective's device), evaluates the loss at ``phi(t)`` with
    :meth:`Objective.batch_loss` and takes an Adam step (learning rate ``lr``) on
    the trainable control points only. With ``objective="mean"`` (the paper's
    ``E_t L(phi(t))``) ``t_samples`` parameters (default 1) are drawn per step and
    their losses averaged. With ``objective="minimax"`` ``t_samples`` (default 4)
    stratified parameters ``t_j ~ U(j/k, (j+1)/k)`` are drawn and the step
    minimises the *largest* of their losses on the minibatch (a hard max: the
    gradient is that of the worst point), pushing down the peak of the path.

    **Minibatches.** The objective's batches are cycled; each is shuffled and cut
    into minibatches of ``batch_size`` samples (``None``: the whole batch); a
    short remainder is dropped when a batch yields more than one minibatch.

    **BatchNorm.** Running statistics of the ends do not describe points between
    them. With ``train_mode="auto"`` a model with BatchNorm is trained with batch
    statistics (a train-mode copy of the objective on the same model and data;
    dropout is then active too), any other model in the objective's mode. The
    final curve and the straight line are evaluated in the objective's mode,
    with BatchNorm statistics recomputed at every evaluated point
    (``recompute_norm``, default: whenever the model has BatchNorm and the
    objective is in eval mode) from the objective's data.

    **Barrier.** ``max_t loss(t) - ((1 - t) loss(0) + t loss(1))`` over the
    ``eval_points`` grid (Frankle et al. 2020; Entezari et al. 2021), for the
    curve and, through :func:`~lossgeom.geometry.interpolate`, for the line.

    The model is never changed: parameters, buffers, ``requires_grad`` and
    train/eval flags are the same afterwards.

    Args:
        obj: the objective (model, loss, data).
        theta_a: the first end, a flat parameter vector like ``obj.theta``.
        theta_b: the second end.
        curve: ``"bezier"`` or ``"polychain"``.
        bends: number of trainable control points (``>= 1``).
        steps: training steps (``>= 1``).
        lr: Adam learning rate. The default suits networks in float32 whose ends
            are a few units apart; lower it if the training loss diverges.
        batch_size: samples per training step (``None``: whole batches of the
            objective).
        objective: ``"mean"`` (expected loss over ``t``) or ``"minimax"``
            (largest loss of ``t_samples`` stratified ``t`` per step).
        t_samples: curve parameters per step (default 1 for ``"mean"``, 4 for
            ``"minimax"``).
        init_noise: relative size of the initial perturbation off the line.
        train_mode: ``"auto"``, ``"train"`` (batch statistics, dropout on) or
            ``"eval"`` mode of the model while training.
        recompute_norm: recompute BatchNorm statistics at every evaluated point
            (``None``: when the model has BatchNorm and ``obj.mode == "eval"``).
        eval_points: grid points from 0 to 1 for the final evaluation (``>= 2``).
        log_every: steps between entries of the training history (default:
            ``max(1, steps // 100)``).
        chunk_size: points per vectorised evaluation (see
            :meth:`Objective.evaluate`).
        seed: seed of ``t``, minibatches and the initial noise.
        eval_data: a second evaluation set (data, or an :class:`Objective`) on
            which the final curve and the line are also evaluated (e.g. held-out
            data); BatchNorm statistics still come from the objective's data.

    Returns:
        A :class:`ConnectResult`.

    Raises:
        ValueError: bad ends (shape, dtype, device, non-finite) or settings.
        NonFiniteError: the training loss became non-finite.

    Example:
        >>> import lossgeom as lg
        >>> from lossgeom.zoo import surface
        >>> obj = lg.Objective(*surface("double_well"))
        >>> a = torch.tensor([-1.0, 0.0], dtype=torch.float64)
        >>> res = connect(obj, a, -a, steps=5, eval_points=5)
        >>> res(0.0).tolist(), res.linear_barrier
        ([-1.0, 0.0], 1.0)
    """
    _check_kind(curve)
    _check_int("bends", bends, 1, "the number of trainable control points")
    _check_int("steps", steps, 1, "the number of training steps")
    _check_int("eval_points", eval_points, 2, "grid points from t=0 to t=1")
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1, "samples per training step, or None")
    if log_every is not None:
        _check_int("log_every", log_every, 1, "steps between history entries")
    if objective not in _OBJECTIVES:
        raise ValueError(
            f"objective must be one of {_OBJECTIVES}; got {objective!r}. Use 'mean' "
            "for the expected loss along the curve or 'minimax' for its maximum."
        )
    if t_samples is None:
        t_samples = 4 if objective == "minimax" else 1
    _check_int("t_samples", t_samples, 1, "curve parameters drawn per step")
    if train_mode not in _TRAIN_MODES:
        raise ValueError(
            f"train_mode must be one of {_TRAIN_MODES}; got {train_mode!r}."
        )
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number; got {lr!r}.")
    if not (
        isinstance(init_noise, (int, float))
        and math.isfinite(init_noise)
        and init_noise >= 0
    ):
        raise ValueError(
            f"init_noise must be a finite number >= 0; got {init_noise!r}."
        )
    a = _check_end(obj, "theta_a", theta_a)
    b = _check_end(obj, "theta_b", theta_b)
    if recompute_norm is None:
        recompute_norm = obj.has_norm_statistics and obj.mode == "eval"
    recompute_norm = bool(recompute_norm) and obj.has_norm_statistics
    mode_used = train_mode
    if train_mode == "auto":
        mode_used = "train" if obj.has_norm_statistics else obj.mode

    start = time.perf_counter()
    n_ctrl = bends + 2
    gen = torch.Generator(device=obj.device).manual_seed(seed)
    free = _initial_bends(a, b, bends, init_noise, gen).requires_grad_(True)

    train_obj = _objective_in_mode(obj, mode_used)
    optimizer = torch.optim.Adam([free], lr=lr)
    log_every = log_every or max(1, steps // 100)
    hist_step: list[int] = []
    hist_loss: list[float] = []
    running = torch.zeros((), dtype=obj.dtype, device=obj.device)
    count = 0
    batches = _minibatches(obj, batch_size, gen)
    with (
        train_obj.probe_mode(higher_order=False),
        torch.enable_grad(),
        closing(batches),
    ):
        for step in range(1, steps + 1):
            x, y = next(batches)
            ts = _draw_t(t_samples, objective, gen, obj)
            loss = _curve_loss(train_obj, curve, a, b, free, ts, x, y, objective)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if obj.data_parallel:
                free.grad = obj.all_reduce(free.grad) / obj.world_size
            optimizer.step()
            running += loss.detach()
            count += 1
            if step % log_every == 0 or step == steps:
                mean = float(running) / count
                if not math.isfinite(mean):
                    raise NonFiniteError(
                        f"the training loss of the curve became non-finite between "
                        f"steps {step - count + 1} and {step}. Lower lr (got {lr}) "
                        "or check the ends for non-finite values."
                    )
                hist_step.append(step)
                hist_loss.append(mean)
                running.zero_()
                count = 0

    control = torch.cat([a[None], free.detach(), b[None]])
    line = interpolate(
        obj,
        a,
        b,
        steps=eval_points,
        recompute_norm=recompute_norm,
        chunk_size=chunk_size,
        eval_data=eval_data,
    )
    ts = line.ts.to(device=obj.device, dtype=obj.dtype)
    points = curve_weights(curve, ts, n_ctrl) @ control
    metrics = evaluate_points(
        obj,
        points,
        recompute_norm=recompute_norm,
        chunk_size=chunk_size,
        eval_obj=second_objective(obj, eval_data),
    )
    eval_t = metrics.get("eval_loss")
    loss_t = metrics["loss"].cpu()
    acc_t = metrics.get("accuracy")
    curve_barrier, barrier_t = barrier(line.ts, loss_t)
    settings = {
        "curve": curve,
        "bends": bends,
        "steps": steps,
        "lr": float(lr),
        "batch_size": batch_size,
        "objective": objective,
        "t_samples": t_samples,
        "init_noise": float(init_noise),
        "init": "straight line" + (" + noise" if init_noise > 0 else ""),
        "train_mode": mode_used,
        "recompute_norm": recompute_norm,
        "eval_points": eval_points,
        "log_every": log_every,
        "seed": seed,
        "objective_info": obj.info(),
    }
    return ConnectResult(
        control_points=control,
        kind=curve,
        ts=line.ts,
        loss=loss_t,
        accuracy=None if acc_t is None else acc_t.cpu(),
        barrier=curve_barrier,
        barrier_t=barrier_t,
        linear_loss=line.loss,
        linear_accuracy=line.accuracy,
        linear_barrier=float(line.barrier),
        history_step=torch.tensor(hist_step, dtype=torch.int64),
        history_loss=torch.tensor(hist_loss, dtype=torch.float64),
        steps=steps,
        seconds=time.perf_counter() - start,
        settings=settings,
        eval_loss=None if eval_t is None else eval_t.cpu(),
        eval_barrier=None if eval_t is None else barrier(line.ts, eval_t.cpu())[0],
        linear_eval_loss=line.eval_loss,
        linear_eval_barrier=line.eval_barrier,
    )


# ------------------------------------------------------------------- internals
def _initial_bends(
    a: Tensor, b: Tensor, bends: int, noise: float, gen: torch.Generator
) -> Tensor:
    """Trainable points on the line, ``a + k/(bends+1) (b - a)``, plus seeded noise.

    For both kinds this makes the initial curve the straight line ``(1-t) a + t b``
    (for Bezier curves by the degree-elevation identity ``sum_k k/n B_k(t) = t``).
    """
    frac = torch.arange(1, bends + 1, dtype=a.dtype, device=a.device) / (bends + 1)
    free = a + frac[:, None] * (b - a)
    if noise > 0:
        scale = noise * float((b - a).norm()) / math.sqrt(a.numel())
        free += scale * torch.randn(
            free.shape, generator=gen, device=a.device, dtype=a.dtype
        )
    return free


def _curve_loss(
    obj: Objective,
    kind: str,
    a: Tensor,
    b: Tensor,
    free: Tensor,
    ts: Tensor,
    x: Tensor,
    y: Tensor,
    objective: str,
) -> Tensor:
    """The training loss of one step: mean or max over ``ts`` of the batch loss."""
    W = curve_weights(kind, ts, free.shape[0] + 2)
    losses = []
    for w in W:
        theta = w[0] * a + w[-1] * b + w[1:-1] @ free
        losses.append(obj.batch_loss(theta, x, y))
    stacked = torch.stack(losses)
    return stacked.max() if objective == "minimax" else stacked.mean()


def _draw_t(k: int, objective: str, gen: torch.Generator, obj: Objective) -> Tensor:
    u = torch.rand(k, generator=gen, device=obj.device, dtype=obj.dtype)
    if objective == "minimax":  # stratified: one t in each of k equal intervals
        u = (torch.arange(k, device=obj.device, dtype=obj.dtype) + u) / k
    return u


def _minibatches(
    obj: Objective, batch_size: int | None, gen: torch.Generator
) -> Generator[tuple[Tensor, Tensor], None, None]:
    """Shuffled minibatches, cycling over the objective's batches forever."""
    while True:
        yielded = False
        for x, y in obj.batches():
            n = int(x.shape[0])
            size = n if batch_size is None else min(batch_size, n)
            order = torch.randperm(n, generator=gen, device=gen.device).to(x.device)
            for lo in range(0, n, size):
                idx = order[lo : lo + size]
                if idx.numel() < size and lo > 0:
                    break  # drop a short remainder
                yielded = True
                yield x[idx], y[idx]
        if not yielded:
            raise ValueError("the objective's data yielded no batches to train on.")


class _Batches:
    """A re-iterable view of an objective's batches (for a sibling objective)."""

    def __init__(self, obj: Objective):
        self.obj = obj

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.obj.batches()


def _objective_in_mode(obj: Objective, mode: str) -> Objective:
    """``obj`` itself, or an objective on the same model and data in ``mode``."""
    if mode == obj.mode:
        return obj
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # obj already warned about its model
        return Objective(
            obj.model,
            obj.loss_fn,
            _Batches(obj),
            mode=mode,
            data_parallel=obj.data_parallel,
        )


def _check_kind(kind: object) -> None:
    if kind not in CURVES:
        raise ValueError(
            f"unknown curve kind {kind!r}; expected one of {CURVES}: 'bezier' "
            "(Bernstein polynomial of degree bends+1) or 'polychain' (polygonal "
            "chain through the bends)."
        )


def _check_int(name: str, value: object, low: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low} ({what}); got {value!r}.")


def _check_end(obj: Objective, name: str, theta: object) -> Tensor:
    like = f"Pass a flat parameter vector such as {name} = Objective(model, loss_fn, data).theta."
    if not isinstance(theta, Tensor) or theta.ndim != 1 or theta.shape[0] != obj.dim:
        got = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
        raise ValueError(
            f"expected {name} of shape ({obj.dim},), one entry per trainable "
            f"parameter of the objective's model; got {got}. {like}"
        )
    if theta.dtype != obj.dtype:
        raise ValueError(
            f"expected {name} of dtype {obj.dtype} (the objective's); got "
            f"{theta.dtype}. Convert with {name}.to({obj.dtype})."
        )
    here, there = theta.device, torch.device(obj.device)
    if here.type != there.type or (
        None not in (here.index, there.index) and here.index != there.index
    ):
        raise ValueError(
            f"expected {name} on device '{obj.device}' (the objective's); got "
            f"'{theta.device}'. Move it with {name}.to('{obj.device}')."
        )
    if not bool(torch.isfinite(theta).all()):
        raise ValueError(
            f"{name} holds non-finite values (NaN or inf); the ends of a curve must "
            "be finite parameter vectors."
        )
    return theta.detach().clone()
