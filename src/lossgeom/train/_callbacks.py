"""The callback protocol of the training loop: four hooks and the state they read.

A callback is an object with four hooks, each taking the one :class:`TrainState`
of the run. :func:`~lossgeom.train.train` calls them at fixed points:

``on_train_start(state)``
    Once per call that trains or measures: after the model, optimizer and probe
    objective are built and a checkpoint (when resuming) is loaded, before the
    first measurement or update. ``state.step`` is where training starts (0, or
    the step of the checkpoint resumed from). A call that finds a finished or
    diverged run in its directory fires no hook at all.
``on_eval(state)``
    At every metrics step (``config.metrics`` set): steps ``0, every, 2 every,
    ...`` below ``config.steps``, and ``config.steps`` itself; after a resume
    again at the resumed step, whose row is written anew. It fires before that
    step's update, with the weights after ``state.step`` updates. ``state.row``
    holds ``step``, ``lr`` and (after the first update) ``batch_loss``; the
    built-in callbacks add their columns (and ``probe_seconds``, their wall
    time), then the user callbacks add theirs, then the row is appended to
    ``metrics.jsonl``.
``on_step(state)``
    After each optimizer update: ``state.step`` counts the updates done
    (already increased), ``state.lr`` and ``state.batch_loss`` are that update's
    step size and the loss of its batch (before the update). An update whose
    batch loss is not finite is not made and fires no ``on_step``.
``on_train_end(state)``
    Once, when training stops: ``state.status`` is ``"finished"`` (after the
    last ``on_eval``; the final checkpoint is written by the built-in
    checkpointing here and ``status.json`` says ``finished`` after every
    callback's ``on_train_end``) or ``"diverged"`` (``status.json`` already says
    so). An exception (a failed write, an interrupt) propagates without it;
    ``status.json`` then says ``failed``.

At each hook the built-in callbacks run first (losses and accuracies, gradient
norm, sharpness and the edge-of-stability threshold, trace, named measures,
update dimension, checkpoints), then the user's, in the order given. A
:class:`~lossgeom.NonFiniteError` raised in ``on_eval`` stops the run as
diverged, like a non-finite loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from lossgeom.curvature import HessianOperator
from lossgeom.objective import Objective
from lossgeom.train._config import TrainConfig

__all__ = ["HOOKS", "Callback", "TrainState", "check_callbacks"]

HOOKS = ("on_train_start", "on_step", "on_eval", "on_train_end")


@dataclass(eq=False)
class TrainState:
    """What a callback may read while a run trains.

    One object per call of :func:`~lossgeom.train.train`, updated in place by
    the loop. Callbacks read it; the only field that is theirs to change is
    ``row``, during ``on_eval``, by adding keys. They must not change the
    weights, the optimizer or the global random state (checkpoints save the
    global RNG, so a callback that draws random numbers uses its own
    ``torch.Generator``): a resumed run is then identical to an uninterrupted one.

    Attributes:
        config: the validated config of the run.
        run_dir: the run directory.
        model: the network being trained (on ``device``, in the run's dtype).
        optimizer: its optimizer.
        loss_fn: ``loss_fn(outputs, targets)``, the mean over samples.
        objective: the probe :class:`~lossgeom.Objective`: the model and loss on a
            fixed seeded subset of the training data (``metrics.probe_samples``),
            in ``metrics.probe_mode``.
        train_data: the training set ``(inputs, targets)`` on ``device``.
        test_data: the test set, or ``None``.
        device: where the model and data are.
        classification: whether the targets are class labels.
        step: updates done so far.
        lr: in ``on_eval``, the row's ``lr``: the step size of this step's
            update (after the curvature-adaptive rule, ``optim.adaptive``, has
            refreshed its estimate at this step), the last update's at the final
            step; in ``on_step``, the step size the update just used; ``None``
            before either.
        batch_loss: the training loss of the latest update's batch (``None``
            before the first update of a fresh run).
        row: in ``on_eval``, the metrics row being built (a dict a callback may
            add JSON-ready columns to); ``None`` outside ``on_eval``.
        hessian: in ``on_eval``, the Hessian of ``objective`` at this step's
            weights, shared so the graphs it keeps serve every callback;
            ``None`` outside ``on_eval``.
        resumed_from: the step of the checkpoint this call resumed from
            (``None``: a fresh start).
        status: ``"running"``, then ``"finished"`` or ``"diverged"`` in
            ``on_train_end``.
        stop_reason: why a run finished before ``config.steps`` (the
            ``stop`` rule met), or ``None``.
    """

    config: TrainConfig = field(repr=False)
    run_dir: Path
    model: nn.Module = field(repr=False)
    optimizer: torch.optim.Optimizer = field(repr=False)
    loss_fn: Callable[[Tensor, Tensor], Tensor] = field(repr=False)
    objective: Objective = field(repr=False)
    train_data: tuple[Tensor, Tensor] = field(repr=False)
    test_data: tuple[Tensor, Tensor] | None = field(repr=False)
    device: torch.device
    classification: bool
    step: int = 0
    lr: float | None = None
    batch_loss: float | None = None
    row: dict[str, object] | None = None
    hessian: HessianOperator | None = field(default=None, repr=False)
    resumed_from: int | None = None
    status: Literal["running", "finished", "diverged"] = "running"
    stop_reason: str | None = None


class Callback:
    """Base of training callbacks: every hook does nothing until overridden.

    Subclass it and override the hooks you need; pass instances as
    ``lg.train(config, callbacks=[...])``. See the module documentation for
    when each hook fires. Any object with the four hooks works as well.

    Example:
        >>> import tempfile
        >>> import lossgeom as lg
        >>> class WeightNorm(Callback):
        ...     def on_eval(self, state):
        ...         weights = [p.detach().flatten() for p in state.model.parameters()]
        ...         state.row["weight_norm"] = float(torch.cat(weights).norm())
        >>> config = {"model": {"name": "mlp", "options": {"width": 8}},
        ...           "data": {"name": "digits", "subset": 64}, "steps": 4,
        ...           "metrics": {"every": 2, "sharpness": False}}
        >>> res = lg.train(config, tempfile.mkdtemp(), callbacks=[WeightNorm()])
        >>> [(row["step"], "weight_norm" in row) for row in res.metrics]
        [(0, True), (2, True), (4, True)]
    """

    def on_train_start(self, state: TrainState) -> None:
        """Training is about to start (or resume) at ``state.step``."""

    def on_step(self, state: TrainState) -> None:
        """An update was made; ``state.step`` updates are done."""

    def on_eval(self, state: TrainState) -> None:
        """A metrics step: add columns to ``state.row``."""

    def on_train_end(self, state: TrainState) -> None:
        """Training stopped with ``state.status``."""


def check_callbacks(callbacks: Sequence[Callback]) -> list[Callback]:
    """The user's callbacks as a list, or a ``TypeError`` naming what is wrong."""
    if isinstance(callbacks, Callback) or not isinstance(callbacks, Sequence):
        raise TypeError(
            "callbacks must be a list of Callback instances; got "
            f"{type(callbacks).__name__}. Pass callbacks=[...]."
        )
    for i, cb in enumerate(callbacks):
        if isinstance(cb, type):
            raise TypeError(
                f"callbacks[{i}] is the class {cb.__name__}, not an instance; pass "
                f"{cb.__name__}() instead."
            )
        missing = [h for h in HOOKS if not callable(getattr(cb, h, None))]
        if missing:
            raise TypeError(
                f"callbacks[{i}] ({type(cb).__name__}) has no hooks {missing}; "
                "subclass lossgeom.train.Callback and override the hooks you need "
                f"({', '.join(HOOKS)})."
            )
    return list(callbacks)
