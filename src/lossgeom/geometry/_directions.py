"""Directions in parameter space: random, and PCA of a trajectory.

Random directions are filter-, layer- or un-normalized
(:func:`~lossgeom.objective.normalize_direction`, which holds the parameter
layout rules). Hessian eigenvectors as directions come from
:func:`lossgeom.hessian_directions`; everything here that takes a direction
takes them like any other flat vector.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lossgeom._results import Result
from lossgeom.objective import (
    Normalization,
    Objective,
    OneDim,
    check_direction,
    check_normalization,
    filter_view,
    normalize_direction,
)

__all__ = [
    "PCADirections",
    "orthogonalize",
    "pca_directions",
    "random_direction",
    "random_directions",
]


def random_direction(
    obj: Objective,
    normalization: Normalization = "filter",
    *,
    seed: int = 0,
    one_dim: OneDim = "zero",
    theta: Tensor | None = None,
) -> Tensor:
    """A Gaussian direction ``N(0, I)``, then normalized (see :func:`normalize_direction`).

    Seeded (a private generator on the CPU, so the same seed gives the same
    direction on every device); device and dtype come from the objective.

    Example:
        >>> import torch, lossgeom as lg
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                             torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> obj = lg.Objective(model, torch.nn.CrossEntropyLoss(), (X, y))
        >>> d = lg.random_direction(obj, "filter", seed=1)
        >>> w = model[0].weight
        >>> torch.allclose(obj.unflatten(d)["0.weight"].norm(dim=1), w.norm(dim=1))
        True
        >>> bool((obj.unflatten(d)["0.bias"] == 0).all())  # 1-D: zero by default
        True
    """
    gen = torch.Generator().manual_seed(int(seed))
    raw = torch.randn(obj.dim, generator=gen, dtype=torch.float64)
    raw = raw.to(device=obj.device, dtype=obj.dtype)
    return normalize_direction(obj, raw, normalization, one_dim=one_dim, theta=theta)


def random_directions(
    obj: Objective,
    n: int,
    normalization: Normalization = "filter",
    *,
    seed: int = 0,
    one_dim: OneDim = "zero",
    theta: Tensor | None = None,
) -> Tensor:
    """``n`` independent directions, ``(n, d)``; direction ``i`` uses seed ``seed + i``."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1; got {n!r}.")
    return torch.stack(
        [
            random_direction(
                obj, normalization, seed=seed + i, one_dim=one_dim, theta=theta
            )
            for i in range(n)
        ]
    )


def orthogonalize(
    obj: Objective,
    d1: Tensor,
    d2: Tensor,
    normalization: Normalization = "filter",
) -> Tensor:
    """``d2`` made orthogonal to ``d1``, keeping its normalization where possible.

    Gram-Schmidt is done block by block (each filter for ``"filter"``, each tensor
    for ``"layer"``, the whole vector for ``"none"``) and each block is rescaled to
    its norm before: blocks are disjoint, so the result is orthogonal to ``d1`` as
    a whole and every filter keeps the norm normalization gave it. A filter that
    cannot be both (a one-entry filter, e.g. a ``Linear(1, h)`` row, is always
    parallel to ``d1``'s) makes its whole tensor fall back to one Gram-Schmidt
    step at tensor level (the tensor keeps its norm, its filters do not); if the
    pair is still not orthogonal (whole tensors parallel), a last global step
    makes it so. The result is orthogonal to ``d1`` to rounding in every case;
    a ``d2`` parallel to ``d1`` as a whole is an error.

    Returns:
        The new ``d2``.
    """
    check_normalization(normalization)
    a = check_direction(obj, d1, "d1")
    b = check_direction(obj, d2, "d2").clone()
    tiny = torch.finfo(a.dtype).tiny
    cutoff = 1e3 * torch.finfo(a.dtype).eps
    n_given = float(b.norm())

    def project_out(pv: Tensor, rv: Tensor) -> Tensor:
        """Rows of ``pv`` minus their projection on ``rv``'s rows, rescaled; or NaN."""
        norm0 = pv.norm(dim=1, keepdim=True)
        rr = (rv * rv).sum(1, keepdim=True)
        proj = (pv * rv).sum(1, keepdim=True) / rr.clamp_min(tiny)
        new = pv - proj * rv
        new_norm = new.norm(dim=1, keepdim=True)
        ok = (new_norm > cutoff * norm0) | (norm0 == 0)
        out = new * (norm0 / new_norm.clamp_min(tiny))
        return torch.where(ok, out, torch.full_like(out, math.nan))

    if normalization != "none":
        pa = obj.unflatten(a)
        for name, piece in obj.unflatten(b).items():
            ref = pa[name]
            if normalization == "layer" or piece.ndim <= 1:
                pv, rv = piece.reshape(1, -1), ref.reshape(1, -1)
            else:
                pv, rv = filter_view(piece), filter_view(ref)
            out = project_out(pv, rv)
            if bool(torch.isnan(out).any()):  # fall back to the whole tensor
                out = project_out(piece.reshape(1, -1), ref.reshape(1, -1))
                out = torch.nan_to_num(out, nan=0.0).reshape(pv.shape)
            pv.copy_(out)
    cos = float(a @ b) / max(float(a.norm() * b.norm()), tiny)
    if abs(cos) > cutoff or float(b.norm()) <= cutoff * n_given:
        n0 = max(float(b.norm()), n_given)
        b -= (b @ a) / (a @ a).clamp_min(tiny) * a
        if float(b.norm()) <= cutoff * n0:
            raise ValueError(
                "d2 is parallel to d1, so no direction orthogonal to d1 can be made "
                "from it; draw another one (e.g. another seed)."
            )
        b *= n0 / b.norm().clamp_min(tiny)
    return b


