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
  ``t = i / (bends + 1)``, linear in between (``w_k`` are hat functions);
* ``"neb"``: not a trained curve but a relaxed nudged elastic band, the
  minimum-energy path with its saddle point (:mod:`lossgeom.geometry._neb`).

:func:`connect` trains the control points by stochastic gradient descent on
``E_t[L(phi(t))]`` (or on a maximum over ``t``), then evaluates the curve and the
straight line on a grid of ``t`` and reports both barriers. The weights are in
:mod:`lossgeom.geometry._curve_basis`, the training steps in
:mod:`lossgeom.geometry._curve_training`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from lossgeom._results import CostMeter, Result, jsonable
from lossgeom.geometry._curve_basis import (
    CURVES,
    _check_int,
    _check_kind,
    curve_weights,
)
from lossgeom.geometry._curve_training import (
    _initial_bends,
    _objective_in_mode,
    _train_curve,
)
from lossgeom.geometry._evaluation import barrier, evaluate_points, second_objective
from lossgeom.geometry._paths import BARRIER_DEFINITION, interpolate
from lossgeom.objective import Objective

__all__ = ["CURVES", "ConnectResult", "connect", "curve_weights"]

CurveKind = Literal["bezier", "polychain", "neb"]
_CRITERIA = ("mean", "minimax")
_TRAIN_MODES = ("auto", "train", "eval")


