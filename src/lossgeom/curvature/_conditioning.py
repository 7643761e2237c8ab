"""The ends of the spectrum compared: condition numbers and outlying eigenvalues."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from lossgeom._results import Cost, Result
from lossgeom.curvature._estimates import eigenvalues
from lossgeom.curvature._spectral import SpectralEstimate, as_operator
from lossgeom.linalg import SymmetricOperator
from lossgeom.linalg.lanczos import lanczos
from lossgeom.objective import Objective

__all__ = ["OutlierResult", "condition_number", "outliers"]


def condition_number(
    obj: SymmetricOperator | Objective,
    *,
    shift: float = 0.0,
    positive_part: bool = False,
    threshold: float = 1e-3,
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    seed: int = 0,
) -> SpectralEstimate:
    """Condition number from both ends by Lanczos, or of the positive part.

    Default: ``lambda_max / lambda_min`` of ``A + shift I``, ``inf`` (with the
    smallest eigenvalue in ``details``) when ``A + shift I`` is not positive definite.

    ``positive_part=True``: ``lambda_max / lambda_+`` where ``lambda_+`` is the
    smallest eigenvalue of ``A + shift I`` at or above ``threshold * lambda_max``
    (a trained network's Hessian is indefinite with many eigenvalues near 0, so
    "smallest positive" needs a threshold; the value depends on it, and
    ``parameters`` records it). ``lambda_+`` is interior. When the budget covers
    ``d`` products (and ``d <= 4096``), the whole matrix is formed and its
    spectrum decides ``lambda_+`` exactly (``details["search"] == "dense"``).
    Otherwise it is found by Lanczos on the folded operator ``(A - tau I)^2``
    (``tau`` the threshold), whose smallest eigenvalues belong to the eigenvalues
    of ``A`` nearest ``tau``; Rayleigh-Ritz with ``A`` on those vectors separates
    eigenvalues mirrored about ``tau``. The folded spectrum is squared, so on a
    dense cluster at ``tau`` it converges slowly and may not within
    ``max_matvecs``: then ``converged`` is ``False``.

    The error is a deterministic ``bound`` (``stderr`` is ``nan``). When
    ``converged``, ``lambda_+`` is certified within its residual norm. When not,
    the Ritz value found proves only *an* eigenvalue near it, and a smaller one
    above ``tau`` may have been missed, so ``bound`` covers everything down to
    ``lambda_+ = tau`` (the ratio ``1 / threshold``): wide, but true.

    Args:
        obj: an operator, or an Objective (meaning its Hessian).
        shift: added to every eigenvalue.
        positive_part: condition number of the part above ``threshold``.
        threshold: relative to ``lambda_max`` (``positive_part`` only), in (0, 1).
        tol: relative residual tolerance of the eigenvalues.
        max_matvecs: budget of products for the interior search (default
            ``min(4000, 20 dim)``).
        seed: seed of the start vectors.

    Returns:
        A :class:`SpectralEstimate`.
    """
    operator = as_operator(obj)
    if positive_part:
        return _positive_condition(operator, shift, threshold, tol, max_matvecs, seed)
    res = eigenvalues(operator, 1, which="both", tol=tol, seed=seed)
    hi, lo = float(res.values[0]) + shift, float(res.values[-1]) + shift
    common = {
        "converged": res.all_converged,
        "parameters": {"shift": shift, "tol": tol, "seed": seed},
        "details": {"lambda_max": hi, "lambda_min": lo},
        "cost": res.cost,
    }
    if lo <= 0:
        return SpectralEstimate(
            value=math.inf,
            definition="lambda_max / lambda_min (not positive definite)",
            **common,
        )
    r_hi, r_lo = float(res.residuals[0]), float(res.residuals[-1])
    value = hi / lo
    err = value * math.sqrt((r_hi / hi) ** 2 + (r_lo / lo) ** 2)
    return SpectralEstimate(
        value=value,
        bound=err,
        definition=f"lambda_max / lambda_min of A + {shift:g} I",
        **common,
    )


# Largest dimension for which the whole matrix is formed when the budget allows.
_DENSE_MAX_DIM = 4096


class _Folded(SymmetricOperator):
    """``(A - tau I)^2``, counting products of ``A``."""

    def __init__(self, obj: SymmetricOperator, tau: float):
        super().__init__(obj.shape[0], obj.dtype, obj.device)
        self.obj, self.tau, self.n_products = obj, tau, 0

    def _matmat(self, V: Tensor) -> Tensor:
        W = self.obj @ V - self.tau * V
        self.n_products += 2 * V.shape[1]
        return self.obj @ W - self.tau * W


def _dense_search(op: SymmetricOperator, tau: float) -> dict:
    """``lambda_+`` from the whole matrix (``d`` products): exact to rounding.

    The residual is the rounding of the products, measured by the matrix's
    asymmetry, plus ``sqrt(d) eps ||A||`` for the eigendecomposition.
    """
    M = op.to_dense(max_dim=_DENSE_MAX_DIM).double()
    asym = float(torch.linalg.matrix_norm(M - M.T)) / 2
    ev = torch.linalg.eigvalsh((M + M.T) / 2)
    eps = torch.finfo(op.dtype).eps
    resid = asym + math.sqrt(op.shape[0]) * eps * float(ev.abs().max())
    above = ev[ev >= tau]
    theta = float(above[0]) if above.numel() else math.nan
    return {
        "theta": theta,
        "resid": resid,
        "certified": above.numel() > 0,
        "products": op.shape[0],
        "method": "dense",
    }


def _folded_search(
    op: SymmetricOperator, tau: float, hi: float, tol: float, budget: int, seed: int
) -> dict:
    """``lambda_+`` by Lanczos on ``(A - tau I)^2`` and Rayleigh-Ritz with ``A``.

    ``certified`` when the folded Ritz pairs converged, the pair found above
    ``tau`` has a residual within ``tol |lambda_max|`` and lies further above
    ``tau`` than its residual (so the eigenvalue it proves is at or above ``tau``).
    """
    dim = op.shape[0]
    folded = _Folded(op, tau)
    # A Krylov space sees every distinct eigenvalue, so further copies of a
    # repeated one (a null space) need not be found: no verification search.
    k, theta_plus, resid, certified = 8, math.nan, math.nan, False
    while True:
        k = min(k, dim)
        remaining = max((budget - folded.n_products) // 2, 2 * k + 2)
        # The folded spectrum is squared and crowded at its small end: a
        # restarted Lanczos with a short basis barely moves, so keep a long one.
        res = lanczos(
            folded,
            k,
            which="smallest",
            seed=seed,
            tol=max(tol**2, 100 * torch.finfo(op.dtype).eps),
            max_matvecs=remaining,
            ncv=min(dim, max(4 * k, 150)),
            explicit_residuals=False,
            verify=False,
        )
        # Rayleigh-Ritz with A on the folded eigenvectors (in float64 at least).
        work = torch.promote_types(op.dtype, torch.float64)
        Q, _ = torch.linalg.qr(res.vectors.to(work))
        AQ = (op @ Q.to(op.dtype)).to(work)
        folded.n_products += Q.shape[1]
        theta, S = torch.linalg.eigh(Q.T @ AQ)
        R = AQ @ S - (Q @ S) * theta
        above = (theta >= tau).nonzero().flatten()
        if above.numel():
            i = int(above[0])
            theta_plus, resid = float(theta[i]), float(R[:, i].norm())
            certified = (
                res.all_converged
                and resid <= tol * abs(hi)
                and theta_plus - resid >= tau
            )
            break
        if k >= dim or folded.n_products >= budget:
            break
        k *= 2
    return {
        "theta": theta_plus,
        "resid": resid,
        "certified": certified,
        "products": folded.n_products,
        "method": "folded Lanczos",
        "folded_k": k,
    }


def _positive_condition(
    op: SymmetricOperator,
    shift: float,
    threshold: float,
    tol: float,
    max_matvecs: int | None,
    seed: int,
) -> SpectralEstimate:
    if not 0 < threshold < 1:
        raise ValueError(
            f"threshold must be in (0, 1) (a fraction of lambda_max); got {threshold}."
        )
    start = time.perf_counter()
    dim = op.shape[0]
    budget = min(4000, 20 * dim) if max_matvecs is None else max_matvecs
    top = eigenvalues(op, 1, which="largest", tol=tol, seed=seed)
    hi = float(top.values[0]) + shift
    r_hi = float(top.residuals[0])
    parameters = {"threshold": threshold, "shift": shift, "tol": tol, "seed": seed}
    if hi <= 0:
        return SpectralEstimate(
            value=math.nan,
            converged=bool(top.converged[0]),
            definition="no positive part (lambda_max <= 0)",
            parameters=parameters,
            details={"lambda_max": hi},
            cost=top.cost,
        )
    tau = threshold * hi - shift  # in A's own eigenvalues
    if dim <= min(budget, _DENSE_MAX_DIM):
        found = _dense_search(op, tau)
    else:
        found = _folded_search(op, tau, hi, tol, budget, seed)
    lam_plus, resid = found["theta"] + shift, found["resid"]
    converged = found["certified"] and bool(top.converged[0])
    details = {
        "lambda_max": hi,
        "lambda_plus": lam_plus,
        "lambda_plus_residual": resid,
        "search": found["method"],
    }
    if "folded_k" in found:
        details["folded_k"] = found["folded_k"]
    common = {
        "converged": converged,
        "definition": (
            f"lambda_max / lambda_+ (smallest eigenvalue >= {threshold:g} "
            f"lambda_max) of A + {shift:g} I"
        ),
        "parameters": parameters,
        "details": details,
        "cost": Cost(
            matvecs=top.cost.matvecs + found["products"],
            seconds=time.perf_counter() - start,
        ),
    }
    if math.isnan(lam_plus):
        return SpectralEstimate(value=math.nan, **common)
    value = hi / lam_plus
    return SpectralEstimate(
        value=value,
        bound=_ratio_bound(value, hi, r_hi, lam_plus, resid, threshold, converged),
        **common,
    )


def _ratio_bound(
    value: float,
    hi: float,
    r_hi: float,
    lam_plus: float,
    resid: float,
    threshold: float,
    certified: bool,
) -> float:
    """How far ``lambda_max / lambda_+`` can be from ``value``.

    ``hi`` is a Ritz value, so ``hi <= lambda_max <= hi + r_hi``, and by
    definition ``lambda_+ >= threshold lambda_max >= threshold hi``. A certified
    ``lambda_+`` lies within ``resid`` of ``lam_plus``. Otherwise the Ritz pair
    only proves an eigenvalue within ``resid`` of ``lam_plus``: when that one is
    above the threshold it bounds ``lambda_+`` from above, else ``lambda_max``
    does; a smaller one may have been missed, down to the threshold.
    """
    floor = threshold * hi
    if certified:
        low, high = max(lam_plus - resid, floor), lam_plus + resid
    else:
        low = floor
        high = lam_plus + resid if lam_plus - resid >= floor else hi + r_hi
    kappa_max = (hi + r_hi) / max(low, 1e-300)
    kappa_min = hi / high
    return max(kappa_max - value, value - kappa_min, 0.0)


@dataclass(frozen=True)
class OutlierResult(Result):
    """Eigenvalues that stand apart from the bulk of the spectrum.

    Attributes:
        values: the outliers (descending).
        bulk_edge: the largest eigenvalue of the bulk (the first after the outliers).
        n_outliers: ``len(values)``.
        gaps: gaps between consecutive top eigenvalues.
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`; ``definition`` states the rule used.
    """

    values: Tensor
    bulk_edge: float
    n_outliers: int
    gaps: Tensor

    def scalars(self) -> dict[str, float]:
        """The number of outliers (``value``), their size and the bulk edge.

        ``largest`` is the top eigenvalue (the first outlier, or the bulk edge
        when there is none), ``mass`` the sum of the outliers (0 for none) and
        ``bulk_edge`` the largest eigenvalue of the bulk.
        """
        top = self.values[0] if self.n_outliers else self.bulk_edge
        return {
            "value": float(self.n_outliers),
            "largest": float(top),
            "mass": float(self.values.sum()),
            "bulk_edge": float(self.bulk_edge),
        }


def outliers(
    obj: SymmetricOperator | Objective,
    *,
    max_k: int = 20,
    gap_factor: float = 5.0,
    tol: float = 1e-6,
    seed: int = 0,
) -> OutlierResult:
    """Top eigenvalues separated from the bulk (e.g. class outliers, Papyan 2020).

    The top ``max_k`` eigenvalues are found by Lanczos; the outliers are the
    leading ones for which every gap down to the next eigenvalue exceeds
    ``gap_factor`` times the median gap among the top ``max_k``. A heuristic: near a
    bulk edge eigenvalues crowd together, outliers do not.

    Args:
        obj: an operator, or an Objective (meaning its Hessian).
        max_k: eigenvalues examined.
        gap_factor: how much larger than typical an outlier's gap must be.
        tol: relative residual tolerance of the eigenvalues.
        seed: seed of the start vectors.

    Returns:
        An :class:`OutlierResult`.
    """
    k = min(max_k, as_operator(obj).shape[0])
    res = eigenvalues(obj, k, tol=tol, seed=seed)
    vals = res.values
    gaps = vals[:-1] - vals[1:]
    typical = gaps.median() if gaps.numel() else vals.new_tensor(0.0)
    n = 0
    while n < gaps.numel() and bool(gaps[n] > gap_factor * typical):
        n += 1
    return OutlierResult(
        values=vals[:n],
        bulk_edge=float(vals[n]) if n < vals.numel() else float("nan"),
        n_outliers=n,
        gaps=gaps,
        definition=f"leading eigenvalues whose gap to the next exceeds {gap_factor:g} x the median gap of the top {k}",
        parameters={"max_k": max_k, "gap_factor": gap_factor, "tol": tol, "seed": seed},
        cost=res.cost,
    )
