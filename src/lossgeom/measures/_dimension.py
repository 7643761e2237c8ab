"""Intrinsic dimension of a task by training in a random subspace.

:func:`intrinsic_dimension`: the smallest number ``d`` of trainable coordinates
``z`` in ``theta = theta0 + P z`` (a random ``D x d`` projection ``P`` of
:mod:`lossgeom.linalg.projections`, ``theta0`` the frozen initialisation) with
which training reaches ``threshold`` times the accuracy of the full model (Li et
al. 2018, "Measuring the intrinsic dimension of objective landscapes").
:func:`subspace_train` trains one subspace.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lossgeom._results import Result, jsonable, timed
from lossgeom.linalg.projections import Projection, ProjectionKind, random_projection
from lossgeom.measures._checks import (
    _check_int,
    _check_kind,
    _check_subspace,
    _check_threshold,
)
from lossgeom.objective import Objective, minimize

__all__ = [
    "IntrinsicDimensionResult",
    "SubspaceRun",
    "intrinsic_dimension",
    "subspace_train",
]


# ------------------------------------------------------- subspace training
@dataclass(frozen=True)
class SubspaceRun:
    """One training run in a random subspace ``theta = theta0 + P z``.

    Attributes:
        dim: ``d``, the number of trained coordinates (``D`` for the full model).
        accuracy: accuracy on the evaluation data at the end of training.
        loss: loss on the evaluation data at the end of training.
        train_loss: loss of the last training batch.
        finite: whether the final parameters and losses are finite.
        projection: kind of ``P`` (``"full"`` for the full model).
        seed: seed of the projection and the batch order.
        steps: Adam steps taken.
        lr: Adam's step size.
        seconds: wall time of the run.
    """

    dim: int
    accuracy: float
    loss: float
    train_loss: float
    finite: bool
    projection: str
    seed: int
    steps: int
    lr: float
    seconds: float

    def to_dict(self) -> dict:
        """Plain JSON values."""
        return jsonable(self)


class _Problem:
    """The model as a function of theta, the training tensors and the evaluation."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        train_data: object,
        eval_data: object,
        *,
        mode: str,
        dtype: torch.dtype | None,
        eval_batch_size: int | None,
    ):
        if not (
            isinstance(train_data, (tuple, list))
            and len(train_data) == 2
            and all(isinstance(t, Tensor) for t in train_data)
        ):
            raise ValueError(
                "expected train_data as an (inputs, targets) pair of tensors (the "
                "batches are drawn from it with a seeded generator); got "
                f"{type(train_data).__name__}. Load a data set with "
                "lossgeom.zoo.dataset(...) or stack a DataLoader's batches."
            )
        self.train = Objective(model, loss_fn, train_data, mode=mode, dtype=dtype)
        self.eval = Objective(
            model,
            loss_fn,
            eval_data,
            mode=mode,
            dtype=dtype,
            batch_size=eval_batch_size,
        )
        if not self.eval.knows_accuracy:
            raise ValueError(
                "intrinsic dimension compares accuracies, so it needs a classifier: "
                "outputs (n, C) with C > 1 and integer class targets (n,); the "
                "model and eval_data give something else."
            )
        X, y = train_data
        if X.shape[0] != y.shape[0] or X.shape[0] < 1:
            raise ValueError(
                f"train_data inputs and targets need the same positive number of "
                f"samples; got {X.shape[0]} and {y.shape[0]}."
            )
        dev, dt = self.train.device, self.train.dtype
        self.X = X.to(dev, dt if X.is_floating_point() else None)
        self.y = y.to(dev, dt if y.is_floating_point() else None)
        self.loss_fn = self.train.loss_fn
        self.theta0 = self.train.theta
        self.num_params = self.train.dim

    def run(
        self,
        proj: Projection | None,
        *,
        steps: int,
        lr: float,
        batch_size: int | None,
        seed: int,
    ) -> SubspaceRun:
        """Train ``z`` (``theta0 + P z``, or ``theta0 + z`` without ``P``) with Adam."""
        with timed() as meter:
            dim = self.num_params if proj is None else proj.dim
            z = self.theta0.new_zeros(dim)
            gen = torch.Generator().manual_seed(seed)
            n = self.X.shape[0]

            def batch_loss(z: Tensor) -> Tensor:
                if batch_size is None or batch_size >= n:
                    x, y = self.X, self.y
                else:
                    idx = torch.randint(0, n, (batch_size,), generator=gen)
                    idx = idx.to(self.X.device)
                    x, y = self.X[idx], self.y[idx]
                theta = self.theta0 + (z if proj is None else proj(z))
                return self.loss_fn(self.train.model_fn(theta, x), y)

            with self.train.probe_mode(higher_order=False):
                log = minimize(
                    z,
                    lambda _step, z: batch_loss(z),
                    steps=steps,
                    lr=lr,
                    stop_on_nonfinite=False,
                )
                loss = log.last_loss
            with torch.no_grad():
                theta = self.theta0 + (z if proj is None else proj(z))
                metrics = self.eval.evaluate_metrics(theta.unsqueeze(0), chunk_size=1)
            acc, eval_loss = float(metrics["accuracy"][0]), float(metrics["loss"][0])
            finite = bool(
                torch.isfinite(theta).all() and math.isfinite(eval_loss)
            ) and math.isfinite(float(loss))
        return SubspaceRun(
            dim=dim,
            accuracy=acc,
            loss=eval_loss,
            train_loss=float(loss),
            finite=finite,
            projection="full" if proj is None else proj.kind,
            seed=seed,
            steps=steps,
            lr=lr,
            seconds=meter.cost.seconds,
        )


