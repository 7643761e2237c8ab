"""1-D and 2-D loss slices, their statistics, and curvature along random rays.

A slice evaluates ``L(theta + alpha d1 [+ beta d2])`` on a grid. All grid points of
a group go through one batched evaluation (``vmap`` over points, one pass over the
data), never through a model copy per point. Many random directions give a mean
and quantile bands: one random slice is an anecdote.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lossgeom.geometry._directions import (
    Normalization,
    OneDim,
    PCADirections,
    orthogonalize,
    random_direction,
    random_directions,
)
from lossgeom.geometry._evaluation import (
    check_direction,
    evaluate_points,
    second_objective,
)
from lossgeom.geometry._store import save_result, saveable
from lossgeom.objective import Objective

__all__ = [
    "RayCurvature",
    "SliceResult",
    "Surface",
    "ray_curvature",
    "slice_1d",
    "slice_2d",
]

# Grid points built at once are bounded to about this many numbers (the points
# themselves are d numbers each); the data pass inside is chunked by chunk_size.
_MAX_POINT_NUMBERS = 2**26


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


def _evaluate_grid(
    obj: Objective,
    center: Tensor,
    coefs: Tensor,
    dirs: Tensor,
    *,
    recompute_norm: bool,
    eval_obj: Objective | None,
    chunk_size: int | None | str,
) -> dict[str, Tensor]:
    """Metrics at ``center + coefs @ dirs`` for every row of ``coefs`` ``(m, k)``."""
    per_group = max(1, _MAX_POINT_NUMBERS // obj.dim)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, coefs.shape[0], per_group):
        c = coefs[start : start + per_group]
        points = torch.addmm(center.expand(c.shape[0], -1), c, dirs)
        values = evaluate_points(
            obj,
            points,
            recompute_norm=recompute_norm,
            eval_obj=eval_obj,
            chunk_size=chunk_size,
        )
        for k, v in values.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v).cpu() for k, v in parts.items()}


def _tv(y: Tensor, dim: int) -> Tensor:
    return y.diff(dim=dim).abs().sum(dim)


def _step(x: Tensor) -> float:
    """The spacing of a uniform grid (positive); ``ValueError`` if not uniform."""
    if x.numel() < 2:
        return 1.0
    gaps = x.double().diff().abs()
    h = float(gaps.mean())
    if float((gaps - h).abs().max()) > 1e-6 * max(h, 1e-300):
        raise ValueError(
            "slice statistics need an evenly spaced grid (e.g. torch.linspace); "
            f"got spacings from {float(gaps.min()):.3g} to {float(gaps.max()):.3g}."
        )
    return h


def _second_energy(y: Tensor, x: Tensor, dim: int) -> Tensor:
    """``sum (second difference / h^2)^2 h``: a discrete integral of ``L''^2``."""
    h = _step(x)
    d2 = y.diff(n=2, dim=dim) / h**2
    return (d2 * d2).sum(dim) * h


@saveable
@dataclass(frozen=True)
class SliceResult:
    """A 1-D slice ``L(theta + alpha d)`` along one or more directions.

    Attributes:
        alphas: grid ``(n_alpha,)``, in units of the direction.
        loss: ``(n_dir, n_alpha)`` loss on the objective's data.
        accuracy: ``(n_dir, n_alpha)`` (classification only).
        eval_loss, eval_accuracy: the same on the second evaluation set.
        quadratic: ``(n_dir, n_alpha)`` local quadratic model
            ``L + alpha g.d + alpha^2 d.Hd / 2`` when asked for.
        slope, curvature: ``g.d`` and ``d.Hd`` per direction (with ``quadratic``).
        directions: how the directions were made (normalization, seed, ...).
        recompute_norm: whether BatchNorm statistics were recomputed per point.
        seconds: wall time; ``info``: objective and cost.
    """

    alphas: Tensor
    loss: Tensor
    accuracy: Tensor | None = None
    eval_loss: Tensor | None = None
    eval_accuracy: Tensor | None = None
    quadratic: Tensor | None = None
    slope: Tensor | None = None
    curvature: Tensor | None = None
    directions: dict = field(default_factory=dict)
    recompute_norm: bool = False
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def mean(self) -> Tensor:
        """Mean loss over directions at each alpha, ``(n_alpha,)``."""
        return self.loss.mean(0)

    def band(self, lower: float = 0.1, upper: float = 0.9) -> tuple[Tensor, Tensor]:
        """Quantile band of the loss over directions at each alpha."""
        q = torch.tensor([lower, upper], dtype=self.loss.dtype)
        lo, hi = torch.quantile(self.loss, q, dim=0)
        return lo, hi

    def statistics(self) -> dict[str, float]:
        """Ruggedness of the slices (means over directions, with standard errors).

        - ``total_variation``: ``sum |L(a_{i+1}) - L(a_i)|`` along a slice;
        - ``excess_variation``: total variation minus the rise from the minimum to
          the two ends (0 for a slice that falls then rises once; grows with every
          extra bump);
        - ``second_difference_energy``: ``sum (Delta^2 L / h^2)^2 h`` (a discrete
          integral of ``L''^2``);
        - ``slice_variance``: variance of the loss across directions, averaged
          over the grid (how much the picture depends on the direction drawn).
        """
        loss = self.loss.double()
        tv = _tv(loss, 1)
        rise = (loss[:, 0] - loss.min(1).values) + (loss[:, -1] - loss.min(1).values)
        excess = tv - rise
        energy = _second_energy(loss, self.alphas.double(), 1)
        n = loss.shape[0]

        def se(x: Tensor) -> float:
            return float(x.std() / math.sqrt(n)) if n > 1 else math.nan

        return {
            "total_variation": float(tv.mean()),
            "total_variation_stderr": se(tv),
            "excess_variation": float(excess.mean()),
            "excess_variation_stderr": se(excess),
            "second_difference_energy": float(energy.mean()),
            "second_difference_energy_stderr": se(energy),
            "slice_variance": float(loss.var(0).mean()) if n > 1 else math.nan,
            "n_directions": n,
        }

    def save(self, path) -> object:
        """Write to the folder ``path`` (safetensors + JSON)."""
        return save_result(self, path)


@saveable
@dataclass(frozen=True)
class Surface:
    """A 2-D slice ``L(theta + alpha d1 + beta d2)`` on a grid.

    Attributes:
        alphas, betas: the grid axes.
        loss: ``(n_alpha, n_beta)``; ``loss[i, j]`` is at ``(alphas[i], betas[j])``.
        accuracy, eval_loss, eval_accuracy: as for :class:`SliceResult`.
        directions: how ``d1`` and ``d2`` were made, their norms and cosine.
        trajectory: optional ``(T, 2)`` coordinates of a path to draw on top
            (e.g. :class:`PCADirections` ``coords``), with ``trajectory_residuals``.
    """

    alphas: Tensor
    betas: Tensor
    loss: Tensor
    accuracy: Tensor | None = None
    eval_loss: Tensor | None = None
    eval_accuracy: Tensor | None = None
    directions: dict = field(default_factory=dict)
    trajectory: Tensor | None = None
    trajectory_residuals: Tensor | None = None
    recompute_norm: bool = False
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def statistics(self) -> dict[str, float]:
        """Ruggedness of the surface.

        Total variation along each axis (mean per line) and the discrete integral
        of the squared Laplacian.
        """
        loss = self.loss.double()
        a, b = self.alphas.double(), self.betas.double()
        ha, hb = _step(a), _step(b)
        out = {
            "total_variation_alpha": float(_tv(loss, 0).mean()),
            "total_variation_beta": float(_tv(loss, 1).mean()),
        }
        if min(loss.shape) >= 3:
            lap = loss[2:, 1:-1] - 2 * loss[1:-1, 1:-1] + loss[:-2, 1:-1]
            lap = lap / ha**2
            lap = (
                lap + (loss[1:-1, 2:] - 2 * loss[1:-1, 1:-1] + loss[1:-1, :-2]) / hb**2
            )
            out["laplacian_energy"] = float((lap * lap).sum() * ha * hb)
        return out

    def save(self, path) -> object:
        """Write to the folder ``path`` (safetensors + JSON)."""
        return save_result(self, path)


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
    started = time.perf_counter()
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
    values = _evaluate_grid(
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
        seconds=time.perf_counter() - started,
        info={"objective": obj.info(), "n_points": n_dir * n_a},
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
    started = time.perf_counter()
    pca = d1 if isinstance(d1, PCADirections) else None
    if pca is not None:
        if pca.directions.shape[0] < 2 or d2 is not None:
            raise ValueError(
                "with PCADirections as d1, the plane is its first two directions: "
                "pass d2=None and PCADirections with k >= 2."
            )
        if theta is None:
            theta = pca.center.to(device=obj.device, dtype=obj.dtype)
        if trajectory is None:
            trajectory = pca
        d1, d2 = (
            pca.directions[i].to(device=obj.device, dtype=obj.dtype) for i in (0, 1)
        )
    center = obj.theta if theta is None else check_direction(obj, theta, "theta")
    a_grid, b_grid = _grid(alphas, "alphas", obj), _grid(betas, "betas", obj)
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
    coefs = torch.cartesian_prod(a_grid, b_grid).reshape(-1, 2)
    eval_obj = second_objective(obj, eval_data)
    values = _evaluate_grid(
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
    traj = residuals = None
    if trajectory is not None:
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
        seconds=time.perf_counter() - started,
        info={"objective": obj.info(), "n_points": int(coefs.shape[0])},
    )


@saveable
@dataclass(frozen=True)
class RayCurvature:
    """Second derivatives of the loss along random rays, by finite differences.

    ``fd[i] = (L(theta + h d_i) - 2 L(theta) + L(theta - h d_i)) / h^2`` estimates
    ``d_i . H d_i``; with ``exact`` the Hessian-vector products give the exact
    values to compare with (the difference is the finite-difference error, of
    order ``h^2`` times the fourth derivative, plus rounding ``eps L / h^2``).
    On ReLU networks the two measure different things: a finite step crosses
    kinks whose curvature the Hessian (which sees ReLU as piecewise linear) does
    not contain, so ``relative_difference`` is then not small at any step.

    Attributes:
        fd: finite-difference curvatures ``(n_rays,)``.
        exact: ``d.Hd`` per ray (``None`` when not asked).
        mean, std, stderr: of ``fd`` over rays.
        negative_fraction: fraction of rays with ``fd < 0``.
        relative_difference: ``max |fd - exact| / mean |exact|`` (``None``
            without ``exact``).
        step: ``h``.
        directions: how the rays were drawn.
    """

    fd: Tensor
    exact: Tensor | None
    mean: float
    std: float
    stderr: float
    negative_fraction: float
    step: float
    relative_difference: float | None = None
    directions: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def save(self, path) -> object:
        """Write to the folder ``path`` (safetensors + JSON)."""
        return save_result(self, path)


def ray_curvature(
    obj: Objective,
    n_rays: int = 64,
    *,
    normalization: Normalization = "filter",
    step: float = 1e-2,
    seed: int = 0,
    one_dim: OneDim = "zero",
    theta: Tensor | None = None,
    exact: bool = True,
    chunk_size: int | None | str = "auto",
) -> RayCurvature:
    """Monte Carlo curvature along random rays, cross-checked against ``d.Hd``.

    All ``2 n_rays + 1`` points go through one batched evaluation; with ``exact``
    the rays' Hessian products go through one batched HVP.

    Args:
        obj: the objective.
        n_rays: number of random directions.
        normalization: normalization of the rays (:func:`random_directions`).
        seed: first seed of the rays.
        one_dim: rule for 1-D parameters.
        step: finite-difference step ``h`` in units of the direction.
        theta: where (default ``obj.theta``).
        exact: also compute ``d.Hd`` exactly.
        chunk_size: points per vectorised evaluation, 1, or "auto" (see
            :func:`slice_1d`).
    """
    if not isinstance(n_rays, int) or n_rays < 1:
        raise ValueError(f"n_rays must be an int >= 1; got {n_rays!r}.")
    if not step > 0:
        raise ValueError(f"step must be > 0; got {step!r}.")
    started = time.perf_counter()
    center = obj.theta if theta is None else check_direction(obj, theta, "theta")
    dirs = random_directions(
        obj, n_rays, normalization, seed=seed, one_dim=one_dim, theta=center
    )
    eye = torch.eye(n_rays, dtype=obj.dtype, device=obj.device)
    coefs = torch.cat([step * eye, -step * eye, eye[:1] * 0])
    values = _evaluate_grid(
        obj,
        center,
        coefs,
        dirs,
        recompute_norm=False,
        eval_obj=None,
        chunk_size=chunk_size,
    )["loss"].double()
    plus, minus, mid = values[:n_rays], values[n_rays : 2 * n_rays], values[-1]
    fd = (plus - 2 * mid + minus) / step**2
    ex = None
    if exact:
        HV = obj.hvp(dirs.T.contiguous(), theta=center)
        ex = (dirs * HV.T).sum(1).double().cpu()
    std = float(fd.std()) if n_rays > 1 else math.nan
    return RayCurvature(
        fd=fd,
        exact=ex,
        mean=float(fd.mean()),
        std=std,
        stderr=std / math.sqrt(n_rays) if n_rays > 1 else math.nan,
        negative_fraction=float((fd < 0).double().mean()),
        step=float(step),
        relative_difference=(
            None
            if ex is None
            else float((fd - ex).abs().max() / ex.abs().mean().clamp_min(1e-300))
        ),
        directions={"normalization": normalization, "one_dim": one_dim, "seed": seed},
        info={"objective": obj.info(), "seconds": time.perf_counter() - started},
    )