@dataclass(frozen=True, eq=False)
class ConnectResult(Result):
    """A trained curve between two parameter vectors, and the loss along it.

    The curve is callable: ``result(t)`` (or ``result.point(t)``) gives the
    parameters at ``t`` from :attr:`control_points`, so it survives
    :func:`~lossgeom.save_result` / :func:`~lossgeom.load_result`.

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
        eval_loss: loss along the curve on the second evaluation set
            (``eval_data``; ``None`` without one), ``eval_barrier`` its barrier.
        linear_eval_loss: the straight line on that set, ``linear_eval_barrier``.
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`; ``parameters`` holds the arguments of
            :func:`connect` and the objective's description.
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
    eval_loss: Tensor | None = None
    eval_barrier: float | None = None
    linear_eval_loss: Tensor | None = None
    linear_eval_barrier: float | None = None
    definition: str = field(default=BARRIER_DEFINITION, kw_only=True)
    bulky: ClassVar[tuple[str, ...]] = ("control_points",)

    def to_dict(self) -> dict[str, Any]:
        """As for every result, with ``bends`` and ``barrier_reduction`` added."""
        out = super().to_dict()
        out["bends"] = self.bends
        out["barrier_reduction"] = jsonable(self.barrier_reduction)
        return out

    def scalars(self) -> dict[str, float]:
        """The curve's barrier (``value``), the line's, and the reduction."""
        return {
            "value": self.barrier,
            "linear_barrier": self.linear_barrier,
            "barrier_reduction": self.barrier_reduction,
        }

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
    criterion: Literal["mean", "minimax"] = "mean",
    t_samples: int | None = None,
    init_noise: float = 0.0,
    train_mode: Literal["auto", "train", "eval"] = "auto",
    recompute_norm: bool | None = None,
    n_points: int = 21,
    log_every: int | None = None,
    chunk_size: int | None | str = "auto",
    seed: int = 0,
    eval_data: object | None = None,
    **neb: Any,
) -> ConnectResult:
    """Train a low-loss curve from ``theta_a`` to ``theta_b`` (Garipov et al. 2018).

    ``curve="neb"`` relaxes a nudged elastic band with a climbing image instead
    (the minimum-energy path and its saddle point; an ``NEBResult``): the
    options in ``**neb`` (``images``, ``spring``, ``climbing``, ``step``,
    ``tol``, ``cycles``, ``minibatch``, ...) are those of
    :func:`lossgeom.geometry._neb.neb`, which describes them; ``steps``,
    ``train_mode``, ``recompute_norm``, ``log_every``, ``chunk_size``, ``seed``
    and ``eval_data`` mean the same there.

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
    the trainable control points only. With ``criterion="mean"`` (the paper's
    ``E_t L(phi(t))``) ``t_samples`` parameters (default 1) are drawn per step and
    their losses averaged. With ``criterion="minimax"`` ``t_samples`` (default 4)
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
    ``n_points`` grid (Frankle et al. 2020; Entezari et al. 2021), for the
    curve and, through :func:`~lossgeom.geometry.interpolate`, for the line.

    The model is never changed: parameters, buffers, ``requires_grad`` and
    train/eval flags are the same afterwards.

    Args:
        obj: the objective (model, loss, data).
        theta_a: the first end, a flat parameter vector like ``obj.theta``.
        theta_b: the second end.
        curve: ``"bezier"``, ``"polychain"`` or ``"neb"``.
        bends: number of trainable control points (``>= 1``).
        steps: training steps (``>= 1``).
        lr: Adam learning rate. The default suits networks in float32 whose ends
            are a few units apart; lower it if the training loss diverges.
        batch_size: samples per training step (``None``: whole batches of the
            objective).
        criterion: ``"mean"`` (expected loss over ``t``) or ``"minimax"``
            (largest loss of ``t_samples`` stratified ``t`` per step).
        t_samples: curve parameters per step (default 1 for ``"mean"``, 4 for
            ``"minimax"``).
        init_noise: relative size of the initial perturbation off the line.
        train_mode: ``"auto"``, ``"train"`` (batch statistics, dropout on) or
            ``"eval"`` mode of the model while training.
        recompute_norm: recompute BatchNorm statistics at every evaluated point
            (``None``: when the model has BatchNorm and ``obj.mode == "eval"``).
        n_points: grid points from 0 to 1 for the final evaluation (``>= 2``).
        log_every: steps between entries of the training history (default:
            ``max(1, steps // 100)``).
        chunk_size: points per vectorised evaluation (see
            :meth:`Objective.evaluate`).
        seed: seed of ``t``, minibatches and the initial noise.
        eval_data: a second evaluation set (data, or an :class:`Objective`) on
            which the final curve and the line are also evaluated (e.g. held-out
            data); BatchNorm statistics still come from the objective's data.
        **neb: options of the nudged elastic band (``curve="neb"`` only).

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
        >>> res = connect(obj, a, -a, steps=5, n_points=5)
        >>> res(0.0).tolist(), res.linear_barrier
        ([-1.0, 0.0], 1.0)
    """
    if curve == "neb":  # imported here: the band's result builds on ConnectResult
        from lossgeom.geometry._neb import connect_neb

        curve_only = dict(
            bends=bends,
            lr=lr,
            batch_size=batch_size,
            criterion=criterion,
            t_samples=t_samples,
            init_noise=init_noise,
            n_points=n_points,
        )
        return connect_neb(
            obj,
            theta_a,
            theta_b,
            curve_only,
            steps=steps,
            train_mode=train_mode,
            recompute_norm=recompute_norm,
            log_every=log_every,
            chunk_size=chunk_size,
            seed=seed,
            eval_data=eval_data,
            **neb,
        )
    if neb:
        raise ValueError(
            f"unexpected option(s) {sorted(neb)} for curve={curve!r}; they apply "
            "to curve='neb' (a nudged elastic band) only."
        )
    t_samples = _check_settings(
        curve,
        bends,
        steps,
        n_points,
        batch_size,
        log_every,
        criterion,
        t_samples,
        train_mode,
        lr,
        init_noise,
    )
    a = _check_end(obj, "theta_a", theta_a)
    b = _check_end(obj, "theta_b", theta_b)
    recompute_norm, mode_used = _modes(obj, recompute_norm, train_mode)

    meter = CostMeter(obj)
    log_every = log_every or max(1, steps // 100)
    gen = torch.Generator(device=obj.device).manual_seed(seed)
    free = _initial_bends(a, b, bends, init_noise, gen)
    log = _train_curve(
        obj,
        _objective_in_mode(obj, mode_used),
        curve,
        a,
        b,
        free,
        gen,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        criterion=criterion,
        t_samples=t_samples,
        log_every=log_every,
    )
    hist_step, hist_loss = log.steps, log.losses

    control = torch.cat([a[None], free.detach(), b[None]])
    along = _evaluate(
        obj, curve, a, b, control, n_points, recompute_norm, chunk_size, eval_data
    )
    settings = {
        "curve": curve,
        "bends": bends,
        "steps": steps,
        "lr": float(lr),
        "batch_size": batch_size,
        "criterion": criterion,
        "t_samples": t_samples,
        "init_noise": float(init_noise),
        "init": "straight line" + (" + noise" if init_noise > 0 else ""),
        "train_mode": mode_used,
        "recompute_norm": recompute_norm,
        "n_points": n_points,
        "log_every": log_every,
        "seed": seed,
        "objective_info": obj.info(),
    }
    return ConnectResult(
        control_points=control,
        kind=curve,
        **along,
        history_step=torch.tensor(hist_step, dtype=torch.int64),
        history_loss=torch.tensor(hist_loss, dtype=torch.float64),
        steps=steps,
        parameters=settings,
        cost=meter.stop(),
    )


# ------------------------------------------------------------------- internals
def _check_settings(
    curve: object,
    bends: object,
    steps: object,
    n_points: object,
    batch_size: object,
    log_every: object,
    criterion: object,
    t_samples: int | None,
    train_mode: object,
    lr: object,
    init_noise: object,
) -> int:
    """Refuse bad settings of :func:`connect`; ``t_samples`` with its default."""
    if curve not in (*CURVES, "neb"):
        raise ValueError(
            f"unknown curve kind {curve!r}; expected 'bezier' (Bernstein polynomial "
            "of degree bends+1), 'polychain' (polygonal chain through the bends) "
            "or 'neb' (nudged elastic band)."
        )
    _check_kind(curve)
    _check_int("bends", bends, 1, "the number of trainable control points")
    _check_int("steps", steps, 1, "the number of training steps")
    _check_int("n_points", n_points, 2, "grid points from t=0 to t=1")
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1, "samples per training step, or None")
    if log_every is not None:
        _check_int("log_every", log_every, 1, "steps between history entries")
    if criterion not in _CRITERIA:
        raise ValueError(
            f"criterion must be one of {_CRITERIA}; got {criterion!r}. Use 'mean' "
            "for the expected loss along the curve or 'minimax' for its maximum."
        )
    if t_samples is None:
        t_samples = 4 if criterion == "minimax" else 1
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
    return t_samples


def _modes(
    obj: Objective, recompute_norm: bool | None, train_mode: str
) -> tuple[bool, str]:
    """Whether to recompute BatchNorm statistics, and the mode to train in."""
    if recompute_norm is None:
        recompute_norm = obj.has_norm_statistics and obj.mode == "eval"
    recompute_norm = bool(recompute_norm) and obj.has_norm_statistics
    mode_used = train_mode
    if train_mode == "auto":
        mode_used = "train" if obj.has_norm_statistics else obj.mode
    return recompute_norm, mode_used


def _evaluate(
    obj: Objective,
    kind: str,
    a: Tensor,
    b: Tensor,
    control: Tensor,
    n_points: int,
    recompute_norm: bool,
    chunk_size: int | None | str,
    eval_data: object | None,
) -> dict[str, Any]:
    """The curve and the straight line on a grid: the fields of a ConnectResult."""
    line = interpolate(
        obj,
        a,
        b,
        n_points=n_points,
        recompute_norm=recompute_norm,
        chunk_size=chunk_size,
        eval_data=eval_data,
    )
    ts = line.ts.to(device=obj.device, dtype=obj.dtype)
    points = curve_weights(kind, ts, control.shape[0]) @ control
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
    return {
        "ts": line.ts,
        "loss": loss_t,
        "accuracy": None if acc_t is None else acc_t.cpu(),
        "barrier": curve_barrier,
        "barrier_t": barrier_t,
        "linear_loss": line.loss,
        "linear_accuracy": line.accuracy,
        "linear_barrier": float(line.barrier),
        "eval_loss": None if eval_t is None else eval_t.cpu(),
        "eval_barrier": None if eval_t is None else barrier(line.ts, eval_t.cpu())[0],
        "linear_eval_loss": line.eval_loss,
        "linear_eval_barrier": line.eval_barrier,
    }


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