def _check_training(steps: object, lr: object, batch_size: object) -> None:
    _check_int("steps", steps, 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number; got {lr!r}.")
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)


def subspace_train(
    model: nn.Module,
    loss_fn: Any,
    train_data: tuple[Tensor, Tensor],
    eval_data: object,
    dim: int,
    *,
    projection: ProjectionKind = "fastfood",
    steps: int = 500,
    lr: float = 0.01,
    batch_size: int | None = None,
    seed: int = 0,
    mode: Literal["eval", "train"] = "eval",
    dtype: torch.dtype | None = None,
) -> SubspaceRun:
    """Train only ``z`` in ``theta = theta0 + P z`` and report the accuracy reached.

    ``theta0`` is the model's current parameters (frozen), ``P`` a seeded
    random projection (:func:`random_projection`) of size ``D x dim``, ``z``
    starts at 0 and takes ``steps`` Adam steps on the training loss (full batch,
    or seeded batches of ``batch_size`` drawn with replacement). The model is
    evaluated through :func:`torch.func.functional_call` and never modified.

    Args:
        model: a classifier ``nn.Module``.
        loss_fn: ``loss_fn(outputs, targets)``, the batch mean.
        train_data: ``(inputs, targets)`` tensors.
        eval_data: the data the accuracy is measured on (anything
            :class:`~lossgeom.objective.Objective` accepts).
        dim: ``d``, between 1 and the parameter count ``D``.
        projection: ``"fastfood"`` (default), ``"dense"`` or ``"sparse"``.
        steps: Adam steps.
        lr: Adam's step size on ``z``.
        batch_size: samples per step (``None``: all).
        seed: seed of the projection and the batch order.
        mode: ``"eval"`` or ``"train"`` (BatchNorm batch statistics), for
            training and evaluation alike.
        dtype: train in this dtype (``None``: the model's).

    Returns:
        A :class:`SubspaceRun`.
    """
    _check_training(steps, lr, batch_size)
    kind = _check_kind(projection)
    problem = _Problem(
        model, loss_fn, train_data, eval_data, mode=mode, dtype=dtype,
        eval_batch_size=None,
    )  # fmt: skip
    dim = _check_subspace(dim, problem.num_params)
    proj = random_projection(
        kind, problem.num_params, dim, seed=seed, device=problem.train.device,
        dtype=problem.train.dtype,
    )  # fmt: skip
    return problem.run(proj, steps=steps, lr=lr, batch_size=batch_size, seed=seed)


