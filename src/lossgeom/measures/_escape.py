r"""The escaping indicator :math:`\operatorname{tr}(H\Sigma)` of gradient noise.

With :math:`g_i` the per-sample gradients (:math:`i = 1..N`), :math:`g` their mean
(the full-data gradient), :math:`c_i = g_i - g`,
:math:`\Sigma = \frac1N\sum_i c_i c_i^T` (:mod:`lossgeom.measures._noise`) and
:math:`H` the Hessian of the objective at :math:`\theta` (:math:`D` parameters):

.. math::
    \operatorname{tr}(H\Sigma) = \frac1N \sum_i c_i^T H c_i .

Zhu, Wu, Yu, Wu & Ma (2019, "The anisotropic noise in stochastic gradient
descent: its behavior of escaping from sharp minima and regularization effects",
ICML) derive :math:`\operatorname{tr}(H\Sigma)` as the indicator of how
efficiently noise of covariance :math:`\Sigma` escapes a minimum of Hessian
:math:`H`, and compare it with isotropic noise of the same total variance,
:math:`\Sigma_\text{iso} = (\operatorname{tr}\Sigma / D) I`, for which
:math:`\operatorname{tr}(H\Sigma_\text{iso}) = \operatorname{tr}H
\operatorname{tr}\Sigma / D`. To second order a step
:math:`\theta - \eta(g + \varepsilon)` with :math:`E\varepsilon = 0`,
:math:`\operatorname{Cov}\varepsilon = \Sigma` raises the expected loss by
:math:`\frac{\eta^2}{2}\operatorname{tr}(H\Sigma)` more than the noiseless step
(:math:`E\,\varepsilon^T H\varepsilon = \operatorname{tr}(H\Sigma)`).

The quadratic forms :math:`c_i^T H c_i` take one Hessian-vector product each, in
blocks through the Hessian operator (:func:`lossgeom.hessian`); on a random
subset of ``samples`` of them (drawn without replacement) their mean is unbiased
with the finite-population standard error of Cochran (1977, "Sampling
Techniques", ch. 2). :math:`\operatorname{tr}H` comes from
:func:`lossgeom.trace`: exact with :math:`D` products when ``trace_probes >= D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lossgeom._results import Result, timed
from lossgeom.curvature import HessianOperator, hessian, trace
from lossgeom.measures._noise import (
    SIGMA,
    _check_objective,
    _fpc,
    _require_per_sample,
)
from lossgeom.objective import Objective

__all__ = ["NoiseCurvatureResult", "noise_curvature"]

ESCAPE = (
    "tr(H Sigma) = (1/N) sum_i (g_i - g)^T H (g_i - g), H the Hessian of the "
    "objective: the escaping indicator of Zhu, Wu, Yu, Wu & Ma (2019, ICML); a step "
    "theta - eta (g + eps) with E eps = 0, Cov eps = Sigma raises the expected loss "
    "by (eta^2/2) tr(H Sigma) to second order"
)
ISOTROPIC = (
    "isotropic = tr(H) tr(Sigma) / D = tr(H Sigma_iso), Sigma_iso = (tr Sigma / D) I "
    "(isotropic noise of the same total variance); ratio = value / isotropic"
)
BATCH = (
    "minibatch versions: Sigma_B = (N - B) / (B (N - 1)) Sigma, the covariance of "
    "the mean of B of the N per-sample gradients drawn without replacement"
)


@dataclass(frozen=True)
class NoiseCurvatureResult(Result):
    r"""The escaping indicator :math:`\operatorname{tr}(H\Sigma)` with its parts.

    Attributes:
        value: :math:`\operatorname{tr}(H\Sigma) = \frac1N\sum_i c_i^T H c_i`.
        stderr: its standard error (0 when all ``N`` samples are used).
        trace_sigma: :math:`\operatorname{tr}\Sigma`, exact.
        trace_h: :math:`\operatorname{tr}H`.
        trace_h_stderr: its standard error (0 when exact).
        trace_h_method: ``"exact"``, ``"hutchinson"`` or ``"hutch++"``.
        isotropic: :math:`\operatorname{tr}H\operatorname{tr}\Sigma / D`.
        isotropic_stderr: its standard error (from ``trace_h``'s).
        ratio: ``value / isotropic`` (``nan`` when ``isotropic`` is 0); above 1
            the noise lies more in high-curvature directions than isotropic
            noise of the same variance.
        ratio_stderr: its standard error (delta method, the two estimates being
            independent).
        samples: quadratic forms :math:`c_i^T H c_i` computed (``N`` when exact).
        n_samples: :math:`N`.
        dim: :math:`D`.
        batch_size: :math:`B` of the minibatch versions, or ``None``.
        batch_factor: :math:`(N - B) / (B (N - 1))`, or ``None``.
        value_batch: ``batch_factor * value``: :math:`\operatorname{tr}(H\Sigma_B)`.
        value_batch_stderr: its standard error.
        trace_sigma_batch: ``batch_factor * trace_sigma``.
        isotropic_batch: ``batch_factor * isotropic``.
        isotropic_batch_stderr: its standard error.
        quadratic_forms: :math:`c_i^T H c_i` of the samples used, float64
            (left out of :meth:`to_dict`).
        indices: their positions in a pass over the data (left out of
            :meth:`to_dict`).
        definition: what was computed.
        parameters: settings, and the objective's :meth:`~Objective.info`.
        cost: counters spent (``noise_hvps``, ``trace_hvps``), products, data
            passes and seconds.
    """

    value: float
    stderr: float
    trace_sigma: float
    trace_h: float
    trace_h_stderr: float
    trace_h_method: str
    isotropic: float
    isotropic_stderr: float
    ratio: float
    ratio_stderr: float
    samples: int
    n_samples: int
    dim: int
    batch_size: int | None
    batch_factor: float | None
    value_batch: float | None
    value_batch_stderr: float | None
    trace_sigma_batch: float | None
    isotropic_batch: float | None
    isotropic_batch_stderr: float | None
    quadratic_forms: Tensor
    indices: Tensor
    bulky: ClassVar[tuple[str, ...]] = ("quadratic_forms", "indices")

    def scalars(self) -> dict[str, float]:
        """``value`` and ``stderr``, the ratio, the traces, and the minibatch versions."""
        names = (
            "value",
            "stderr",
            "ratio",
            "ratio_stderr",
            "trace_sigma",
            "trace_h",
            "trace_h_stderr",
            "isotropic",
            "value_batch",
            "value_batch_stderr",
            "trace_sigma_batch",
            "isotropic_batch",
        )
        return {
            n: float(getattr(self, n)) for n in names if getattr(self, n) is not None
        }


def _check_int(value: object, name: str, low: int, high: int, fix: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not low <= value <= high
    ):
        raise ValueError(
            f"{name} must be an integer with {low} <= {name} <= {high}; got "
            f"{name}={value!r}. {fix}"
        )
    return value


def _check_settings(
    obj: Objective,
    batch_size: object,
    samples: object,
    trace_probes: object,
    chunk_size: object,
    seed: object,
) -> tuple[int, int | None]:
    """Refuse bad settings before any work; ``(samples used, batch size)``."""
    if obj.data_parallel:
        raise ValueError(
            "noise_curvature multiplies the Hessian with the per-sample gradients "
            "of this process's data and does not combine ranks; build the "
            "Objective with data_parallel=False (on one process's data)."
        )
    n = obj.n_samples
    if n < 2:
        raise ValueError(
            f"noise_curvature needs at least 2 samples (a covariance of per-sample "
            f"gradients); the data has {n}."
        )
    if batch_size is not None:
        batch_size = _check_int(
            batch_size,
            "batch_size",
            1,
            n,
            f"The minibatch size B must lie in [1, N = {n}] (the number of "
            "samples), or pass None for no minibatch versions.",
        )
        if obj.loss_reduction.minibatch_scale(obj.loss_totals()) is None:
            raise ValueError(
                "noise_curvature(batch_size=...) scales Sigma to the covariance of "
                "a minibatch mean of per-sample gradients, which is the minibatch "
                "gradient only when the loss is a plain mean (or sum) over samples; "
                f"the loss {obj.loss_reduction.description} is a weighted mean "
                "(class weights, ignored targets or a normalizer of its own), whose "
                "minibatch gradient is a ratio. Pass batch_size=None; value and "
                "trace_sigma are exact for every loss."
            )
    if samples is None:
        samples = n
    samples = _check_int(
        samples,
        "samples",
        2,
        n,
        f"Pass at most N = {n} (the number of samples; None uses all of them, "
        "exactly) and at least 2 (the standard error needs two).",
    )
    if (
        isinstance(trace_probes, bool)
        or not isinstance(trace_probes, int)
        or trace_probes < 2
    ):
        raise ValueError(
            "trace_probes must be an integer >= 2 (the budget of Hessian products "
            f"for tr(H); >= D = {obj.dim} gives it exactly); got {trace_probes!r}."
        )
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int)
        or chunk_size < 1
    ):
        raise ValueError(
            "chunk_size must be a positive integer (Hessian-vector products per "
            f"call; smaller uses less memory); got {chunk_size!r}."
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}.")
    return samples, batch_size


def _check_decomposes(
    obj: Objective, theta: Tensor, x: Tensor, y: Tensor, G: Tensor
) -> None:
    """Refuse a loss or model whose per-sample gradients do not add up to the batch's.

    For a loss that is a sum of per-sample terms, the mean of the rows of
    :meth:`Objective.per_sample_grad` times ``n_b / N`` is the gradient of the
    batch's term; a loss (or model) that couples the samples of a batch breaks
    that, and per-sample gradients then mean nothing.
    """
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        (gb,) = torch.autograd.grad(obj.batch_term(t, x, y), t, allow_unused=True)
    gb = torch.zeros_like(theta) if gb is None else gb
    n_total = obj.n_samples
    total = G.sum(0) / n_total
    gap = float((total - gb).double().norm())
    scale = float(G.double().norm(dim=1).sum()) / n_total
    tol = 10 * math.sqrt(torch.finfo(G.dtype).eps)
    if gap > tol * scale + torch.finfo(torch.float64).tiny:
        raise ValueError(
            "noise_curvature needs per-sample gradients, so the loss must be a sum "
            "of per-sample terms (a mean over samples, a sum, or a weighted mean); "
            f"on the first batch the per-sample gradients of the loss "
            f"{obj.loss_reduction.description} do not add up to the batch's "
            f"gradient (relative gap {gap / max(scale, 1e-300):.2g}): the loss or "
            "the model couples the samples of a batch. Use a loss whose batch value "
            "is the mean of per-sample losses, or declare its reduction (see "
            "docs/objective.md)."
        )


def _quadratic_forms(
    obj: Objective,
    H: HessianOperator,
    theta: Tensor,
    g: Tensor,
    chosen: Tensor,
    chunk_size: int,
) -> tuple[Tensor, float, Tensor]:
    r"""One pass of per-sample gradients: :math:`c_i^T H c_i` of the chosen samples.

    The chosen centred gradients wait in a block until ``chunk_size`` of them are
    there, then go through the Hessian together. Returns the quadratic forms in
    pass order (float64, CPU), :math:`\sum_i \|g_i - g\|^2` and :math:`\sum_i g_i`
    (float64).
    """
    forms: list[Tensor] = []
    pending: list[Tensor] = []
    waiting = 0

    def flush() -> None:
        nonlocal waiting
        block = torch.cat(pending)
        pending.clear()
        waiting = 0
        for lo in range(0, block.shape[0], chunk_size):
            C = block[lo : lo + chunk_size]
            HC = H @ C.T.contiguous()
            forms.append((C.double() * HC.T.double()).sum(1).cpu())

    sq = torch.zeros((), dtype=torch.float64, device=theta.device)
    g_sum = torch.zeros(theta.shape, dtype=torch.float64, device=theta.device)
    start = 0
    flags: list[Tensor] = []
    with obj.probe_mode():
        for index, (x, y) in enumerate(obj.batches()):
            try:
                G = obj.per_sample_grad(theta, x, y)
            except (IndexError, RuntimeError) as err:
                obj.explain_failed_batch(index, x, y, err)
                raise
            flags.append(torch.isfinite(G.sum()))
            if not bool(flags[-1]):
                obj.raise_non_finite("per-sample gradient", torch.stack(flags))
            if index == 0:
                _check_decomposes(obj, theta, x, y, G)
            g_sum += G.sum(0, dtype=torch.float64)
            C = G - g
            sq += C.pow(2).sum(dtype=torch.float64)
            keep = chosen[start : start + G.shape[0]].to(G.device)
            start += G.shape[0]
            if bool(keep.any()):
                pending.append(C[keep])
                waiting += pending[-1].shape[0]
            if waiting >= chunk_size:
                flush()
    obj.counters.passes += 1
    obj.counters.per_sample_grad += 1
    if pending:
        flush()
    q = torch.cat(forms) if forms else torch.zeros(0, dtype=torch.float64)
    return q, float(sq), g_sum


def noise_curvature(
    obj: Objective,
    *,
    batch_size: int | None = None,
    samples: int | None = None,
    trace_probes: int = 100,
    seed: int = 0,
    chunk_size: int = 32,
    theta: Tensor | None = None,
) -> NoiseCurvatureResult:
    r"""The escaping indicator :math:`\operatorname{tr}(H\Sigma)` and its isotropic ratio.

    ``value`` :math:`= \operatorname{tr}(H\Sigma) = \frac1N\sum_i c_i^T H c_i`
    with :math:`c_i = g_i - g` the centred per-sample gradients (Zhu et al.
    2019: the noise's escaping efficiency; a noisy step
    :math:`\theta - \eta(g + \varepsilon)`, :math:`\operatorname{Cov}
    \varepsilon = \Sigma`, raises the expected loss by
    :math:`\frac{\eta^2}{2}\operatorname{tr}(H\Sigma)` to second order).
    ``isotropic`` :math:`= \operatorname{tr}H\operatorname{tr}\Sigma / D` is
    the same for isotropic noise of equal total variance, and ``ratio`` =
    ``value / isotropic``: above 1 the noise sits in high-curvature directions.

    Exact with ``N`` Hessian-vector products (``chunk_size`` per call), or, with
    ``samples = n < N``, the mean of :math:`c_i^T H c_i` over ``n`` samples
    drawn without replacement (seeded): unbiased, with standard error
    :math:`\sqrt{(1 - n/N)\, s^2 / n}` (:math:`s^2` their sample variance).
    :math:`\operatorname{tr}\Sigma` is exact; :math:`\operatorname{tr}H` comes
    from :func:`lossgeom.trace` with ``trace_probes`` products (exact when
    ``trace_probes >= D``, else Hutch++ or Hutchinson with a standard error).
    With ``batch_size = B`` every quantity is also given for the noise of a
    minibatch mean of ``B`` of the ``N`` gradients drawn without replacement,
    whose covariance is :math:`\frac{N - B}{B(N - 1)}\Sigma`.

    Args:
        obj: the objective (``mode="eval"``; a loss that is a sum of
            per-sample terms).
        batch_size: ``B`` in ``[1, N]`` for the minibatch versions (default:
            none).
        samples: quadratic forms to compute, in ``[2, N]`` (default ``N``:
            exact).
        trace_probes: Hessian products for :math:`\operatorname{tr}H` (at least
            2; ``>= D`` gives it exactly).
        seed: seed of the subset (``seed``) and of the trace probes
            (``seed + 1``).
        chunk_size: Hessian-vector products per call (bounds memory).
        theta: where (default: the model's parameters).

    Returns:
        A :class:`NoiseCurvatureResult`.

    Example:
        >>> import torch, lossgeom as lg
        >>> X = torch.randn(40, 3, dtype=torch.float64); y = torch.randn(40, 1, dtype=torch.float64)
        >>> obj = lg.Objective(torch.nn.Linear(3, 1).double(), torch.nn.MSELoss(), (X, y))
        >>> res = noise_curvature(obj)
        >>> H = lg.testing.exact_hessian(obj); S = lg.testing.exact_gradient_covariance(obj)
        >>> abs(res.value - float((H * S).sum())) < 1e-10 * res.value
        True
        >>> abs(res.isotropic - float(H.trace() * S.trace()) / 4) < 1e-10 * res.isotropic
        True
    """
    what = "noise_curvature"
    obj = _check_objective(obj, what)
    _require_per_sample(obj, what)
    n_used, batch_size = _check_settings(
        obj, batch_size, samples, trace_probes, chunk_size, seed
    )
    theta = obj.check_theta(theta)
    n_total, dim = obj.n_samples, obj.dim
    exact = n_used == n_total
    if exact:
        chosen = torch.ones(n_total, dtype=torch.bool)
    else:
        gen = torch.Generator().manual_seed(seed)
        chosen = torch.zeros(n_total, dtype=torch.bool)
        chosen[torch.randperm(n_total, generator=gen)[:n_used]] = True
    with timed(obj) as meter:
        H = hessian(obj, theta)
        g = H.gradient()
        q, sq, g_sum = _quadratic_forms(obj, H, H.theta, g, chosen, chunk_size)
        tr = trace(H, trace_probes, seed=seed + 1)
        backend = H.backend_used
        H.release()
    # tr(Sigma) about the mean of the g_i: (1/N) sum |g_i - g|^2 - |mean - g|^2
    delta = g_sum / n_total - g.double()
    trace_sigma = max(sq / n_total - float(delta.pow(2).sum()), 0.0)
    value = float(q.mean())
    stderr = (
        0.0 if exact else math.sqrt((1 - n_used / n_total) * float(q.var()) / n_used)
    )
    T, dT = tr.value, tr.stderr
    isotropic = T * trace_sigma / dim
    iso_err = abs(trace_sigma / dim) * dT
    if isotropic != 0:
        ratio = value / isotropic
        ratio_err = math.hypot(stderr / isotropic, ratio * dT / T)
    else:
        ratio = ratio_err = math.nan
    batch: dict = dict.fromkeys(
        (
            "batch_factor",
            "value_batch",
            "value_batch_stderr",
            "trace_sigma_batch",
            "isotropic_batch",
            "isotropic_batch_stderr",
        )
    )
    if batch_size is not None:
        c = _fpc(n_total, batch_size)
        batch.update(
            batch_factor=c,
            value_batch=c * value,
            value_batch_stderr=c * stderr,
            trace_sigma_batch=c * trace_sigma,
            isotropic_batch=c * isotropic,
            isotropic_batch_stderr=c * iso_err,
        )
    how = (
        "exact over all N samples"
        if exact
        else f"mean over {n_used} of N = {n_total} samples drawn without replacement "
        "(finite-population standard error, Cochran 1977)"
    )
    return NoiseCurvatureResult(
        value=value,
        stderr=stderr,
        trace_sigma=trace_sigma,
        trace_h=T,
        trace_h_stderr=dT,
        trace_h_method=tr.method,
        isotropic=isotropic,
        isotropic_stderr=iso_err,
        ratio=ratio,
        ratio_stderr=ratio_err,
        samples=n_used,
        n_samples=n_total,
        dim=dim,
        batch_size=batch_size,
        **batch,
        quadratic_forms=q,
        indices=chosen.nonzero().flatten(),
        definition=(
            f"{ESCAPE}; {SIGMA}; {ISOTROPIC}; value {how}; tr(H) by {tr.method}"
            + (f"; {BATCH}" if batch_size is not None else "")
        ),
        parameters={
            "batch_size": batch_size,
            "samples": samples,
            "trace_probes": trace_probes,
            "seed": seed,
            "chunk_size": chunk_size,
            "objective": obj.info(),
        },
        details={"trace_h": tr.details, "hessian_backend": backend},
        cost=meter.cost.add(noise_hvps=n_used, trace_hvps=tr.cost.matvecs),
    )