@dataclass(frozen=True)
class PCADirections(Result):
    """Principal directions of a trajectory of parameter vectors.

    Attributes:
        directions: ``(k, d)`` orthonormal principal directions.
        explained_variance_ratio: fraction of the trajectory's variance (about
            ``center``) each direction explains, ``(k,)``.
        coords: each checkpoint's coordinates in the plane, ``(T, k)``.
        residuals: each checkpoint's distance from the plane (off-plane part),
            ``(T,)``: a path drawn in the plane hides this much.
        center: the point the plane passes through, ``(d,)``.
        centering: ``"final"`` (the last checkpoint, as Li et al. 2018) or ``"mean"``.
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`.
    """

    directions: Tensor
    explained_variance_ratio: Tensor
    coords: Tensor
    residuals: Tensor
    center: Tensor
    centering: str
    definition: str = field(
        default="principal directions of the checkpoints theta_t - center (SVD), "
        "the plane of a trajectory's largest variance (Li et al. 2018)",
        kw_only=True,
    )

    def scalars(self) -> dict[str, float]:
        """Variance share of the plane (``value``) and the largest off-plane distance."""
        return {
            "value": float(self.explained_variance_ratio.sum()),
            "max_residual": float(self.residuals.max()),
        }


def _trajectory(obj: Objective, thetas: object) -> Tensor:
    if isinstance(thetas, Tensor):
        traj = thetas
    elif isinstance(thetas, Sequence) and thetas:
        rows = []
        for t in thetas:
            if isinstance(t, dict):
                missing = [n for n in obj.names if n not in t]
                if missing:
                    raise ValueError(
                        f"a checkpoint lacks parameters {missing[:3]}; expected "
                        f"state dicts with the objective's names {obj.names[:3]}..."
                    )
                t = obj.flatten({n: t[n] for n in obj.names})
            rows.append(t)
        traj = torch.stack([r.reshape(-1) for r in rows])
    else:
        raise ValueError(
            "expected thetas as a (T, d) tensor, or a non-empty list of flat vectors "
            f"or state dicts; got {type(thetas).__name__}."
        )
    if traj.ndim != 2 or traj.shape[1] != obj.dim or traj.shape[0] < 2:
        raise ValueError(
            f"expected at least 2 checkpoints of {obj.dim} parameters, shape (T, "
            f"{obj.dim}); got {tuple(traj.shape)}."
        )
    return traj.detach().to(device=obj.device, dtype=obj.dtype)


def pca_directions(
    obj: Objective,
    thetas: object,
    k: int = 2,
    *,
    center: Literal["final", "mean"] = "final",
) -> PCADirections:
    """Principal directions of a training trajectory (checkpoints) and their fit.

    Following Li et al. 2018, the checkpoints minus the final point are
    decomposed by SVD; ``center="mean"`` uses the usual mean-centred PCA. The
    result says how much variance the plane explains and how far each checkpoint
    lies off it, so a trajectory drawn in the plane never pretends to lie in it.

    Args:
        obj: the objective (parameter layout, device, dtype).
        thetas: ``(T, d)`` tensor, or a list of flat vectors or state dicts.
        k: number of directions.
        center: ``"final"`` or ``"mean"``.
    """
    if center not in ("final", "mean"):
        raise ValueError(f"center must be one of ('final', 'mean'); got {center!r}.")
    traj = _trajectory(obj, thetas)
    limit = min(traj.shape[0] - 1, obj.dim)
    if not isinstance(k, int) or not 1 <= k <= limit:
        raise ValueError(
            f"k must be an int between 1 and the number of independent checkpoint "
            f"differences ({limit}); got {k!r}."
        )
    origin = traj[-1] if center == "final" else traj.mean(0)
    M = traj - origin
    _, S, Vh = torch.linalg.svd(M, full_matrices=False)
    total = (S * S).sum().clamp_min(torch.finfo(S.dtype).tiny)
    dirs = Vh[:k]
    coords = M @ dirs.T
    residuals = (M - coords @ dirs).norm(dim=1)
    return PCADirections(
        directions=dirs.cpu(),
        explained_variance_ratio=((S[:k] ** 2) / total).cpu(),
        coords=coords.cpu(),
        residuals=residuals.cpu(),
        center=origin.cpu(),
        centering=center,
        parameters={"n_checkpoints": int(traj.shape[0]), "k": k},
    )