# ------------------------------------------------------- intrinsic dimension
@dataclass(frozen=True)
class IntrinsicDimensionResult(Result):
    """The intrinsic dimension of a task found by random-subspace training.

    Attributes:
        d_int: smallest subspace size tried whose accuracy reached
            ``target_accuracy`` (``d_int90`` at the default threshold 0.9);
            ``None`` if no size tried reached it.
        lower: largest size tried below ``d_int`` that missed the target (the
            bracket is ``(lower, d_int]``); ``None`` if ``d_int`` is the first
            grid size or was not found.
        threshold: the fraction of the reference accuracy to reach.
        target_accuracy: ``threshold * reference_accuracy``.
        reference_accuracy: accuracy of the full model.
        reference_trained: whether the reference was trained here (or given).
        dims: subspace sizes tried, in the order tried.
        accuracies: their accuracies, in the same order.
        runs: one dict per run (:class:`SubspaceRun` fields and ``stage``:
            ``"reference"``, ``"grid"`` or ``"bisection"``).
        consistent: whether accuracy crossed the target once over the sizes tried
            (no smaller size reached it while a larger one missed); bisection
            assumes this.
        num_params: ``D``.
        projection: kind of projection.
        definition: the definition and the search, in words.
        parameters: the inputs.
        cost: seconds, training steps, runs, and the evaluation's counters.
    """

    d_int: int | None
    lower: int | None
    threshold: float
    target_accuracy: float
    reference_accuracy: float
    reference_trained: bool
    dims: list[int]
    accuracies: list[float]
    runs: list[dict]
    consistent: bool
    num_params: int
    projection: str

    @property
    def d_int90(self) -> int | None:
        """``d_int`` when ``threshold`` is 0.9; raises otherwise."""
        if self.threshold != 0.9:
            raise ValueError(
                f"this result is for threshold={self.threshold}, not 0.9; read d_int."
            )
        return self.d_int

    @property
    def found(self) -> bool:
        """Whether some size tried reached the target."""
        return self.d_int is not None

    def scalars(self) -> dict[str, float]:
        """``d_int`` (``value``; ``nan`` when not found)."""
        return {"value": math.nan if self.d_int is None else float(self.d_int)}


def _log_grid(num_params: int) -> list[int]:
    grid, d = [], 1
    while d < num_params:
        grid.append(d)
        d *= 2
    return [*grid, num_params]


def _check_search(resolution: object, reference_accuracy: object) -> None:
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, (int, float))
        or not resolution > 1
    ):
        raise ValueError(
            f"resolution must be a ratio > 1 (e.g. 1.1 stops the bisection when "
            f"the bracket is within 10%); got {resolution!r}."
        )
    if reference_accuracy is not None and not (
        isinstance(reference_accuracy, (int, float))
        and not isinstance(reference_accuracy, bool)
        and 0 < reference_accuracy <= 1
    ):
        raise ValueError(
            "reference_accuracy must be an accuracy in (0, 1], or None to train "
            f"the full model; got {reference_accuracy!r}."
        )


def _sizes(dims: Sequence[int] | None, num_params: int) -> list[int]:
    """The coarse grid of subspace sizes: ``dims`` checked and sorted, or doubling."""
    if dims is None:
        return _log_grid(num_params)
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or not dims:
        raise ValueError(
            f"dims must be a non-empty list of subspace sizes; got {dims!r}."
        )
    return sorted({_check_subspace(d, num_params) for d in dims})


