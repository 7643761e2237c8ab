r"""Gradient noise: the covariance of per-sample gradients and the noise scale.

:math:`\Sigma = \frac1N\sum_i (g_i - \bar g)(g_i - \bar g)^T` is the centred
covariance of the per-sample gradients :math:`g_i` (ddof 0; through
:func:`lossgeom.gradient_covariance`), :math:`\bar g = g` the full-data gradient.

* :func:`noise_scale`: the simple noise scale
  :math:`B_\text{simple} = \operatorname{tr}\Sigma / |g|^2` (McCandlish, Kaplan,
  Amodei et al. 2018, "An Empirical Model of Large-Batch Training"), exactly from
  per-sample gradients, or from gradient norms at two batch sizes (their
  Appendix A), which needs no per-sample gradients.
* :func:`gradient_noise`: top eigenvalues and exact trace of :math:`\Sigma`, and
  :math:`B_\text{simple}`.

How the noise meets the curvature (alignment, gradient share, difficulty index)
is in :mod:`lossgeom.measures._difficulty`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor
from torch.func import grad as func_grad
from torch.func import vmap

from lossgeom._results import Result, timed
from lossgeom.curvature import eigenvalues, gradient_covariance
from lossgeom.objective import NonFiniteError, Objective

__all__ = ["GradientNoiseResult", "NoiseScaleResult", "gradient_noise", "noise_scale"]

SIGMA = (
    "Sigma = (1/N) sum_i (g_i - g)(g_i - g)^T: centred covariance of the per-sample "
    "gradients g_i = N grad c_i (c_i: sample i's contribution to the objective "
    "L = sum_i c_i; for a plain mean, the gradient of sample i's loss) around the "
    "full-data gradient g (divides by N)"
)
B_SIMPLE = "B_simple = tr(Sigma) / |g|^2 (McCandlish et al. 2018, eq. 2.4)"


@dataclass(frozen=True)
class NoiseScaleResult(Result):
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


@dataclass(frozen=True)
class GradientNoiseResult(Result):
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
    bulky: ClassVar[tuple[str, ...]] = ("vectors",)


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
        grads = g_fn(theta, x, y)
        return grads / x.shape[1] if _sums(obj) else grads
    return torch.stack(
        [_batch_grad(obj, theta, xb, yb) for xb, yb in zip(x, y, strict=True)]
    )


def _sums(obj: Objective) -> bool:
    """Whether a minibatch's loss is a sum over its samples (else a plain mean)."""
    return obj.loss_reduction.minibatch_scale(obj.loss_totals()) == "sum"


def _batch_grad(obj: Objective, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """The gradient of the mean per-sample loss of one minibatch."""
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(obj.batch_loss(t, x, y), t, allow_unused=True)
    g = torch.zeros_like(theta) if g is None else g
    return g / x.shape[0] if _sums(obj) else g


def _check_minibatch_loss(obj: Objective) -> None:
    """Refuse a loss whose minibatch values do not estimate the objective."""
    if obj.loss_reduction.minibatch_scale(obj.loss_totals()) is None:
        raise ValueError(
            "noise_scale(method='two_batch') needs minibatch losses that are plain "
            "means (or sums) of per-sample losses, so that a minibatch gradient is "
            f"an unbiased estimate of the full-data gradient; the loss "
            f"{obj.loss_reduction.description} is a weighted mean (class weights, "
            "ignored targets or a normalizer of its own), whose minibatch value is "
            "a ratio. Use method='per_sample', which is exact for every loss."
        )


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
        return _per_sample_noise_scale(obj, theta, params, cache_bytes)
    b_small, b_big = _check_two_batch(obj, batch_sizes, n_repeats, chunk_size)
    _check_minibatch_loss(obj)
    params.update(batch_sizes=[b_small, b_big], n_repeats=n_repeats)
    with timed(obj) as meter:
        traces, norms, n_grads = _two_batch(
            obj, theta, b_small, b_big, n_repeats, seed, chunk_size
        )
    cost = meter.cost.add(minibatch_gradients=n_grads, samples=n_repeats * b_big)
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


def _per_sample_noise_scale(
    obj: Objective, theta: Tensor, params: dict, cache_bytes: int | None
) -> NoiseScaleResult:
    """The noise scale exact on the data, from per-sample gradients."""
    _require_per_sample(
        obj,
        "noise_scale(method='per_sample')",
        ", or use method='two_batch', which needs only minibatch gradients",
    )
    with timed(obj) as meter:
        _, tr, g2 = _per_sample_parts(obj, theta, cache_bytes)
    return NoiseScaleResult(
        value=tr / g2 if g2 > 0 else math.inf,
        stderr=0.0,
        trace=tr,
        trace_stderr=0.0,
        grad_norm_sq=g2,
        grad_norm_sq_stderr=0.0,
        method="per_sample",
        definition=f"{B_SIMPLE}; {SIGMA}; exact from per-sample gradients",
        parameters=params,
        cost=meter.cost,
    )


def _check_two_batch(
    obj: Objective, batch_sizes: object, n_repeats: object, chunk_size: object
) -> tuple[int, int]:
    """Refuse bad settings of the two-batch estimator; ``(B_small, B_big)``."""
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
    return b_small, b_big


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
    with timed(obj) as meter:
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
        cost=meter.cost.add(matvecs=res.cost.matvecs, sigma_matvecs=res.cost.matvecs),
    )
