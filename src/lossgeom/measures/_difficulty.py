r"""How gradient noise meets curvature; the difficulty index; the one-step model.

With :math:`\Sigma` the centred per-sample gradient covariance
(:mod:`lossgeom.measures._noise`) and :math:`H` the Hessian of the mean loss:

* :func:`noise_alignment`: principal angles between the top-``k`` eigenspaces of
  :math:`\Sigma` and :math:`H`, and
  :math:`\kappa = \|U_\Sigma^T U_H\|_F^2 / k \in [0, 1]`, the mean squared cosine.
* :func:`gradient_fraction`: :math:`\|P_k g\|^2 / \|g\|^2`, the share of the
  gradient in the top-``k`` Hessian eigenspace (Gur-Ari, Roberts & Dyer 2018,
  "Gradient Descent Happens in a Tiny Subspace").
* :func:`difficulty_index`:
  :math:`D = \lambda_\max(H)^2 / \operatorname{tr} H \cdot \kappa(\Sigma, H)`.
* :func:`quadratic_prediction`: the one-step quadratic model
  :math:`\Delta L \approx -\eta\, v\cdot g + \tfrac12 \eta^2\, v\cdot Hv` of a
  step :math:`\theta \to \theta - \eta v` against the actual change.

Subspace errors use the Davis-Kahan :math:`\sin\Theta` bound on the Ritz vectors:
:math:`\|\sin\Theta\|_F \le \|R\|_F / \delta`, with :math:`R` the residuals of the
``k`` Ritz pairs and :math:`\delta = \theta_k - \theta_{k+1} - r_{k+1}` the gap
to the next Ritz value (which is why ``k + 1`` eigenpairs are computed); no finite
bound is claimed unless those ``k + 1`` pairs converged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lossgeom._results import Cost, Result, timed
from lossgeom.curvature import eigenvalues, gradient_covariance, hessian, trace
from lossgeom.linalg import EigenResult, SymmetricOperator
from lossgeom.measures._noise import (
    SIGMA,
    _check_k,
    _check_objective,
    _require_per_sample,
    _sigma_limit,
)
from lossgeom.objective import Objective

__all__ = [
    "DifficultyIndexResult",
    "GradientFractionResult",
    "NoiseAlignmentResult",
    "QuadraticPredictionResult",
    "difficulty_index",
    "gradient_fraction",
    "noise_alignment",
    "quadratic_prediction",
]

KAPPA = (
    "kappa = ||U_Sigma^T U_H||_F^2 / k = mean of cos^2 of the k principal angles "
    "between the top-k eigenspaces of Sigma and H; 1 = same subspace, k/d = random"
)
FRACTION = (
    "||P_k g||^2 / ||g||^2 with P_k the projector on the top-k (largest) Hessian "
    "eigenvectors (Gur-Ari, Roberts & Dyer 2018)"
)
DIFFICULTY = "D = lambda_max(H)^2 / tr(H) * kappa(Sigma, H), " + KAPPA
QUADRATIC = (
    "predicted = -eta v.g + 0.5 eta^2 v.Hv; actual = L(theta - eta v) - L(theta)"
)


@dataclass(frozen=True)
class NoiseAlignmentResult(Result):
    r"""Alignment of the top eigenspaces of the gradient noise and the Hessian.

    Attributes:
        kappa: mean squared cosine of the principal angles, in ``[0, 1]``.
        kappa_bound: bound on ``|kappa - exact kappa|`` from the eigenvector
            errors (Davis-Kahan; ``inf`` when an eigengap is not resolved).
        angles: principal angles in radians, ascending, ``(k,)``.
        cosines: their cosines, descending.
        sigma_eigenvalues: the ``k`` largest eigenvalues of :math:`\Sigma`.
        hessian_eigenvalues: the ``k`` largest eigenvalues of :math:`H`.
        sigma_residuals: residuals of the :math:`\Sigma` pairs.
        hessian_residuals: residuals of the :math:`H` pairs.
        converged: whether every pair of both met the tolerance.
        sigma_vectors: ``(d, k)``, left out of :meth:`to_dict`.
        hessian_vectors: ``(d, k)``, left out of :meth:`to_dict`.
        definition: what was computed.
        parameters: settings, and the objective's :meth:`~Objective.info`.
        cost: counters spent, products and seconds.
    """

    kappa: float
    kappa_bound: float
    angles: Tensor
    cosines: Tensor
    sigma_eigenvalues: Tensor
    hessian_eigenvalues: Tensor
    sigma_residuals: Tensor
    hessian_residuals: Tensor
    converged: bool
    sigma_vectors: Tensor
    hessian_vectors: Tensor
    bulky: ClassVar[tuple[str, ...]] = ("sigma_vectors", "hessian_vectors")


@dataclass(frozen=True)
class GradientFractionResult(Result):
    r"""The share of the gradient in the top Hessian eigenspace.

    Attributes:
        value: :math:`\|P_k g\|^2 / \|g\|^2` in ``[0, 1]``.
        bound: bound on ``|value - exact value|`` from the eigenvector errors
            (:math:`\|P_k - \hat P_k\|_2`, Davis-Kahan; ``inf`` when the gap
            after the ``k``-th eigenvalue is not resolved).
        per_direction: :math:`(u_i\cdot g)^2 / \|g\|^2` for each eigenvector.
        eigenvalues: the ``k`` largest Hessian eigenvalues.
        residuals: their residuals.
        converged: per pair.
        grad_norm: :math:`\|g\|`.
        definition: what was computed.
        parameters: settings, and the objective's :meth:`~Objective.info`.
        cost: counters spent, products and seconds.
    """

    value: float
    bound: float
    per_direction: Tensor
    eigenvalues: Tensor
    residuals: Tensor
    converged: Tensor
    grad_norm: float


@dataclass(frozen=True)
class DifficultyIndexResult(Result):
    r"""The difficulty index with each factor and its error.

    Attributes:
        value: :math:`D = \lambda_\max^2 / \operatorname{tr}H \cdot \kappa`
            (``nan`` when the trace is not positive).
        bound: first-order propagation of the three factors' errors below (the
            trace's is statistical, the other two are bounds, so read it as an
            error scale rather than a guarantee).
        lambda_max: the largest Hessian eigenvalue.
        lambda_max_bound: its residual (an eigenvalue lies within it).
        hessian_trace: :math:`\operatorname{tr}H` (Hutchinson/Hutch++).
        hessian_trace_stderr: its standard error.
        kappa: :math:`\kappa(\Sigma, H)`, see :class:`NoiseAlignmentResult`.
        kappa_bound: its bound.
        alignment: the :class:`NoiseAlignmentResult` behind ``kappa`` (as a dict).
        definition: what was computed.
        parameters: settings, and the objective's :meth:`~Objective.info`.
        cost: counters spent, products and seconds.
    """

    value: float
    bound: float
    lambda_max: float
    lambda_max_bound: float
    hessian_trace: float
    hessian_trace_stderr: float
    kappa: float
    kappa_bound: float
    alignment: dict


@dataclass(frozen=True)
class QuadraticPredictionResult(Result):
    r"""The second-order model of one step along a direction, and the truth.

    Attributes:
        etas: step sizes ``(m,)``; the step is ``theta - eta * v``.
        predicted: :math:`-\eta\, v\cdot g + \frac12\eta^2\, v\cdot Hv`.
        first_order: :math:`-\eta\, v\cdot g`.
        actual: :math:`L(\theta - \eta v) - L(\theta)`.
        relative_error: ``|predicted - actual| / |actual|``.
        slope: :math:`v\cdot g`.
        curvature: :math:`v\cdot Hv`.
        best_eta: the step minimising the quadratic, ``slope / curvature``
            (``inf`` when ``curvature <= 0``).
        loss: :math:`L(\theta)`.
        direction: ``"gradient"`` (``v = g``, a gradient-descent step) or
            ``"given"``.
        definition: what was computed.
        parameters: settings, and the objective's :meth:`~Objective.info`.
        cost: counters spent and seconds.
    """

    etas: Tensor
    predicted: Tensor
    first_order: Tensor
    actual: Tensor
    relative_error: Tensor
    slope: float
    curvature: float
    best_eta: float
    loss: float
    direction: str


@dataclass(frozen=True)
class _Subspace:
    result: EigenResult
    values: Tensor  # the k wanted
    residuals: Tensor
    converged: Tensor
    basis: Tensor  # (d, k), orthonormal
    projector_error: float  # bound on ||P - P_hat||_F


def _top_subspace(
    op: SymmetricOperator,
    k: int,
    *,
    seed: int,
    tol: float,
    max_matvecs: int | None,
) -> _Subspace:
    """Top-``k`` eigenpairs, an orthonormal basis and a bound on its projector error.

    ``k + 1`` pairs are computed (when ``k < d``) so that the gap after the
    ``k``-th is known; the bound is Davis-Kahan's
    ``||P - P_hat||_F = sqrt(2) ||sin Theta||_F <= sqrt(2) ||R||_F / gap``.
    """
    d = op.shape[0]
    extra = 1 if k < d else 0
    res = eigenvalues(op, k + extra, seed=seed, tol=tol, max_matvecs=max_matvecs)
    if res.values.numel() < k + extra:
        raise ValueError(
            f"only {res.values.numel()} eigenpairs were found within max_matvecs="
            f"{max_matvecs}; {k + extra} are needed (k={k} and one more for the gap). "
            "Raise max_matvecs (or leave it None)."
        )
    values = res.values[:k]
    residuals = res.residuals[:k]
    basis, _ = torch.linalg.qr(res.vectors[:, :k])
    if not extra:  # the whole space: the projector is the identity, exactly
        bound = 0.0
    elif not bool(res.converged[: k + extra].all()):
        # Before convergence Lanczos may have missed an eigenvalue, so the
        # (k+1)-th Ritz value says nothing about the true gap: no bound.
        bound = math.inf
    else:
        gap = float(res.values[k - 1] - res.values[k] - res.residuals[k])
        r = float(residuals.double().norm())
        bound = math.sqrt(2.0) * r / gap if gap > 0 else math.inf
    return _Subspace(res, values, residuals, res.converged[:k], basis, bound)


def _principal_cosines(A: Tensor, B: Tensor) -> Tensor:
    """Cosines of the principal angles between orthonormal bases, descending."""
    cos = torch.linalg.svdvals(A.double().T @ B.double())
    return cos.clamp(0.0, 1.0)


def noise_alignment(
    obj: Objective,
    k: int = 5,
    *,
    theta: Tensor | None = None,
    seed: int = 0,
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    cache_bytes: int | None = 512 * 2**20,
) -> NoiseAlignmentResult:
    r"""Principal angles between the top-``k`` eigenspaces of :math:`\Sigma` and :math:`H`.

    With orthonormal bases :math:`U_\Sigma, U_H` of the eigenvectors of the ``k``
    largest eigenvalues, the cosines of the principal angles are the singular
    values of :math:`U_\Sigma^T U_H`, and

    .. math:: \kappa = \frac{\|U_\Sigma^T U_H\|_F^2}{k}
        = \frac1k\sum_i \cos^2\theta_i \in [0, 1],

    1 when the subspaces coincide, 0 when orthogonal, about ``k/d`` for random
    ones. ``kappa_bound`` bounds the effect of the eigenvector errors:
    :math:`|\Delta\kappa| \le (\|\Delta P_\Sigma\|_F + \|\Delta P_H\|_F)/\sqrt k`.

    Args:
        obj: the objective (``mode="eval"``).
        k: subspace dimension, at most ``min(d, N - 1)``.
        theta: where (default: the model's parameters).
        seed: seed of the Lanczos start vectors.
        tol: relative residual tolerance of the eigenpairs.
        max_matvecs: product budget of each Lanczos run.
        cache_bytes: memory for the per-sample gradients.

    Returns:
        A :class:`NoiseAlignmentResult`.
    """
    what = "noise_alignment"
    obj = _check_objective(obj, what)
    _require_per_sample(obj, what)
    limit, why = _sigma_limit(obj)
    k = _check_k(k, limit, what, why)
    theta = obj.check_theta(theta)
    with timed(obj) as meter:
        out = _alignment(obj, theta, k, seed, tol, max_matvecs, cache_bytes)
    return _alignment_result(obj, out, k, seed, tol, meter.cost)


def _alignment(obj, theta, k, seed, tol, max_matvecs, cache_bytes):
    sigma = gradient_covariance(obj, theta, cache_bytes=cache_bytes)
    top_s = _top_subspace(sigma, k, seed=seed, tol=tol, max_matvecs=max_matvecs)
    H = hessian(obj, theta)
    top_h = _top_subspace(H, k, seed=seed, tol=tol, max_matvecs=max_matvecs)
    return top_s, top_h, H


def _alignment_result(obj, out, k, seed, tol, cost: Cost) -> NoiseAlignmentResult:
    top_s, top_h, _ = out
    cos = _principal_cosines(top_s.basis, top_h.basis)
    kappa = float(cos.pow(2).sum()) / k
    err = min(1.0, (top_s.projector_error + top_h.projector_error) / math.sqrt(k))
    return NoiseAlignmentResult(
        kappa=kappa,
        kappa_bound=err,
        angles=torch.arccos(cos),
        cosines=cos,
        sigma_eigenvalues=top_s.values,
        hessian_eigenvalues=top_h.values,
        sigma_residuals=top_s.residuals,
        hessian_residuals=top_h.residuals,
        converged=bool(top_s.converged.all() and top_h.converged.all()),
        sigma_vectors=top_s.basis,
        hessian_vectors=top_h.basis,
        definition=f"{KAPPA}; {SIGMA}; principal angles = arccos of the singular "
        "values of U_Sigma^T U_H",
        parameters={"k": k, "seed": seed, "tol": tol, "objective": obj.info()},
        cost=cost.add(
            matvecs=top_s.result.cost.matvecs,
            sigma_matvecs=top_s.result.cost.matvecs,
            hessian_matvecs=top_h.result.cost.matvecs,
        ),
    )


def gradient_fraction(
    obj: Objective,
    k: int = 10,
    *,
    theta: Tensor | None = None,
    seed: int = 0,
    tol: float = 1e-6,
    max_matvecs: int | None = None,
) -> GradientFractionResult:
    r"""The fraction :math:`\|P_k g\|^2/\|g\|^2` of the gradient in the top Hessian eigenspace.

    :math:`P_k` projects on the eigenvectors of the ``k`` largest Hessian
    eigenvalues (Gur-Ari, Roberts & Dyer 2018 take ``k`` = number of classes).
    Needs no per-sample gradients, so any mode works.

    Args:
        obj: the objective.
        k: subspace dimension, at most ``d``.
        theta: where (default: the model's parameters).
        seed: seed of the Lanczos start vector.
        tol: relative residual tolerance of the eigenpairs.
        max_matvecs: product budget of Lanczos.

    Returns:
        A :class:`GradientFractionResult`.

    Example:
        >>> import torch, lossgeom as lg
        >>> X = torch.randn(30, 4, dtype=torch.float64); y = torch.randn(30, 1, dtype=torch.float64)
        >>> obj = lg.Objective(torch.nn.Linear(4, 1, bias=False).double(), torch.nn.MSELoss(), (X, y))
        >>> abs(gradient_fraction(obj, k=4).value - 1.0) < 1e-12  # the whole space
        True
    """
    what = "gradient_fraction"
    obj = _check_objective(obj, what)
    k = _check_k(k, obj.dim, what, f"the number of parameters d = {obj.dim}")
    theta = obj.check_theta(theta)
    with timed(obj) as meter:
        H = hessian(obj, theta)
        g = H.gradient()
        top = _top_subspace(H, k, seed=seed, tol=tol, max_matvecs=max_matvecs)
    gd = g.double()
    norm_sq = float(gd.pow(2).sum())
    coef = top.basis.double().T @ gd
    per = coef.pow(2) / norm_sq if norm_sq > 0 else torch.full_like(coef, math.nan)
    value = min(1.0, float(per.sum()))
    return GradientFractionResult(
        value=value,
        bound=min(1.0, top.projector_error),
        per_direction=per,
        eigenvalues=top.values,
        residuals=top.residuals,
        converged=top.converged,
        grad_norm=math.sqrt(norm_sq),
        definition=FRACTION,
        parameters={"k": k, "seed": seed, "tol": tol, "objective": obj.info()},
        cost=meter.cost.add(hessian_matvecs=top.result.cost.matvecs),
    )


def difficulty_index(
    obj: Objective,
    k: int = 5,
    *,
    theta: Tensor | None = None,
    seed: int = 0,
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    trace_max_matvecs: int = 100,
    cache_bytes: int | None = 512 * 2**20,
) -> DifficultyIndexResult:
    r"""The difficulty index :math:`D = \lambda_\max(H)^2/\operatorname{tr}H\cdot\kappa(\Sigma, H)`.

    :math:`\lambda_\max^2/\operatorname{tr}H` is large when one direction
    dominates the curvature; :math:`\kappa` (see :func:`noise_alignment`) is the
    mean squared cosine of the principal angles between the top-``k``
    eigenspaces of the gradient covariance and the Hessian, so :math:`D` is large
    when the noise also lies in the sharp directions. :math:`\lambda_\max` comes
    from the Hessian Lanczos run of the alignment (error: its residual),
    :math:`\operatorname{tr}H` from :func:`lossgeom.trace` (Hutch++/Hutchinson,
    with a standard error). ``error`` propagates the three to first order:
    :math:`\delta D^2 = (2\lambda\kappa/T\,\delta\lambda)^2 +
    (\lambda^2\kappa/T^2\,\delta T)^2 + (\lambda^2/T\,\delta\kappa)^2`.

    Args:
        obj: the objective (``mode="eval"``).
        k: subspace dimension of :math:`\kappa`, at most ``min(d, N - 1)``.
        theta: where (default: the model's parameters).
        seed: seed of the Lanczos start vectors and the trace probes.
        tol: relative residual tolerance of the eigenpairs.
        max_matvecs: product budget of each Lanczos run.
        trace_max_matvecs: product budget of the Hessian trace.
        cache_bytes: memory for the per-sample gradients.

    Returns:
        A :class:`DifficultyIndexResult`; ``value`` is ``nan`` when the trace estimate is
        not positive (``D`` is then undefined).
    """
    what = "difficulty_index"
    obj = _check_objective(obj, what)
    _require_per_sample(obj, what)
    limit, why = _sigma_limit(obj)
    k = _check_k(k, limit, what, why)
    theta = obj.check_theta(theta)
    if not isinstance(trace_max_matvecs, int) or trace_max_matvecs < 2:
        raise ValueError(
            f"trace_max_matvecs must be an integer >= 2; got {trace_max_matvecs!r}."
        )
    with timed(obj) as meter:
        out = _alignment(obj, theta, k, seed, tol, max_matvecs, cache_bytes)
        tr = trace(out[2], trace_max_matvecs, seed=seed)
    align = _alignment_result(obj, out, k, seed, tol, Cost())
    lam = float(out[1].values[0])
    dlam = float(out[1].residuals[0])
    T, dT = tr.value, tr.stderr
    kap, dkap = align.kappa, align.kappa_bound
    if T > 0:
        value = lam**2 / T * kap
        bound = math.sqrt(
            (2 * lam * kap / T * dlam) ** 2
            + (lam**2 * kap / T**2 * dT) ** 2
            + (lam**2 / T * dkap) ** 2
        )
    else:
        value = bound = math.nan
    return DifficultyIndexResult(
        value=value,
        bound=bound,
        lambda_max=lam,
        lambda_max_bound=dlam,
        hessian_trace=T,
        hessian_trace_stderr=dT,
        kappa=kap,
        kappa_bound=dkap,
        alignment=align.to_dict(),
        definition=DIFFICULTY + "; tr(H) by " + tr.method,
        parameters={
            "k": k,
            "seed": seed,
            "tol": tol,
            "trace_max_matvecs": trace_max_matvecs,
            "objective": obj.info(),
        },
        cost=meter.cost.add(
            matvecs=align.cost.counters["sigma_matvecs"],
            sigma_matvecs=align.cost.counters["sigma_matvecs"],
            hessian_matvecs=align.cost.counters["hessian_matvecs"] + tr.cost.matvecs,
        ),
    )


def quadratic_prediction(
    obj: Objective,
    direction: Tensor | None = None,
    *,
    eta: float | Sequence[float] | Tensor,
    theta: Tensor | None = None,
    chunk_size: int | None = 16,
) -> QuadraticPredictionResult:
    r"""The quadratic model of a step :math:`\theta - \eta v` against the actual change.

    Predicted :math:`\Delta L = -\eta\, v\cdot g + \frac12\eta^2\, v\cdot Hv`
    (one gradient and one Hessian-vector product); actual
    :math:`L(\theta - \eta v) - L(\theta)` (all step sizes and :math:`\theta` in
    one batched evaluation). The default :math:`v = g` is a gradient-descent
    step of learning rate :math:`\eta`.

    Args:
        obj: the objective.
        direction: ``v``, shape ``(d,)`` (default: the gradient).
        eta: one step size or several.
        theta: where (default: the model's parameters).
        chunk_size: points per batched evaluation (see :meth:`Objective.evaluate`).

    Returns:
        A :class:`QuadraticPredictionResult`.

    Example:
        >>> import torch, lossgeom as lg
        >>> X = torch.randn(30, 3, dtype=torch.float64); y = torch.randn(30, 1, dtype=torch.float64)
        >>> obj = lg.Objective(torch.nn.Linear(3, 1).double(), torch.nn.MSELoss(), (X, y))
        >>> q = quadratic_prediction(obj, eta=[0.1, 1.0])  # least squares: exact
        >>> torch.allclose(q.predicted, q.actual)
        True
    """
    what = "quadratic_prediction"
    obj = _check_objective(obj, what)
    theta = obj.check_theta(theta)
    etas = torch.as_tensor(eta, dtype=torch.float64).reshape(-1)
    if etas.numel() == 0 or not bool(torch.isfinite(etas).all()):
        raise ValueError(
            f"eta must be a finite step size or a non-empty sequence of them; got {eta!r}."
        )
    if direction is not None:
        if not isinstance(direction, Tensor) or direction.shape != (obj.dim,):
            raise ValueError(
                f"direction must be a tensor of shape ({obj.dim},) (a flat vector "
                "like obj.theta); got "
                + (
                    f"shape {tuple(direction.shape)}"
                    if isinstance(direction, Tensor)
                    else type(direction).__name__
                )
                + "."
            )
        direction = direction.detach().to(device=obj.device, dtype=obj.dtype)
    with timed(obj) as meter:
        _, g = obj.loss_and_grad(theta)
        v = g if direction is None else direction
        Hv = obj.hvp(v, theta)
        steps = etas.to(device=obj.device, dtype=obj.dtype)
        points = torch.cat([theta[None], theta[None] - steps[:, None] * v[None]])
        losses = obj.evaluate(points, chunk_size=chunk_size).double()
    slope = float(v.double() @ g.double())
    curv = float(v.double() @ Hv.double())
    first = -etas * slope
    predicted = first + 0.5 * etas**2 * curv
    actual = losses[1:].cpu() - losses[0].cpu()
    rel = (predicted - actual).abs() / actual.abs().clamp_min(
        torch.finfo(torch.float64).tiny
    )
    return QuadraticPredictionResult(
        etas=etas,
        predicted=predicted,
        first_order=first,
        actual=actual,
        relative_error=rel,
        slope=slope,
        curvature=curv,
        best_eta=slope / curv if curv > 0 else math.inf,
        loss=float(losses[0]),
        direction="gradient" if direction is None else "given",
        definition=QUADRATIC,
        parameters={"chunk_size": chunk_size, "objective": obj.info()},
        cost=meter.cost,
    )
