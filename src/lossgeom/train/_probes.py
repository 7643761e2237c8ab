"""Built-in probe callbacks: losses, gradient norm, sharpness, edge of stability, trace.

Each is a :class:`~lossgeom.train.Callback` that adds its columns to the metrics
row in ``on_eval``; the curvature probes share the step's Hessian operator
(``state.hessian``), whose kept graphs also give the gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lossgeom.curvature.spectra import eigenvalues, trace
from lossgeom.linalg import SymmetricOperator
from lossgeom.objective import LossReduction, Objective, resolve_reduction
from lossgeom.optim import KFAC
from lossgeom.train._build import subset
from lossgeom.train._callbacks import Callback, TrainState
from lossgeom.train._config import MetricsConfig, OptimConfig
from lossgeom.train._distributed import Ranks

__all__ = [
    "GradientNorm",
    "HessianTrace",
    "LossAccuracy",
    "Sharpness",
    "TopEigenpair",
    "stability_threshold",
    "top_eigenpair",
]


def stability_threshold(optim: OptimConfig, lr: float) -> tuple[float, str]:
    """The sharpness above which the optimizer diverges on a quadratic.

    Gradient descent ``x' = x - eta H x`` is stable iff ``lambda_max < 2 / eta``
    (Cohen et al. 2021, "Gradient descent on neural networks typically occurs at
    the edge of stability"). Heavy-ball momentum ``beta`` (PyTorch's form
    ``v' = beta v + g, x' = x - eta v'``) moves it to ``(2 + 2 beta) / eta``;
    PyTorch's Nesterov form ``x' = x - eta (g + beta v')`` to
    ``(2 + 2 beta) / ((1 + 2 beta) eta)`` (the root of its characteristic
    polynomial at -1). For Adam the quantity is the *preconditioned* sharpness
    ``lambda_max(P^-1 H)``, ``P = diag(sqrt(v_hat) + eps) / eta``'s shape, compared
    with ``(2 + 2 beta_1) / ((1 - beta_1) eta)`` (Cohen et al. 2022, "Adaptive
    gradient methods at the edge of stability"). K-FAC's step is SGD's on the
    preconditioned problem, so its threshold is SGD's (with its momentum),
    compared with ``lambda_max(P^-1 H)`` for K-FAC's damped Kronecker-factored
    curvature ``P``.

    Args:
        optim: the optimizer config.
        lr: the step size in use.

    Returns:
        ``(threshold, formula)``.

    Example:
        >>> stability_threshold(OptimConfig(name="gd", lr=0.01), 0.01)
        (200.0, '2 / eta')
    """
    b = optim.momentum
    if optim.name in ("adam", "adamw"):
        b1 = optim.betas[0]
        return (2 + 2 * b1) / ((1 - b1) * lr), "(2 + 2 beta1) / ((1 - beta1) eta)"
    if b == 0:
        return 2 / lr, "2 / eta"
    if optim.nesterov:
        return (2 + 2 * b) / ((1 + 2 * b) * lr), "(2 + 2 beta) / ((1 + 2 beta) eta)"
    return (2 + 2 * b) / lr, "(2 + 2 beta) / eta"


class TopEigenpair(NamedTuple):
    """The top eigenpair of an operator, as tracked during training."""

    value: float
    vector: Tensor
    residual: float
    converged: bool
    matvecs: int


def top_eigenpair(
    op: SymmetricOperator,
    metrics: MetricsConfig,
    seed: int,
    v0: Tensor | None = None,
) -> TopEigenpair:
    """The top eigenpair of ``op`` for tracking during training.

    Cheap by design: warm-started from ``v0``, no verification search, and the
    residual from the Lanczos relation instead of one more product; tolerance
    and budget from ``metrics.sharpness_tol`` and ``sharpness_max_matvecs``.
    """
    res = eigenvalues(
        op,
        1,
        tol=metrics.sharpness_tol,
        max_matvecs=metrics.sharpness_max_matvecs,
        v0=v0,
        seed=seed,
        verify=False,
        explicit_residuals=False,
    )
    return TopEigenpair(
        value=float(res.values[0]),
        vector=res.vectors,
        residual=float(res.residuals[0]),
        converged=bool(res.converged[0]),
        matvecs=res.cost.matvecs,
    )


class LossAccuracy(Callback):
    """``train_loss``, ``test_loss`` (and ``_accuracy``) on fixed seeded subsets.

    Under data parallelism (a process group of several ranks) each rank
    evaluates its contiguous shard of each subset and the sums are reduced over
    the ranks, so every rank gets the one-process numbers.

    Args:
        state: the run (its data, and whether the targets are classes).
        eval_samples: the subsets' size (``None``: the whole splits).
        seed: seed of the subsets (the test subset's is ``seed + 1``).
    """

    def __init__(self, state: TrainState, eval_samples: int | None, seed: int):
        sets = {"train": subset(state.train_data, eval_samples, seed)}
        if state.test_data is not None:
            sets["test"] = subset(state.test_data, eval_samples, seed + 1)
        self.ranks = Ranks.current(state.device)
        self.sets: dict[str, tuple[Tensor, Tensor]] = {}  # this rank's shards
        self.sizes: dict[str, int] = {}  # the whole subsets' sizes
        for name, (X, y) in sets.items():
            part = self.ranks.shard(X.shape[0])
            self.sets[name], self.sizes[name] = (X[part], y[part]), X.shape[0]
        self.classification = state.classification

    def on_eval(self, state: TrainState) -> None:
        for name, (X, y) in self.sets.items():
            values = self._evaluate(state.model, state.loss_fn, X, y, self.sizes[name])
            for key, value in values.items():
                state.row[f"{name}_{key}"] = value

    @torch.no_grad()
    def _evaluate(
        self, model: nn.Module, loss_fn, X: Tensor, y: Tensor, n: int
    ) -> dict:
        was = model.training
        model.eval()
        try:
            chunks, correct = [], 0
            for i in range(0, X.shape[0], 1024):
                out = model(X[i : i + 1024])
                chunks.append((out, y[i : i + 1024]))
                if self.classification:
                    correct += int((out.argmax(1) == y[i : i + 1024]).sum())
            # the loss's own reduction over all chunks at once (docs/objective.md)
            reduction = resolve_reduction(loss_fn)
            loss = reduction.value_over(chunks)
        finally:
            model.train(was)
        if self.ranks.parallel:
            loss, correct = _over_ranks(self.ranks, reduction, chunks, loss, correct)
        res = {"loss": loss}
        if self.classification:
            res["accuracy"] = correct / n
        return res


def _over_ranks(
    ranks: Ranks, reduction: LossReduction, chunks: list, loss: float, correct: int
) -> tuple[float, int]:
    """The loss and correct count over every rank's shard, from this rank's.

    A shard's loss is its sum of terms over its normalizer ``Z`` (the loss's
    own reduction, :meth:`~lossgeom.objective.LossReduction.value_over`), so
    the loss over all shards is ``sum(loss_r * Z_r) / sum(Z_r)`` (a plain sum
    for ``reduction="sum"``).
    """
    summed = reduction.kind == "sum" or reduction.reduction == "sum"
    z = 1.0
    if not summed:
        z = sum(
            float(reduction.batch_normalizer(y, tuple(out.shape[1:]))[0])
            for out, y in chunks
        )
    total = loss * z if z > 0 else 0.0
    total, z, correct = ranks.sum([total, z, float(correct)])
    if summed:
        return total, int(correct)
    return (total / z if z > 0 else math.nan), int(correct)


class GradientNorm(Callback):
    """``grad_norm``: the norm of the probe objective's gradient."""

    def on_eval(self, state: TrainState) -> None:
        state.row["grad_norm"] = float(state.hessian.gradient().norm())


class Sharpness(Callback):
    """The top Hessian eigenvalue against the edge-of-stability threshold.

    Columns: ``sharpness`` (warm-started from the last measurement), its
    ``_residual``, ``_converged`` and ``_matvecs``; ``eos_threshold`` and
    ``eos_formula`` (:func:`stability_threshold` at the row's ``lr``);
    ``eos_ratio``, which for Adam and K-FAC compares ``preconditioned_sharpness``
    (``lambda_max(P^-1 H)``, from the first update on) instead.

    Attributes:
        v0: the last top eigenvector (the next warm start; checkpointed).
        last: the last sharpness (checkpointed).
    """

    def __init__(self, metrics: MetricsConfig, optim: OptimConfig, seed: int):
        self.metrics, self.optim, self.seed = metrics, optim, seed
        self.v0: Tensor | None = None
        self.last: float | None = None

    def on_eval(self, state: TrainState) -> None:
        seed = self.seed + state.step
        top = top_eigenpair(state.hessian, self.metrics, seed, self.v0)
        self.v0, self.last = top.vector, top.value
        row = state.row
        row["sharpness"] = top.value
        row["sharpness_residual"] = top.residual
        row["sharpness_converged"] = top.converged
        row["sharpness_matvecs"] = top.matvecs
        threshold, formula = stability_threshold(self.optim, state.lr)
        row["eos_threshold"] = threshold
        row["eos_formula"] = formula
        if self.optim.name not in ("adam", "adamw", "kfac"):
            row["eos_ratio"] = top.value / threshold
            return
        # lambda_max(P^-1 H) = lambda_max(P^-1/2 H P^-1/2), symmetric
        if isinstance(state.optimizer, KFAC):
            op = _KFACPreconditioned.of(state.hessian, state.objective, state.optimizer)
        else:
            scale = _adam_scale(state.objective, state.optimizer)
            op = None if scale is None else _Preconditioned(state.hessian, scale)
        if op is not None:
            pre = top_eigenpair(op, self.metrics, seed)
            row["preconditioned_sharpness"] = pre.value
            row["eos_ratio"] = pre.value / threshold


class HessianTrace(Callback):
    """``trace`` of the probe objective's Hessian, its ``_stderr`` and ``_method``.

    Args:
        matvecs: Hessian-vector products per estimate.
        seed: seed of the probes (plus the step).
    """

    def __init__(self, matvecs: int, seed: int):
        self.matvecs, self.seed = matvecs, seed

    def on_eval(self, state: TrainState) -> None:
        tr = trace(state.hessian, self.matvecs, seed=self.seed + state.step)
        state.row.update(trace=tr.value, trace_stderr=tr.stderr, trace_method=tr.method)


class _Preconditioned(SymmetricOperator):
    """``D H D`` with ``D = diag(d)``: same eigenvalues as ``D^2 H``."""

    def __init__(self, op: SymmetricOperator, scale: Tensor):
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op, self.scale = op, scale.unsqueeze(1)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.scale * (self.op @ (self.scale * V))


class _KFACPreconditioned(SymmetricOperator):
    """``P^-1/2 H P^-1/2`` for K-FAC's damped blockwise curvature ``P``."""

    def __init__(self, op: SymmetricOperator, objective: Objective, kfac: KFAC):
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op, self.kfac = op, kfac
        params = dict(objective.model.named_parameters())
        position = {p: i for i, p in enumerate(kfac.param_groups[0]["params"])}
        self.where = [position.get(params[name]) for name in objective.names]
        self.shapes = [params[name].shape for name in objective.names]

    @classmethod
    def of(cls, op, objective, kfac: KFAC) -> _KFACPreconditioned | None:
        """The operator, or ``None`` before K-FAC's first curvature."""
        return cls(op, objective, kfac) if kfac.has_curvature else None

    def _root(self, V: Tensor) -> Tensor:
        """``P^-1/2`` on the columns of ``V`` (objective order)."""
        k = V.shape[1]
        params = self.kfac.param_groups[0]["params"]
        pieces = V.T.split([s.numel() for s in self.shapes], dim=1)
        given = [
            torch.zeros(k, *p.shape, dtype=p.dtype, device=p.device) for p in params
        ]
        for piece, i, shape in zip(pieces, self.where, self.shapes, strict=True):
            if i is not None:
                given[i] = piece.reshape(k, *shape).to(given[i].dtype)
        done = self.kfac.precondition(given, power=-0.5)
        out = [
            pieces[j] if i is None else done[i].reshape(k, -1).to(V.dtype)
            for j, i in enumerate(self.where)
        ]
        return torch.cat(out, dim=1).T

    def _matmat(self, V: Tensor) -> Tensor:
        return self._root(self.op @ self._root(V))


def _adam_scale(
    objective: Objective, optimizer: torch.optim.Optimizer
) -> Tensor | None:
    """``P^{-1/2}`` of Adam, flattened in the objective's parameter order."""
    group = optimizer.param_groups[0]
    b2, eps = group["betas"][1], group["eps"]
    parts = []
    params = dict(objective.model.named_parameters())
    for p in (params[name] for name in objective.names):
        state = optimizer.state.get(p)
        if not state or "exp_avg_sq" not in state:
            return None  # before the first step there is no preconditioner
        step = float(state["step"])
        v_hat = state["exp_avg_sq"] / (1 - b2**step)
        parts.append((v_hat.sqrt() + eps).reciprocal().sqrt().reshape(-1))
    return torch.cat(parts).to(objective.dtype)
