"""Permutation alignment of two networks by weight matching ("Git Re-Basin").

Ainsworth, Hayase & Srinivasa 2022, "Git Re-Basin: Merging Models modulo
Permutation Symmetries": the hidden units of a network can be reordered without
changing its function. Weight matching looks for the reordering of network ``b``
that brings its weights closest to network ``a``, i.e. maximises
``sum_params <theta_a, pi(theta_b)>``, by coordinate descent: one permutation
group at a time (in a random order each sweep), each step a linear assignment
problem solved exactly with :func:`scipy.optimize.linear_sum_assignment`, until a
whole sweep changes no permutation. The permutation groups come from the module
graph (:mod:`lossgeom.geometry._permutations`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from lossgeom._results import CostMeter, Result
from lossgeom.geometry._permutations import (
    PermutationGroup,
    _derive,
    _permute_tensor,
    _placement,
    _plan,
    permute_model,
)
from lossgeom.objective import Objective

__all__ = ["AlignmentResult", "align"]

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class AlignmentResult(Result):
    """Network ``b`` permuted to match network ``a``, and what it gained.

    Attributes:
        theta: flat parameter vector of the permuted ``b`` (trainable parameters
            in ``named_parameters()`` order, like ``Objective.theta``).
        permutations: ``{group name: int64 indices}``; unit ``i`` of the permuted
            ``b`` is unit ``permutations[g][i]`` of ``b``.
        groups: the permutation groups as ``PermutationGroup.to_dict()`` values.
        n_sweeps: coordinate-descent sweeps over all groups.
        converged: whether the last sweep changed no permutation.
        objective_before: ``sum <theta_a, theta_b>`` over trainable parameters,
            the quantity weight matching maximises, before alignment.
        objective_after: the same for the permuted ``b``.
        distance_before: ``|theta_a - theta_b|`` (Euclidean).
        distance_after: ``|theta_a - pi(theta_b)|``.
        barrier_before: loss barrier of the straight line from ``a`` to ``b``
            (``None`` without data): ``max_t loss(t) - ((1-t) loss(0) + t loss(1))``.
        barrier_after: the same from ``a`` to the permuted ``b``.
        eval_barrier_before: the barrier to ``b`` on ``eval_data`` (``None``
            without it), e.g. held-out data.
        eval_barrier_after: the barrier to the permuted ``b`` on ``eval_data``.
        ts: the path grid (``None`` without data).
        loss_before: loss along the line to ``b`` at ``ts`` (``None`` without data).
        loss_after: loss along the line to the permuted ``b``.
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`; ``parameters`` holds the arguments of
            :func:`align` and the objective's description.
    """

    theta: Tensor
    permutations: dict[str, Tensor]
    groups: list[dict]
    n_sweeps: int
    converged: bool
    objective_before: float
    objective_after: float
    distance_before: float
    distance_after: float
    barrier_before: float | None
    barrier_after: float | None
    eval_barrier_before: float | None
    eval_barrier_after: float | None
    ts: Tensor | None
    loss_before: Tensor | None
    loss_after: Tensor | None
    definition: str = field(
        default="weight matching (Ainsworth, Hayase and Srinivasa 2023): the "
        "permutation of b's hidden units maximising sum <theta_a, pi(theta_b)>, "
        "by coordinate descent over permutation groups; barriers as "
        "lossgeom.geometry.BARRIER_DEFINITION",
        kw_only=True,
    )
    bulky: ClassVar[tuple[str, ...]] = ("theta", "permutations")

    def scalars(self) -> dict[str, float]:
        """The barrier after alignment (``value``) and before, where measured."""
        out: dict[str, float] = {}
        if self.barrier_after is not None:
            out["value"] = float(self.barrier_after)
            out["barrier_before"] = float(self.barrier_before)
        out["distance_after"] = self.distance_after
        return out

    def permuted_model(self, model_b: nn.Module) -> nn.Module:
        """A deep copy of ``model_b`` (the model aligned) with the permutations applied.

        Parameters and buffers are permuted; ``model_b`` is not changed.
        """
        return permute_model(model_b, self.permutations, self.groups)


def align(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    loss_fn: LossFn | None = None,
    data: object = None,
    obj: Objective | None = None,
    eval_data: object = None,
    n_points: int = 25,
    recompute_norm: bool | None = None,
    example_input: Tensor | None = None,
    max_sweeps: int = 100,
    seed: int = 0,
    check: bool = True,
) -> AlignmentResult:
    """Permute the hidden units of ``model_b`` to match ``model_a`` (weight matching).

    Coordinate descent (Ainsworth et al. 2022, Algorithm 1): starting from the
    identity, each sweep visits the permutation groups of
    :func:`permutation_groups` in a random order (seeded by ``seed``) and sets
    group ``g``'s permutation to the exact maximiser of
    ``sum_params <theta_a, pi(theta_b)>`` with the other groups held fixed, a
    linear assignment problem (:func:`scipy.optimize.linear_sum_assignment`) on
    the ``size x size`` matrix of unit-to-unit inner products. Sweeps stop when
    none changes a permutation (``converged``) or after ``max_sweeps``. Cost
    matrices are computed in float64 on the models' device.

    **Barriers.** With data, the loss along the straight lines from ``a`` to
    ``b`` and from ``a`` to the permuted ``b`` is evaluated at ``n_points`` points
    with :func:`~lossgeom.geometry.interpolate`. Pass either ``loss_fn`` and
    ``data`` (an ``Objective(model_a, loss_fn, data)`` in eval mode is built) or
    ``obj``, an :class:`~lossgeom.Objective` built on ``model_a`` (or a
    copy of it in another dtype; the objective's parameters must equal
    ``model_a``'s). ``recompute_norm`` (default: when the model has BatchNorm
    and the objective is in eval mode) recomputes BatchNorm statistics at every
    point of the path from the objective's data, which the ends need too: the
    objective holds ``a``'s running statistics only.

    **Safety.** Neither model is changed (parameters, buffers, ``requires_grad``
    and train/eval flags). With ``check=True`` the permuted ``b`` is compared
    with ``b`` on an input batch (eval mode); a mismatch raises
    ``RuntimeError`` instead of returning a wrong alignment.

    Args:
        model_a: the reference network (its units keep their order).
        model_b: the network to permute; same architecture as ``model_a``.
        loss_fn: ``loss_fn(outputs, targets)``, with ``data``, for barriers.
        data: ``(inputs, targets)`` or anything :class:`Objective` accepts.
        obj: an objective on ``model_a`` instead of ``loss_fn``/``data``.
        eval_data: a second data set (e.g. held-out data) on which the paths
            are also evaluated (``eval_barrier_before/after``).
        n_points: points on each path, ends included (``>= 2``).
        recompute_norm: recompute BatchNorm statistics along the paths.
        example_input: an input batch for tracing shapes and the check (default:
            the first samples of the data, else a guess, see
            :func:`permutation_groups`).
        max_sweeps: most coordinate-descent sweeps (``>= 1``).
        seed: seed of the order in which groups are visited.
        check: verify that the permuted ``b`` computes the same function as ``b``.

    Returns:
        An :class:`AlignmentResult`; ``result.permuted_model(model_b)`` gives the
        permuted network.

    Raises:
        ValueError: the models differ in architecture (names, shapes, dtypes,
            module types), bad settings, or untraceable models.
        NotImplementedError: the model contains an operation on hidden units
            that the graph analysis does not understand.

    Example:
        >>> from lossgeom.zoo import mlp
        >>> a, b = mlp(6, 3, width=5, seed=0), mlp(6, 3, width=5, seed=1)
        >>> res = align(a, b)
        >>> res.distance_after <= res.distance_before
        True
        >>> x = torch.randn(4, 6)
        >>> torch.allclose(res.permuted_model(b)(x), b(x), atol=1e-6)
        True
    """
    meter = CostMeter()  # the objective is built below; time only
    _check_models(model_a, model_b)
    _check_settings(n_points, max_sweeps)
    obj = _objective(model_a, loss_fn, data, obj)
    if eval_data is not None and obj is None:
        raise ValueError(
            "eval_data= needs loss_fn= and data= (or obj=) as well: the paths "
            "are evaluated on both data sets."
        )
    if example_input is None and obj is not None:
        x, _ = next(iter(obj.batches()))
        example_input = x[:8]
    groups, example = _derive(model_a, example_input)

    perms, n_sweeps, converged = _weight_matching(
        model_a, model_b, groups, max_sweeps=max_sweeps, seed=seed
    )
    permuted = permute_model(model_b, perms, groups)
    if check:
        _check_same_function(model_b, permuted, example)

    theta_a = _flat(model_a)
    theta_b = _flat(model_b)
    theta_p = _flat(permuted)
    da, db, dp = theta_a.double(), theta_b.double(), theta_p.double()
    paths = _Paths()
    if obj is not None:
        paths = _paths(obj, theta_b, theta_p, n_points, recompute_norm, eval_data)

    return AlignmentResult(
        theta=theta_p,
        permutations=perms,
        groups=[g.to_dict() for g in groups],
        n_sweeps=n_sweeps,
        converged=converged,
        objective_before=float(da @ db),
        objective_after=float(da @ dp),
        distance_before=float((da - db).norm()),
        distance_after=float((da - dp).norm()),
        barrier_before=paths.barrier_before,
        barrier_after=paths.barrier_after,
        eval_barrier_before=paths.eval_barrier_before,
        eval_barrier_after=paths.eval_barrier_after,
        ts=paths.ts,
        loss_before=paths.loss_before,
        loss_after=paths.loss_after,
        cost=meter.stop(),
        parameters={
            "method": "weight_matching",
            "n_points": n_points,
            "recompute_norm": paths.recompute_norm,
            "max_sweeps": max_sweeps,
            "seed": seed,
            "objective": None if obj is None else obj.info(),
        },
    )


def _check_settings(n_points: object, max_sweeps: object) -> None:
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 2:
        raise ValueError(
            f"n_points must be an int >= 2 (points on each path); got {n_points!r}."
        )
    if (
        isinstance(max_sweeps, bool)
        or not isinstance(max_sweeps, int)
        or max_sweeps < 1
    ):
        raise ValueError(f"max_sweeps must be an int >= 1; got {max_sweeps!r}.")


@dataclass(frozen=True)
class _Paths:
    """The straight lines from ``a`` to ``b`` and to the permuted ``b`` (or none)."""

    barrier_before: float | None = None
    barrier_after: float | None = None
    eval_barrier_before: float | None = None
    eval_barrier_after: float | None = None
    ts: Tensor | None = None
    loss_before: Tensor | None = None
    loss_after: Tensor | None = None
    recompute_norm: bool | None = None


def _paths(
    obj: Objective,
    theta_b: Tensor,
    theta_p: Tensor,
    n_points: int,
    recompute_norm: bool | None,
    eval_data: object,
) -> _Paths:
    """Loss along the lines from ``obj``'s parameters to ``b`` and to the permuted ``b``."""
    from lossgeom.geometry._paths import interpolate  # written alongside

    used_recompute = (
        obj.has_norm_statistics and obj.mode == "eval"
        if recompute_norm is None
        else bool(recompute_norm)
    )
    end_a = obj.theta
    before, after = (
        interpolate(
            obj,
            end_a,
            end_b.to(obj.device, obj.dtype),
            n_points=n_points,
            recompute_norm=used_recompute,
            eval_data=eval_data,
        )
        for end_b in (theta_b, theta_p)
    )
    eval_before = eval_after = None
    if before.eval_barrier is not None:
        eval_before = float(before.eval_barrier)
        eval_after = float(after.eval_barrier)
    return _Paths(
        barrier_before=float(before.barrier),
        barrier_after=float(after.barrier),
        eval_barrier_before=eval_before,
        eval_barrier_after=eval_after,
        ts=before.ts,
        loss_before=before.loss,
        loss_after=after.loss,
        recompute_norm=used_recompute,
    )


def _unit_rows(t: Tensor, axis: int, outer: int, inner: int, n: int) -> Tensor:
    """``(n, rest)``: the entries of ``t`` that belong to each unit of the axis."""
    shape = t.shape
    blocks = t.reshape(*shape[:axis], outer, n, inner, *shape[axis + 1 :])
    return blocks.movedim(axis + 1, 0).reshape(n, -1)


def _weight_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    groups: list[PermutationGroup],
    *,
    max_sweeps: int,
    seed: int,
) -> tuple[dict[str, Tensor], int, bool]:
    params_a = {
        n: p.detach().double() for n, p in model_a.named_parameters() if p.requires_grad
    }
    params_b = {
        n: p.detach().double() for n, p in model_b.named_parameters() if p.requires_grad
    }
    plan = _plan(groups)
    device = next(iter(params_a.values())).device
    perms = {g.name: torch.arange(g.size, device=device) for g in groups}
    by_group: dict[str, list[tuple[str, int]]] = {g.name: [] for g in groups}
    for name, axes in plan.items():
        if name in params_a:
            for axis, (g, _, _) in axes.items():
                by_group[g].append((name, axis))
    active = [g for g in groups if g.size > 1 and by_group[g.name]]
    rng = np.random.default_rng(seed)
    n_sweeps, changed = 0, True
    while changed and n_sweeps < max_sweeps:
        changed = False
        n_sweeps += 1
        for k in rng.permutation(len(active)):
            g = active[k]
            cost = torch.zeros(g.size, g.size, dtype=torch.float64, device=device)
            for name, axis in by_group[g.name]:
                axes = plan[name]
                others = {a: perms[axes[a][0]] for a in axes if a != axis}
                b = _permute_tensor(params_b[name], axes, others)
                _, outer, inner = axes[axis]
                rows_a = _unit_rows(params_a[name], axis, outer, inner, g.size)
                rows_b = _unit_rows(b, axis, outer, inner, g.size)
                cost += rows_a @ rows_b.T
            c = cost.cpu().numpy()
            _, cols = linear_sum_assignment(c, maximize=True)
            old = perms[g.name].cpu().numpy()
            rows = np.arange(g.size)
            gain_new, gain_old = c[rows, cols].sum(), c[rows, old].sum()
            if gain_new > gain_old + 1e-12 * max(1.0, abs(gain_old)):
                perms[g.name] = torch.as_tensor(cols, dtype=torch.int64, device=device)
                changed = True
    return perms, n_sweeps, not changed


def _flat(model: nn.Module) -> Tensor:
    return torch.cat(
        [p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]
    ).clone()


def _check_models(model_a: nn.Module, model_b: nn.Module) -> None:
    for label, m in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(m, nn.Module):
            raise TypeError(
                f"expected {label} to be a torch.nn.Module; got {type(m).__name__}."
            )
    fix = " Alignment needs two networks of the same architecture (e.g. the same zoo model and options, different seeds)."

    def table(m: nn.Module, kind: str) -> dict[str, tuple]:
        items = m.named_parameters() if kind == "parameter" else m.named_buffers()
        return {
            n: (tuple(t.shape), t.dtype, getattr(t, "requires_grad", False))
            for n, t in items
        }

    for kind in ("parameter", "buffer"):
        ta, tb = table(model_a, kind), table(model_b, kind)
        only_a, only_b = sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))
        if only_a or only_b:
            raise ValueError(
                f"the models have different {kind}s: only in model_a: {only_a[:3]}, "
                f"only in model_b: {only_b[:3]}." + fix
            )
        for n in ta:
            if ta[n][0] != tb[n][0]:
                raise ValueError(
                    f"{kind} {n!r} has shape {ta[n][0]} in model_a but {tb[n][0]} in "
                    "model_b." + fix
                )
            if ta[n][1] != tb[n][1]:
                raise ValueError(
                    f"{kind} {n!r} has dtype {ta[n][1]} in model_a but {tb[n][1]} in "
                    "model_b; convert one model, e.g. model_b.to(torch.float64)."
                )
            if ta[n][2] != tb[n][2]:
                raise ValueError(
                    f"{kind} {n!r} is trainable in one model and frozen in the other "
                    "(requires_grad differs); set the same flags on both."
                )
    types_a = [(n, type(m).__name__) for n, m in model_a.named_modules()]
    types_b = [(n, type(m).__name__) for n, m in model_b.named_modules()]
    if types_a != types_b:
        diff = next(
            (f"{x} vs {y}" for x, y in zip(types_a, types_b, strict=False) if x != y),
            f"{len(types_a)} vs {len(types_b)} modules",
        )
        raise ValueError(f"the models have different module structure ({diff})." + fix)
    devices = {p.device for p in model_a.parameters()} | {
        p.device for p in model_b.parameters()
    }
    if len(devices) > 1:
        raise ValueError(
            f"the models' parameters are on several devices {sorted(map(str, devices))}; "
            "move both models to one device first."
        )


def _objective(
    model_a: nn.Module,
    loss_fn: LossFn | None,
    data: object,
    objective: Objective | None,
) -> Objective | None:
    if objective is not None:
        if loss_fn is not None or data is not None:
            raise ValueError(
                "pass either obj= or loss_fn= and data=, not both; the "
                "objective already holds a loss and data."
            )
        if not isinstance(objective, Objective):
            raise TypeError(
                f"expected obj to be a lossgeom.Objective; got {type(objective).__name__}."
            )
        names = [n for n, p in model_a.named_parameters() if p.requires_grad]
        if objective.names != names or not torch.equal(
            objective.theta, _flat(model_a).to(objective.device, objective.dtype)
        ):
            raise ValueError(
                "the objective's parameters are not model_a's; build it on model_a, "
                "e.g. Objective(model_a, loss_fn, data)."
            )
        return objective
    if (loss_fn is None) != (data is None):
        raise ValueError(
            "barriers need both loss_fn= and data= (or obj=); got only "
            + ("loss_fn." if data is None else "data.")
        )
    if loss_fn is None:
        return None
    return Objective(model_a, loss_fn, data)


def _outputs(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _outputs(v)]
    return []


def _check_same_function(model_b: nn.Module, permuted: nn.Module, x: Tensor) -> None:
    reference = copy.deepcopy(model_b).eval()
    candidate = copy.deepcopy(permuted).eval()
    with torch.no_grad():
        out_b, out_p = _outputs(reference(x)), _outputs(candidate(x))
    dtype, _ = _placement(model_b)
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    for ob, op in zip(out_b, out_p, strict=True):
        if not ob.is_floating_point():
            continue
        scale = 1.0 + float(ob.abs().max()) if ob.numel() else 1.0
        if ob.numel() and float((ob - op).abs().max()) > tol * scale:
            raise RuntimeError(
                "internal error: the permuted model_b does not compute the same "
                f"function as model_b (largest output difference "
                f"{float((ob - op).abs().max()):.3g}). Please report this with the "
                "model; pass check=False to skip this test."
            )
