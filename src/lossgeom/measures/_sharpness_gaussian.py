"""Sharpness under Gaussian perturbations: the average loss rise, the PAC-Bayes sigma.

Kinds ``"average"`` (:func:`_average`, Monte Carlo) and ``"pac_bayes"``
(:func:`_pac_bayes`, the magnitude-aware sigma of Jiang et al. 2020, by
bisection) of :func:`~lossgeom.measures.sharpness`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lossgeom.measures._sharpness_base import _Outcome
from lossgeom.objective import Objective

__all__ = ["_average", "_pac_bayes"]

# Points sent to Objective.evaluate at once are bounded to about this many bytes.
_POINT_BYTES = 2**28


def _block_size(theta: Tensor, samples: int) -> int:
    """Points per :meth:`Objective.evaluate` call (one data pass each)."""
    per_point = theta.numel() * 8  # drawn in float64
    return max(1, min(samples, _POINT_BYTES // max(per_point, 1)))


def _average(
    obj: Objective,
    theta: Tensor,
    scale: Tensor | None,
    sigma: float,
    samples: int,
    chunk_size: int | None,
    seed: int,
) -> _Outcome:
    base = obj.loss(theta)
    gen = torch.Generator().manual_seed(int(seed))
    rises = []
    block = _block_size(theta, samples)
    for start in range(0, samples, block):
        m = min(block, samples - start)
        Z = torch.randn(m, theta.numel(), generator=gen, dtype=torch.float64)
        Z = Z.to(device=theta.device, dtype=theta.dtype) * sigma
        D = Z if scale is None else Z * scale
        rises.append(obj.evaluate(theta + D, chunk_size=chunk_size).double() - base)
    rise = torch.cat(rises).cpu()
    bad = ~torch.isfinite(rise)
    if bool(bad.any()):
        raise ValueError(
            f"the loss was not finite at {int(bad.sum())} of {samples} Gaussian "
            f"perturbations of sigma={sigma:g} (first at sample "
            f"{int(bad.nonzero()[0])}); use a smaller radius."
        )
    mean = float(rise.mean())
    stderr = float(rise.std(unbiased=True)) / math.sqrt(samples)
    details = {
        "base_loss": base,
        "mean_loss": base + mean,
        "std": float(rise.std(unbiased=True)),
        "max_increase": float(rise.max()),
        "samples": samples,
    }
    return _Outcome(mean, stderr, details)


def _pac_bayes(
    obj: Objective,
    theta: Tensor,
    sigma_hi: float,
    samples: int,
    target: float,
    eps: float,
    tol: float,
    chunk_size: int | None,
    seed: int,
) -> _Outcome:
    if not obj.knows_accuracy:
        raise ValueError(
            "kind='pac_bayes' needs training accuracy: outputs (n, C>1) and integer "
            "class targets (n,); this objective has none. Use a classification "
            "model and loss, or another kind."
        )
    base = float(obj.evaluate_metrics(theta.unsqueeze(0))["accuracy"][0])
    block = _block_size(theta, samples)
    history: dict[float, tuple[float, float]] = {}

    def accuracy(sigma: float) -> tuple[float, float]:
        if sigma not in history:
            std = (sigma**2 * theta.square() + eps**2).sqrt()
            gen = torch.Generator().manual_seed(int(seed))  # same draws every sigma
            accs = []
            for start in range(0, samples, block):
                m = min(block, samples - start)
                Z = torch.randn(m, theta.numel(), generator=gen, dtype=torch.float64)
                Z = Z.to(device=theta.device, dtype=theta.dtype)
                metrics = obj.evaluate_metrics(theta + Z * std, chunk_size=chunk_size)
                accs.append(metrics["accuracy"].double().cpu())
            a = torch.cat(accs)
            history[sigma] = (float(a.mean()), float(a.std()) / math.sqrt(samples))
        return history[sigma]

    def drop(sigma: float) -> float:
        return base - accuracy(sigma)[0]

    lo, hi = 0.0, sigma_hi
    doublings = 0
    while drop(hi) <= target and doublings < 30:
        lo, hi, doublings = hi, 2 * hi, doublings + 1
    bracketed = drop(hi) > target
    if bracketed:
        for _ in range(60):
            if hi - lo <= tol * hi:
                break
            if lo == 0.0 and hi < 1e-6 * sigma_hi:
                break  # the floor noise eps alone already drops accuracy too much
            mid = 0.5 * (lo + hi)
            if drop(mid) > target:
                hi = mid
            else:
                lo = mid
    # Not bracketed: no sigma up to hi drops the accuracy by the target, so the
    # answer is "larger than hi"; report inf (hi is in details), not hi itself.
    sigma = lo if bracketed else math.inf
    acc, acc_err = accuracy(lo if bracketed else hi)
    details = {
        "base_accuracy": base,
        "accuracy": acc,
        "accuracy_stderr": acc_err,
        "accuracy_drop": base - acc,
        "bracket": [lo, hi],
        "bracketed": bracketed,
        "flatness": 1.0 / sigma**2 if sigma > 0 else math.inf,
        "sigma_tested_up_to": hi,
        "history": [[s, base - a] for s, (a, _) in sorted(history.items())],
    }
    return _Outcome(sigma, None, details)