class _Search:
    """The runs of one search for ``d_int``: each size trained once, in order."""

    def __init__(
        self,
        problem: _Problem,
        kind: str,
        *,
        steps: int,
        lr: float,
        batch_size: int | None,
        seed: int,
    ):
        self.problem, self.kind = problem, kind
        self.steps, self.lr, self.batch_size, self.seed = steps, lr, batch_size, seed
        self.runs: list[dict] = []
        self.accuracy_of: dict[int, float] = {}
        self.passed_at: dict[int, bool] = {}
        self.target = math.nan  # the accuracy to reach, set once the reference is known

    def reference(self, reference_accuracy: float | None, reference_lr: float) -> float:
        """The full model's accuracy: given, or trained here (a run of its own)."""
        if reference_accuracy is not None:
            return float(reference_accuracy)
        ref = self.problem.run(
            None,
            steps=self.steps,
            lr=reference_lr,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        self.runs.append({**ref.to_dict(), "stage": "reference"})
        if not ref.finite:
            raise ValueError(
                "training the full model for the reference accuracy diverged "
                f"(reference_lr={reference_lr}); lower reference_lr, or pass "
                "reference_accuracy."
            )
        return ref.accuracy

    def train(self, d: int, stage: str) -> bool:
        """Train in a subspace of size ``d``; whether it reached the target."""
        problem = self.problem
        proj = random_projection(
            self.kind,
            problem.num_params,
            d,
            seed=self.seed,
            device=problem.train.device,
            dtype=problem.train.dtype,
        )
        run = problem.run(
            proj,
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        self.runs.append({**run.to_dict(), "stage": stage})
        self.accuracy_of[d] = run.accuracy
        self.passed_at[d] = bool(run.finite and run.accuracy >= self.target)
        return self.passed_at[d]

    def bracket(
        self, grid: list[int], resolution: float
    ) -> tuple[int | None, int | None]:
        """``(lo, hi)``: the last size that missed and the first that reached.

        The grid is trained in increasing order until a size reaches the target,
        then the bracket is bisected on a log scale down to ``resolution``.
        """
        lo: int | None = None
        hi: int | None = None
        for d in grid:
            if self.train(d, "grid"):
                hi = d
                break
            lo = d
        if hi is not None and lo is not None:
            while hi - lo > 1 and hi > resolution * lo:
                mid = min(max(round(math.sqrt(lo * hi)), lo + 1), hi - 1)
                if self.train(mid, "bisection"):
                    hi = mid
                else:
                    lo = mid
        return lo, hi


def intrinsic_dimension(
    model: nn.Module,
    loss_fn: Any,
    train_data: tuple[Tensor, Tensor],
    eval_data: object,
    *,
    dims: Sequence[int] | None = None,
    projection: ProjectionKind = "fastfood",
    steps: int = 500,
    lr: float = 0.01,
    batch_size: int | None = None,
    seed: int = 0,
    threshold: float = 0.9,
    resolution: float = 1.1,
    reference_accuracy: float | None = None,
    reference_lr: float = 0.001,
    mode: Literal["eval", "train"] = "eval",
    dtype: torch.dtype | None = None,
    eval_batch_size: int | None = None,
) -> IntrinsicDimensionResult:
    """``d_int``: the smallest random subspace in which training reaches the target.

    Following Li et al. (2018), the model is trained in ``theta = theta0 + P z``
    (:func:`subspace_train`: ``theta0`` the model's parameters, frozen; ``P``
    a seeded ``D x d`` random projection; only ``z`` trained with Adam), and
    ``d_int`` is the smallest ``d`` whose accuracy on ``eval_data`` reaches
    ``threshold * reference_accuracy``, the reference being the full model
    trained the same way (all ``D`` parameters, step size ``reference_lr``)
    unless given.

    The search: the sizes of ``dims`` (default ``1, 2, 4, ...`` below ``D``,
    then ``D``) are trained in increasing order until one reaches the target;
    then the bracket between the last size that missed and the first that
    reached is bisected on a log scale (geometric midpoints) until
    ``hi / lo <= resolution`` or ``hi - lo <= 1``. ``d_int`` is the smallest
    size tried that reached the target: within a factor ``resolution`` of the
    crossing, if accuracy grows with ``d`` (``consistent`` reports whether the
    sizes tried agree with that). Each size costs one training run of
    ``steps`` steps.

    Args:
        model: a classifier ``nn.Module`` (never modified).
        loss_fn: ``loss_fn(outputs, targets)``, the batch mean.
        train_data: ``(inputs, targets)`` tensors to train on.
        eval_data: data the accuracies are measured on (e.g. a test split).
        dims: the coarse grid of sizes, each between 1 and ``D``.
        projection: ``"fastfood"`` (default, memory ``O(D)``), ``"sparse"`` or
            ``"dense"`` (small models only).
        steps: Adam steps per run.
        lr: Adam's step size on ``z``.
        batch_size: samples per step (``None``: all).
        seed: seed of the projections and the batch order.
        threshold: the fraction of the reference accuracy, in (0, 1].
        resolution: the bisection stops at this ratio of the bracket, > 1.
        reference_accuracy: the full model's accuracy, if already known.
        reference_lr: Adam's step size for the full model.
        mode: ``"eval"`` or ``"train"`` (BatchNorm batch statistics).
        dtype: train in this dtype (``None``: the model's).
        eval_batch_size: evaluate at most this many samples at once.

    Returns:
        An :class:`IntrinsicDimensionResult`.

    Raises:
        ValueError: a size outside ``[1, D]``, an unknown projection, a
            threshold outside (0, 1], or a model that is not a classifier.
    """
    threshold = _check_threshold(threshold)
    kind = _check_kind(projection)
    _check_training(steps, lr, batch_size)
    _check_training(1, reference_lr, None)
    _check_search(resolution, reference_accuracy)
    problem = _Problem(
        model, loss_fn, train_data, eval_data, mode=mode, dtype=dtype,
        eval_batch_size=eval_batch_size,
    )  # fmt: skip
    D = problem.num_params
    grid = _sizes(dims, D)

    search = _Search(
        problem, kind, steps=steps, lr=lr, batch_size=batch_size, seed=seed
    )
    with timed(problem.eval) as meter:
        reference = search.reference(reference_accuracy, reference_lr)
        target = search.target = threshold * reference
        lo, hi = search.bracket(grid, resolution)
    ordered = sorted(search.accuracy_of)
    passed = [search.passed_at[d] for d in ordered]  # the same test the search used
    consistent = all(not p or q for p, q in zip(passed, passed[1:], strict=False))
    runs = search.runs
    n_runs = len(runs)
    return IntrinsicDimensionResult(
        d_int=hi,
        lower=lo if hi is not None else None,
        threshold=threshold,
        target_accuracy=target,
        reference_accuracy=reference,
        reference_trained=reference_accuracy is None,
        dims=[r["dim"] for r in runs if r["stage"] != "reference"],
        accuracies=[r["accuracy"] for r in runs if r["stage"] != "reference"],
        runs=runs,
        consistent=consistent,
        num_params=D,
        projection=kind,
        definition=(
            "d_int = smallest subspace size d such that training only z in "
            "theta = theta0 + P z (P a seeded random D x d "
            f"{kind} projection with unit-norm columns, theta0 the frozen "
            "initialisation, Adam) reaches threshold * the full model's accuracy on "
            "the evaluation data; searched on a doubling grid, then by bisection "
            "on a log scale down to the resolution"
        ),
        parameters={
            "dims": grid,
            "projection": kind,
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "threshold": threshold,
            "resolution": resolution,
            "reference_accuracy": reference_accuracy,
            "reference_lr": reference_lr,
            "mode": mode,
            "dtype": str(problem.train.dtype).removeprefix("torch."),
            "device": str(problem.train.device),
        },
        cost=meter.cost.add(runs=n_runs, train_steps=n_runs * steps),
    )
