"""1-D and 2-D loss slices.

A slice evaluates ``L(theta + alpha d1 [+ beta d2])`` on a grid. All grid points of
a group go through one batched evaluation (``vmap`` over points, one pass over the
data), never through a model copy per point. Many random directions give a mean
and quantile bands: one random slice is an anecdote. The results and their
statistics are in :mod:`lossgeom.geometry._slice_results`; curvature along random
rays in :mod:`lossgeom.geometry._ray_curvature`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lossgeom._results import CostMeter
from lossgeom.geometry._directions import (
    PCADirections,
    orthogonalize,
    random_direction,
    random_directions,
)
from lossgeom.geometry._evaluation import evaluate_grid, second_objective
from lossgeom.geometry._slice_results import SliceResult, Surface
from lossgeom.objective import Normalization, Objective, OneDim, check_direction

__all__ = [
    "SliceResult",
    "Surface",
    "slice_1d",
    "slice_2d",
]


def _grid(values: object, name: str, obj: Objective) -> Tensor:
    if values is None:
        return torch.linspace(-1.0, 1.0, 21, dtype=obj.dtype, device=obj.device)
    t = torch.as_tensor(values, dtype=obj.dtype).to(obj.device).reshape(-1)
    if t.numel() == 0:
        raise ValueError(
            f"{name} has no points; give at least one value, e.g. "
            f"{name}=torch.linspace(-1, 1, 21)."
        )
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf values.")
    return t


def _directions(
    obj: Objective,
    direction: object,
    n: int,
    *,
    normalization: Normalization,
    one_dim: OneDim,
    seed: int,
    center: Tensor,
) -> tuple[Tensor, dict]:
    """``(n_dir, d)`` directions and a record of how they were made."""
    if isinstance(direction, str):
        dirs = random_directions(
            obj, n, direction, seed=seed, one_dim=one_dim, theta=center
        )
        return dirs, {
            "source": "random",
            "normalization": direction,
            "one_dim": one_dim if direction != "none" else "n/a",
            "seed": seed,
            "n_directions": n,
        }
    if isinstance(direction, Tensor) and direction.ndim == 2:
        rows = [check_direction(obj, r, "direction") for r in direction]
        if not rows:
            raise ValueError("direction has no rows; pass (n, d) with n >= 1.")
        return torch.stack(rows), {
            "source": "given",
            "normalization": normalization,
            "n_directions": len(rows),
        }
    return check_direction(obj, direction, "direction")[None], {
        "source": "given",
        "normalization": normalization,
        "n_directions": 1,
    }


def slice_1d(
    obj: Objective,
    direction: Tensor | Normalization = "filter",
    alphas: object = None,
    *,
    n_directions: int = 1,
    seed: int = 0,
    one_dim: OneDim = "zero",
    theta: Tensor | None = None,
    quadratic: bool = False,
    eval_data: object | None = None,
    recompute_norm: bool = False,
    chunk_size: int | None | str = "auto",
) -> SliceResult:
    """Loss along ``theta + alpha d`` for one or many directions.

    Args:
        obj: the objective; its model is never changed.
        direction: a flat vector ``(d,)``, a block ``(n, d)``, or a normalization
            (``"filter"``, ``"layer"``, ``"none"``) to draw ``n_directions``
            random directions with :func:`random_directions` (seeds ``seed``,
            ``seed + 1``, ...).
        alphas: grid (default 21 points in ``[-1, 1]``).
        n_directions: random directions to draw (string ``direction`` only).
        seed: first seed of the random directions.
        one_dim: rule for 1-D parameters (see :func:`normalize_direction`).
        theta: the centre (default ``obj.theta``).
        quadratic: also return the local quadratic model from the gradient and
            one batched Hessian-vector product per direction.
        eval_data: a second evaluation set (data, or an :class:`Objective`).
        recompute_norm: recompute BatchNorm statistics at every point (one more
            data pass per point; default off, as the slice keeps norm layers at
            the centre's statistics).
        chunk_size: points per vectorised evaluation (bounds memory); 1 for one
            at a time without vmap; "auto" (default): one at a time for models
            with convolutions on the CPU, 64 per vmap call otherwise.

    Returns:
        :class:`SliceResult`.
    """
    meter = CostMeter(obj)
    center = obj.theta if theta is None else check_direction(obj, theta, "theta")
    if isinstance(direction, str) and (
        not isinstance(n_directions, int) or n_directions < 1
    ):
        raise ValueError(f"n_directions must be an int >= 1; got {n_directions!r}.")
    grid = _grid(alphas, "alphas", obj)
    normalization = direction if isinstance(direction, str) else "given"
    dirs, record = _directions(
        obj,
        direction,
        n_directions,
        normalization=normalization,
        one_dim=one_dim,
        seed=seed,
        center=center,
    )
    n_dir, n_a = dirs.shape[0], grid.numel()
    eye = torch.eye(n_dir, dtype=obj.dtype, device=obj.device)
    coefs = (eye[:, None, :] * grid[None, :, None]).reshape(n_dir * n_a, n_dir)
    eval_obj = second_objective(obj, eval_data)
    values = evaluate_grid(
        obj,
        center,
        coefs,
        dirs,
        recompute_norm=recompute_norm,
        eval_obj=eval_obj,
        chunk_size=chunk_size,
    )
    shaped = {k: v.reshape(n_dir, n_a) for k, v in values.items()}
    quad = slope = curv = None
    if quadratic:
        # The same statistics as the slice's centre point (recomputed ones when
        # the slice recomputes them), so the model and the slice meet at 0.
        recompute = recompute_norm and obj.has_norm_statistics and obj.mode == "eval"
        with obj.using_buffers(obj.norm_statistics(center) if recompute else {}):
            loss0, g = obj.loss_and_grad(center)
            HV = obj.hvp(dirs.T.contiguous(), theta=center)
        slope = (dirs @ g).cpu()
        curv = (dirs * HV.T).sum(1).cpu()
        a = grid.cpu()
        quad = (
            loss0 + a[None, :] * slope[:, None] + 0.5 * a[None, :] ** 2 * curv[:, None]
        )
    record["norms"] = dirs.norm(dim=1).cpu().tolist()
    return SliceResult(
        alphas=grid.cpu(),
        loss=shaped["loss"],
        accuracy=shaped.get("accuracy"),
        eval_loss=shaped.get("eval_loss"),
        eval_accuracy=shaped.get("eval_accuracy"),
        quadratic=quad,
        slope=slope,
        curvature=curv,
        directions=record,
        recompute_norm=bool(
            recompute_norm and obj.has_norm_statistics and obj.mode == "eval"
        ),
        parameters={"objective": obj.info(), "n_points": n_dir * n_a},
        cost=meter.stop(),
    )


def slice_2d(
    obj: Objective,
    d1: Tensor | Normalization = "filter",
    d2: Tensor | None = None,
    alphas: object = None,
    betas: object = None,
    *,
    seed: int = 0,
    one_dim: OneDim = "zero",
    orthogonal: bool = True,
    theta: Tensor | None = None,
    trajectory: object | None = None,
    eval_data: object | None = None,
    recompute_norm: bool = False,
    chunk_size: int | None | str = "auto",
) -> Surface:
    """Loss on the plane ``theta + alpha d1 + beta d2``.

    Args:
        obj: the objective; its model is never changed.
        d1: a flat vector, or a normalization to draw both directions at random
            (seeds ``seed`` and ``seed + 1``), ``d2`` then made orthogonal to ``d1``
            filter by filter (:func:`orthogonalize`) unless ``orthogonal=False``;
            or :class:`PCADirections` (its first two directions, centred on its
            ``center``, with its trajectory drawn on top).
        d2: the second direction (required when ``d1`` is a vector).
        alphas: first grid axis (default 21 points in ``[-1, 1]``).
        betas: second grid axis (default 21 points in ``[-1, 1]``).
        seed: seed of ``d1`` (``d2`` uses ``seed + 1``).
        one_dim: rule for 1-D parameters (see :func:`normalize_direction`).
        orthogonal: orthogonalize random directions.
        theta: the centre (default ``obj.theta``).
        eval_data: a second evaluation set.
        recompute_norm: recompute BatchNorm statistics at every point.
        chunk_size: points per vectorised evaluation, 1, or "auto" (see
            :func:`slice_1d`).
        trajectory: a :class:`PCADirections` (its ``coords`` and ``residuals``
            are stored for drawing the path on top) or ``(T, 2)`` coordinates.

    Returns:
        :class:`Surface`.
    """
    meter = CostMeter(obj)
    pca = d1 if isinstance(d1, PCADirections) else None
    if pca is not None:
        d1, d2, theta, trajectory = _pca_plane(obj, pca, d2, theta, trajectory)
    center = obj.theta if theta is None else check_direction(obj, theta, "theta")
    a_grid, b_grid = _grid(alphas, "alphas", obj), _grid(betas, "betas", obj)
    u, v, record = _plane(
        obj,
        d1,
        d2,
        pca,
        seed=seed,
        one_dim=one_dim,
        orthogonal=orthogonal,
        center=center,
    )
    coefs = torch.cartesian_prod(a_grid, b_grid).reshape(-1, 2)
    eval_obj = second_objective(obj, eval_data)
    values = evaluate_grid(
        obj,
        center,
        coefs,
        torch.stack([u, v]),
        recompute_norm=recompute_norm,
        eval_obj=eval_obj,
        chunk_size=chunk_size,
    )
    shape = (a_grid.numel(), b_grid.numel())
    shaped = {k: val.reshape(shape) for k, val in values.items()}
    traj, residuals = _trajectory(trajectory)
    return Surface(
        alphas=a_grid.cpu(),
        betas=b_grid.cpu(),
        loss=shaped["loss"],
        accuracy=shaped.get("accuracy"),
        eval_loss=shaped.get("eval_loss"),
        eval_accuracy=shaped.get("eval_accuracy"),
        directions=record,
        trajectory=traj,
        trajectory_residuals=residuals,
        recompute_norm=bool(
            recompute_norm and obj.has_norm_statistics and obj.mode == "eval"
        ),
        parameters={"objective": obj.info(), "n_points": int(coefs.shape[0])},
        cost=meter.stop(),
    )


def _pca_plane(
    obj: Objective,
    pca: PCADirections,
    d2: Tensor | None,
    theta: Tensor | None,
    trajectory: object | None,
) -> tuple[Tensor, Tensor, Tensor | None, object | None]:
    """``(d1, d2, theta, trajectory)`` of the plane of ``pca``'s first two directions."""
    if pca.directions.shape[0] < 2 or d2 is not None:
        raise ValueError(
            "with PCADirections as d1, the plane is its first two directions: "
            "pass d2=None and PCADirections with k >= 2."
        )
    if theta is None:
        theta = pca.center.to(device=obj.device, dtype=obj.dtype)
    if trajectory is None:
        trajectory = pca
    d1, d2 = (pca.directions[i].to(device=obj.device, dtype=obj.dtype) for i in (0, 1))
    return d1, d2, theta, trajectory


def _plane(
    obj: Objective,
    d1: Tensor | Normalization,
    d2: Tensor | None,
    pca: PCADirections | None,
    *,
    seed: int,
    one_dim: OneDim,
    orthogonal: bool,
    center: Tensor,
) -> tuple[Tensor, Tensor, dict]:
    """The two directions of a plane and a record of how they were made."""
    if isinstance(d1, str):
        if d2 is not None:
            raise ValueError(
                "d1 is a normalization name, so both directions are drawn at random; "
                "pass d2=None, or give both as vectors."
            )
        u = random_direction(obj, d1, seed=seed, one_dim=one_dim, theta=center)
        v = random_direction(obj, d1, seed=seed + 1, one_dim=one_dim, theta=center)
        if orthogonal:
            v = orthogonalize(obj, u, v, d1)
        record = {
            "source": "random",
            "normalization": d1,
            "one_dim": one_dim if d1 != "none" else "n/a",
            "seeds": [seed, seed + 1],
            "orthogonalized": orthogonal,
        }
    else:
        if d2 is None:
            raise ValueError(
                "d2 is missing: give two direction vectors, or d1='filter' to draw "
                "both at random."
            )
        u, v = check_direction(obj, d1, "d1"), check_direction(obj, d2, "d2")
        record = {"source": "given"}
        if pca is not None:
            record = {
                "source": "pca",
                "explained_variance_ratio": pca.explained_variance_ratio[:2].tolist(),
                "centering": pca.centering,
            }
    record["norms"] = [float(u.norm()), float(v.norm())]
    record["cosine"] = float(u @ v / (u.norm() * v.norm()).clamp_min(1e-300))
    return u, v, record


def _trajectory(trajectory: object | None) -> tuple[Tensor | None, Tensor | None]:
    """``(T, 2)`` coordinates of a path to draw on a plane, and their residuals."""
    if trajectory is None:
        return None, None
    coords = getattr(trajectory, "coords", trajectory)
    coords = torch.as_tensor(coords)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ValueError(
            f"trajectory must be PCADirections or (T, 2) coordinates; got "
            f"shape {tuple(coords.shape)}."
        )
    traj = coords[:, :2].detach().cpu()
    res = getattr(trajectory, "residuals", None)
    residuals = None if res is None else torch.as_tensor(res).cpu()
    return traj, residuals
