r"""Gradient noise and how it meets curvature; the difficulty index.

:math:`\Sigma = \frac1N\sum_i (g_i - \bar g)(g_i - \bar g)^T` is the centred
covariance of the per-sample gradients :math:`g_i` (ddof 0; through
:func:`lossgeom.gradient_covariance`), :math:`\bar g = g` the full-data gradient
and :math:`H` the Hessian of the mean loss. The measures:

* :func:`noise_scale`: the simple noise scale
  :math:`B_\text{simple} = \operatorname{tr}\Sigma / |g|^2` (McCandlish, Kaplan,
  Amodei et al. 2018, "An Empirical Model of Large-Batch Training"), exactly from
  per-sample gradients, or from gradient norms at two batch sizes (their
  Appendix A), which needs no per-sample gradients.
* :func:`gradient_noise`: top eigenvalues and exact trace of :math:`\Sigma`, and
  :math:`B_\text{simple}`.
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
to the next Ritz value (which is why ``k + 1`` eigenpairs are computed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from torch import Tensor
from torch.func import grad as func_grad
from torch.func import vmap

from lossgeom.curvature import eigenvalues, gradient_covariance, hessian, trace
from lossgeom.linalg import EigenResult, SymmetricOperator
from lossgeom.measures._common import as_plain, measure_cost
from lossgeom.objective import NonFiniteError, Objective

__all__ = [
    "DifficultyIndexResult",
    "GradientFractionResult",
    "GradientNoiseResult",
    "NoiseAlignmentResult",
    "NoiseScaleResult",
    "QuadraticPredictionResult",
    "difficulty_index",
    "gradient_fraction",
    "gradient_noise",
    "noise_alignment",
    "noise_scale",
    "quadratic_prediction",
]

SIGMA = (
    "Sigma = (1/N) sum_i (g_i - g)(g_i - g)^T: centred covariance of the per-sample "
    "gradients g_i around the full-data gradient g (divides by N)"
)
B_SIMPLE = "B_simple = tr(Sigma) / |g|^2 (McCandlish et al. 2018, eq. 2.4)"
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


class _Result:
    """``to_dict`` shared by the results: plain JSON values, ``vectors`` left out."""

    _skip: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """The result as plain JSON values (eigenvector matrices left out)."""
        return {
            f.name: as_plain(getattr(self, f.name))
            for f in fields(self)  # type: ignore[arg-type]
            if f.name not in self._skip
        }


# --------------------------------------------------------------------- results
@dataclass(frozen=True)
class NoiseScaleResult(_Result):
    r"""The simple noise scale with its parts.

    Attributes:
        value: :math:`B_\text{simple}` (in samples).
        stderr: standard error (jackknife over repeats; 0 for ``"per_sample"``,
            which is exact on the data).
        trace: :math:`\operatorname{tr}\Sigma`.
        trace_stderr: its standard error.
        grad_norm_sq: :math:`|g|^2`.
        grad_norm_sq_stderr: its standard error.
        method: ``"per_sample"`` or ``"two_batch"``.
        definition: what was computed.
        parameters: settings, and the objective's :meth:`~Objective.info`.
        cost: counters spent and seconds.
    """

    value: float
    stderr: float
    trace: float
    trace_stderr: float
    grad_norm_sq: float
    grad_norm_sq_stderr: float
    method: str
    definition: str
    parameters: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GradientNoiseResult(_Result):
    r"""Top of the gradient-noise spectrum, its trace and the noise scale.

    Attributes:
        eigenvalues: the ``k`` largest eigenvalues of :math:`\Sigma`, descending.
        residuals: ``||Sigma u - lambda u||`` of each pair.
        converged: per pair, from the Lanczos tolerance.
        vectors: the eigenvectors ``(d, k)`` (left out of :meth:`to_dict`).
        trace: exact :math:`\operatorname{tr}\Sigma = \frac1N\sum_i\|g_i-g\|^2`.
        grad_norm_sq: :math:`|g|^2`.
        noise_scale: :math:`B_\text{simple}`, exact on the data.
        top_fraction: ``sum(eigenvalues) / trace``.
        definition: what was computed.
        parameters: settings, and the objective's :meth:`~Objective.info`.
        cost: counters spent, products and seconds.
    """

    eigenvalues: Tensor
    residuals: Tensor
    converged: Tensor
    vectors: Tensor
    trace: float
    grad_norm_sq: float
    noise_scale: float
    top_fraction: float
    definition: str
    parameters: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    _skip = ("vectors",)


@dataclass(frozen=True)
class NoiseAlignmentResult(_Result):
    r"""Alignment of the top eigenspaces of the gradient noise and the Hessian.

    Attributes:
        kappa: mean squared cosine of the principal angles, in ``[0, 1]``.
        kappa_error: bound on ``|kappa - exact kappa|`` from the eigenvector
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
    kappa_error: float
    angles: Tensor
    cosines: Tensor
    sigma_eigenvalues: Tensor
    hessian_eigenvalues: Tensor
    sigma_residuals: Tensor
    hessian_residuals: Tensor
    converged: bool
    sigma_vectors: Tensor
    hessian_vectors: Tensor
    definition: str
    parameters: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    _skip = ("sigma_vectors", "hessian_vectors")


@dataclass(frozen=True)
class GradientFractionResult(_Result):
    r"""The share of the gradient in the top Hessian eigenspace.

    Attributes:
        value: :math:`\|P_k g\|^2 / \|g\|^2` in ``[0, 1]``.
        error: bound on ``|value - exact value|`` from the eigenvector errors
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
    error: float
    per_direction: Tensor
    eigenvalues: Tensor
    residuals: Tensor
    converged: Tensor
    grad_norm: float
    definition: str
    parameters: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DifficultyIndexResult(_Result):
    r"""The difficulty index with each factor and its error.

    Attributes:
        value: :math:`D = \lambda_\max^2 / \operatorname{tr}H \cdot \kappa`
            (``nan`` when the trace is not positive).
        error: first-order propagation of the three factors' errors below.
        lambda_max: the largest Hessian eigenvalue.
        lambda_max_error: its residual (an eigenvalue lies within it).
        hessian_trace: :math:`\operatorname{tr}H` (Hutchinson/Hutch++).
        hessian_trace_stderr: its standard error.
        kappa: :math:`\kappa(\Sigma, H)`, see :class:`NoiseAlignmentResult`.
        kappa_error: its bound.
        alignment: the :class:`NoiseAlignmentResult` behind ``kappa`` (as a dict).
        definition: what was computed.
        parameters: settings, and the objective's :meth:`~Objective.info`.
        cost: counters spent, products and seconds.
    """

    value: float
    error: float
    lambda_max: float
    lambda_max_error: float
    hessian_trace: float
    hessian_trace_stderr: float
    kappa: float
    kappa_error: float
    alignment: dict
    definition: str
    parameters: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)


@dataclass(frozen=True)
class QuadraticPredictionResult(_Result):
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
    definition: str
    parameters: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)


# --------------------------------------------------------------------- checks
def _check_objective(obj: object, what: str) -> Objective:
    if not isinstance(obj, Objective):
        raise TypeError(
            f"{what} expects a lossgeom Objective (lg.Objective(model, loss_fn, "
            f"data)); got {type(obj).__name__}."
        )
    return obj


def _require_per_sample(obj: Objective, what: str, alternative: str = "") -> None:
    """Refuse before any work when per-sample gradients cannot be computed."""
    if obj.mode != "eval":
        raise ValueError(
            f"{what} needs per-sample gradients, and those need an Objective in "
            "mode='eval': in mode='train' BatchNorm normalises each sample by "
            "statistics of its whole batch, so a sample has no gradient of its "
            f"own. Got an Objective with mode={obj.mode!r}; build it with "
            "lg.Objective(model, loss_fn, data, mode='eval')" + alternative + "."
        )


def _check_k(k: object, limit: int, what: str, why: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
        raise ValueError(
            f"{what}: k must be an integer with 1 <= k <= {limit} ({why}); got "
            f"k={k!r}. Pass a smaller k."
        )
    return k


def _sigma_limit(obj: Objective) -> tuple[int, str]:
    n = obj.n_samples
    if n - 1 < obj.dim:
        return n - 1, (
            f"Sigma has rank at most N - 1 = {n - 1}: beyond that its eigenvectors "
            "are arbitrary"
        )
    return obj.dim, f"the number of parameters d = {obj.dim}"


# ------------------------------------------------------------- eigen-subspaces
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


# ---------------------------------------------------------------- noise scale
def _per_sample_parts(
    obj: Objective, theta: Tensor, cache_bytes: int | None
) -> tuple[object, float, float]:
    op = gradient_covariance(obj, theta, cache_bytes=cache_bytes)
    tr = op.trace()
    g2 = float(op.mean_grad.double().pow(2).sum())
    return op, tr, g2


def _gather(obj: Objective) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*obj.batches(), strict=True)
    return torch.cat(xs), torch.cat(ys)


def _group_grads(
    obj: Objective, theta: Tensor, x: Tensor, y: Tensor, chunk_size: int | None
) -> Tensor:
    """Mean-loss gradients of ``m`` equal groups, ``x`` of shape ``(m, B, ...)``.

    In eval mode one vectorised call (``vmap`` over the groups, ``chunk_size``
    groups at a time); in train mode one forward pass per group, so that each
    group's BatchNorm uses that group's statistics.
    """
    if obj.mode == "eval":
        g_fn = vmap(func_grad(obj.batch_loss), (None, 0, 0), chunk_size=chunk_size)
        return g_fn(theta, x, y)
    return torch.stack(
        [_batch_grad(obj, theta, xb, yb) for xb, yb in zip(x, y, strict=True)]
    )


def _batch_grad(obj: Objective, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(obj.batch_loss(t, x, y), t, allow_unused=True)
    return torch.zeros_like(theta) if g is None else g


def _jackknife_ratio(a: Tensor, b: Tensor) -> float:
    """Delete-one jackknife standard error of ``mean(a) / mean(b)``."""
    n = a.numel()
    if n < 2:
        return math.inf
    loo = (a.sum() - a) / (b.sum() - b)
    return math.sqrt((n - 1) / n * float(((loo - loo.mean()) ** 2).sum()))


def _fpc(n_total: int, b: int) -> float:
    """``E|G_B - g|^2 / tr(Sigma)`` for ``B`` samples drawn without replacement."""
    return (n_total - b) / (b * (n_total - 1))


def _two_batch(
    obj: Objective,
    theta: Tensor,
    b_small: int,
    b_big: int,
    n_repeats: int,
    seed: int,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, int]:
    """Per-repeat unbiased estimates of ``tr(Sigma)`` and ``|g|^2``."""
    x_all, y_all = _gather(obj)
    n_total = x_all.shape[0]
    c_small, c_big = _fpc(n_total, b_small), _fpc(n_total, b_big)
    gen = torch.Generator().manual_seed(seed)
    traces, norms = [], []
    n_grads = 0
    with obj.probe_mode(higher_order=False):
        for _ in range(n_repeats):
            idx = torch.randperm(n_total, generator=gen)[:b_big].to(x_all.device)
            m = b_big // b_small
            full = idx[: m * b_small].view(m, b_small)
            grads = _group_grads(obj, theta, x_all[full], y_all[full], chunk_size)
            big_sum = grads.double().sum(0) * b_small
            rest = idx[m * b_small :]
            if rest.numel():
                g_rest = _batch_grad(obj, theta, x_all[rest], y_all[rest]).double()
                big_sum = big_sum + g_rest * rest.numel()
            n_grads += m + int(rest.numel() > 0)
            if not bool(torch.isfinite(big_sum).all()):
                raise NonFiniteError(
                    "non-finite minibatch gradient in the two-batch noise-scale "
                    "estimator; check the data for NaN/inf and the parameters for "
                    "overflow."
                )
            big = big_sum / b_big
            small_sq = grads.double().pow(2).sum(1).mean()
            big_sq = big.pow(2).sum()
            traces.append((small_sq - big_sq) / (c_small - c_big))
            norms.append((c_small * big_sq - c_big * small_sq) / (c_small - c_big))
    return torch.stack(traces).cpu(), torch.stack(norms).cpu(), n_grads


def noise_scale(
    obj: Objective,
    method: Literal["per_sample", "two_batch"] = "per_sample",
    *,
    theta: Tensor | None = None,
    batch_sizes: tuple[int, int] | None = None,
    n_repeats: int = 20,
    seed: int = 0,
    chunk_size: int | None = None,
    cache_bytes: int | None = 512 * 2**20,
) -> NoiseScaleResult:
    r"""The simple noise scale :math:`B_\text{simple} = \operatorname{tr}\Sigma / |g|^2`.

    ``method="per_sample"`` is exact on the data: :math:`\operatorname{tr}\Sigma
    = \frac1N\sum_i \|g_i - g\|^2` from per-sample gradients (needs
    ``mode="eval"``). ``method="two_batch"`` needs only minibatch gradients
    (McCandlish et al. 2018, Appendix A): each repeat draws ``B_big`` samples
    without replacement and splits them into groups of ``B_small``; with
    :math:`c(B) = \frac{N-B}{B(N-1)}` (``1/B`` for large ``N``, corrected for
    sampling without replacement), :math:`E|G_B|^2 = |g|^2 + c(B)
    \operatorname{tr}\Sigma`, so

    .. math::
        \widehat{\operatorname{tr}\Sigma} = \frac{|G_s|^2 - |G_b|^2}{c_s - c_b},
        \qquad \widehat{|g|^2} = \frac{c_s|G_b|^2 - c_b|G_s|^2}{c_s - c_b}

    are unbiased (:math:`|G_s|^2` averaged over the full small groups). The noise
    scale is the ratio of their means over repeats (ratio of unbiased means, as
    McCandlish et al. advise), with a jackknife standard error. In
    ``mode="train"`` each small group is one forward pass (its own batch
    statistics), as in data-parallel training with per-device BatchNorm.

    Args:
        obj: the objective.
        method: ``"per_sample"`` or ``"two_batch"``.
        theta: where (default: the model's parameters).
        batch_sizes: ``(B_small, B_big)`` with ``1 <= B_small < B_big <= N``
            (default ``B_big = min(N, 512)``, ``B_small = max(1, B_big // 8)``).
        n_repeats: independent draws of a big batch (two-batch; at least 2).
        seed: seed of the draws.
        chunk_size: small groups per vectorised gradient call (eval mode;
            default: all groups of a draw at once).
        cache_bytes: memory for per-sample gradients (per-sample method; see
            :func:`lossgeom.gradient_covariance`).

    Returns:
        A :class:`NoiseScaleResult`.

    Example:
        >>> import torch, lossgeom as lg
        >>> X = torch.randn(64, 3, dtype=torch.float64); y = torch.randn(64, 1, dtype=torch.float64)
        >>> obj = lg.Objective(torch.nn.Linear(3, 1).double(), torch.nn.MSELoss(), (X, y))
        >>> S = lg.testing.exact_gradient_covariance(obj)
        >>> g = lg.testing.exact_gradient(obj)
        >>> exact = float(S.trace() / g.pow(2).sum())
        >>> abs(noise_scale(obj).value - exact) < 1e-10 * exact
        True
    """
    what = "noise_scale"
    obj = _check_objective(obj, what)
    if method not in ("per_sample", "two_batch"):
        raise ValueError(f"method must be 'per_sample' or 'two_batch'; got {method!r}.")
    theta = obj.check_theta(theta)
    params: dict = {"method": method, "seed": seed, "objective": obj.info()}
    if method == "per_sample":
        _require_per_sample(
            obj,
            "noise_scale(method='per_sample')",
            ", or use method='two_batch', which needs only minibatch gradients",
        )
        with measure_cost(obj) as cost:
            _, tr, g2 = _per_sample_parts(obj, theta, cache_bytes)
        return NoiseScaleResult(
            value=tr / g2 if g2 > 0 else math.inf,
            stderr=0.0,
            trace=tr,
            trace_stderr=0.0,
            grad_norm_sq=g2,
            grad_norm_sq_stderr=0.0,
            method=method,
            definition=f"{B_SIMPLE}; {SIGMA}; exact from per-sample gradients",
            parameters=params,
            cost=dict(cost),
        )

    if obj.data_parallel:
        raise ValueError(
            "noise_scale(method='two_batch') draws minibatches from the data held "
            "by this process and does not combine ranks; with data_parallel use "
            "method='per_sample' (which sums over ranks)."
        )
    n = obj.n_samples
    if batch_sizes is None:
        b_big = min(n, 512)
        b_small = max(1, b_big // 8)
    else:
        if (
            not isinstance(batch_sizes, (tuple, list))
            or len(batch_sizes) != 2
            or not all(
                isinstance(b, int) and not isinstance(b, bool) for b in batch_sizes
            )
        ):
            raise ValueError(
                "batch_sizes must be a pair of integers (B_small, B_big); got "
                f"{batch_sizes!r}."
            )
        b_small, b_big = batch_sizes
    if not 1 <= b_small < b_big <= n:
        raise ValueError(
            "the two-batch estimator needs batch sizes 1 <= B_small < B_big <= N = "
            f"{n} (the number of samples); got B_small={b_small}, B_big={b_big}. "
            "Pick B_big at most N and B_small well below B_big (e.g. B_big / 8)."
        )
    if isinstance(n_repeats, bool) or not isinstance(n_repeats, int) or n_repeats < 2:
        raise ValueError(
            f"n_repeats must be an integer >= 2 (the standard error needs at least "
            f"two draws); got {n_repeats!r}."
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(
            f"chunk_size must be a positive integer or None; got {chunk_size!r}."
        )
    params.update(batch_sizes=[b_small, b_big], n_repeats=n_repeats)
    with measure_cost(obj) as cost:
        traces, norms, n_grads = _two_batch(
            obj, theta, b_small, b_big, n_repeats, seed, chunk_size
        )
    cost = dict(cost, minibatch_gradients=n_grads, samples=n_repeats * b_big)
    tr, g2 = float(traces.mean()), float(norms.mean())
    root = math.sqrt(n_repeats)
    return NoiseScaleResult(
        value=tr / g2 if g2 != 0 else math.inf,
        stderr=_jackknife_ratio(traces, norms),
        trace=tr,
        trace_stderr=float(traces.std()) / root,
        grad_norm_sq=g2,
        grad_norm_sq_stderr=float(norms.std()) / root,
        method=method,
        definition=(
            f"{B_SIMPLE}; {SIGMA}; tr(Sigma) and |g|^2 from unbiased two-batch-size "
            "estimators (McCandlish et al. 2018, App. A, corrected for sampling "
            "without replacement), ratio of their means over repeats"
        ),
        parameters=params,
        cost=cost,
    )


# ----------------------------------------------------------- noise spectrum
def gradient_noise(
    obj: Objective,
    k: int = 5,
    *,
    theta: Tensor | None = None,
    seed: int = 0,
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    cache_bytes: int | None = 512 * 2**20,
) -> GradientNoiseResult:
    r"""Top eigenvalues and trace of the gradient covariance, and the noise scale.

    The eigenvalues come from Lanczos on :func:`lossgeom.gradient_covariance`
    (per-sample gradients held in memory when they fit in ``cache_bytes``), the
    trace exactly from the per-sample gradients.

    Args:
        obj: the objective (``mode="eval"``).
        k: eigenvalues wanted, at most ``min(d, N - 1)``.
        theta: where (default: the model's parameters).
        seed: seed of the Lanczos start vector.
        tol: relative residual tolerance of the eigenpairs.
        max_matvecs: product budget of Lanczos.
        cache_bytes: memory for the per-sample gradients.

    Returns:
        A :class:`GradientNoiseResult`.

    Example:
        >>> import torch, lossgeom as lg
        >>> X = torch.randn(40, 3, dtype=torch.float64); y = torch.randn(40, 1, dtype=torch.float64)
        >>> obj = lg.Objective(torch.nn.Linear(3, 1).double(), torch.nn.MSELoss(), (X, y))
        >>> res = gradient_noise(obj, k=2)
        >>> S = lg.testing.exact_gradient_covariance(obj)
        >>> torch.allclose(res.eigenvalues, torch.linalg.eigvalsh(S).flip(0)[:2])
        True
    """
    what = "gradient_noise"
    obj = _check_objective(obj, what)
    _require_per_sample(obj, what)
    limit, why = _sigma_limit(obj)
    k = _check_k(k, limit, what, why)
    theta = obj.check_theta(theta)
    with measure_cost(obj) as cost:
        op, tr, g2 = _per_sample_parts(obj, theta, cache_bytes)
        res = eigenvalues(op, k, seed=seed, tol=tol, max_matvecs=max_matvecs)
    return GradientNoiseResult(
        eigenvalues=res.values,
        residuals=res.residuals,
        converged=res.converged,
        vectors=res.vectors,
        trace=tr,
        grad_norm_sq=g2,
        noise_scale=tr / g2 if g2 > 0 else math.inf,
        top_fraction=float(res.values.double().sum()) / tr if tr > 0 else math.nan,
        definition=f"{SIGMA}; top-k eigenvalues by Lanczos; {B_SIMPLE}",
        parameters={
            "k": k,
            "seed": seed,
            "tol": tol,
            "cached": bool(op.cached),
            "objective": obj.info(),
        },
        cost=dict(cost, sigma_matvecs=res.n_matvecs),
    )


# ------------------------------------------------------------------ alignment
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
    ones. ``kappa_error`` bounds the effect of the eigenvector errors:
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
    with measure_cost(obj) as cost:
        out = _alignment(obj, theta, k, seed, tol, max_matvecs, cache_bytes)
    return _alignment_result(obj, out, k, seed, tol, dict(cost))


def _alignment(obj, theta, k, seed, tol, max_matvecs, cache_bytes):
    sigma = gradient_covariance(obj, theta, cache_bytes=cache_bytes)
    top_s = _top_subspace(sigma, k, seed=seed, tol=tol, max_matvecs=max_matvecs)
    H = hessian(obj, theta)
    top_h = _top_subspace(H, k, seed=seed, tol=tol, max_matvecs=max_matvecs)
    return top_s, top_h, H


def _alignment_result(obj, out, k, seed, tol, cost) -> NoiseAlignmentResult:
    top_s, top_h, _ = out
    cos = _principal_cosines(top_s.basis, top_h.basis)
    kappa = float(cos.pow(2).sum()) / k
    err = min(1.0, (top_s.projector_error + top_h.projector_error) / math.sqrt(k))
    return NoiseAlignmentResult(
        kappa=kappa,
        kappa_error=err,
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
        cost=dict(
            cost,
            sigma_matvecs=top_s.result.n_matvecs,
            hessian_matvecs=top_h.result.n_matvecs,
        ),
    )


# ------------------------------------------------------------ gradient share
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
    with measure_cost(obj) as cost:
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
        error=min(1.0, top.projector_error),
        per_direction=per,
        eigenvalues=top.values,
        residuals=top.residuals,
        converged=top.converged,
        grad_norm=math.sqrt(norm_sq),
        definition=FRACTION,
        parameters={"k": k, "seed": seed, "tol": tol, "objective": obj.info()},
        cost=dict(cost, hessian_matvecs=top.result.n_matvecs),
    )


# ----------------------------------------------------------------- difficulty
def difficulty_index(
    obj: Objective,
    k: int = 5,
    *,
    theta: Tensor | None = None,
    seed: int = 0,
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    trace_matvecs: int = 100,
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
        trace_matvecs: product budget of the Hessian trace.
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
    if not isinstance(trace_matvecs, int) or trace_matvecs < 2:
        raise ValueError(
            f"trace_matvecs must be an integer >= 2; got {trace_matvecs!r}."
        )
    with measure_cost(obj) as cost:
        out = _alignment(obj, theta, k, seed, tol, max_matvecs, cache_bytes)
        tr = trace(out[2], trace_matvecs, seed=seed)
    align = _alignment_result(obj, out, k, seed, tol, {})
    lam = float(out[1].values[0])
    dlam = float(out[1].residuals[0])
    T, dT = tr.value, tr.stderr
    kap, dkap = align.kappa, align.kappa_error
    if T > 0:
        value = lam**2 / T * kap
        error = math.sqrt(
            (2 * lam * kap / T * dlam) ** 2
            + (lam**2 * kap / T**2 * dT) ** 2
            + (lam**2 / T * dkap) ** 2
        )
    else:
        value = error = math.nan
    return DifficultyIndexResult(
        value=value,
        error=error,
        lambda_max=lam,
        lambda_max_error=dlam,
        hessian_trace=T,
        hessian_trace_stderr=dT,
        kappa=kap,
        kappa_error=dkap,
        alignment=align.to_dict(),
        definition=DIFFICULTY + "; tr(H) by " + tr.method,
        parameters={
            "k": k,
            "seed": seed,
            "tol": tol,
            "trace_matvecs": trace_matvecs,
            "objective": obj.info(),
        },
        cost=dict(
            cost,
            sigma_matvecs=align.cost["sigma_matvecs"],
            hessian_matvecs=align.cost["hessian_matvecs"] + tr.n_matvecs,
        ),
    )


# ------------------------------------------------------------------ one step
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
    with measure_cost(obj) as cost:
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
        cost=dict(cost),
    )
