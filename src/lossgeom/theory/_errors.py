"""0-1 errors of a classifier at many parameter points, and the quantized network.

:class:`Errors` evaluates points through :meth:`Objective.evaluate_metrics`
(batched with ``vmap``), on the training sample and, when given, the test data;
:func:`parameter_count_bound` is bound (a) of
:func:`~lossgeom.theory.pac_bayes_bounds`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lossgeom.objective import Objective
from lossgeom.theory._kl import occam_bound
from lossgeom.theory._pacbayes_inputs import Options
from lossgeom.theory._pacbayes_results import ParameterCountBound

__all__ = ["Errors", "Sampler", "errors_of", "parameter_count_bound", "quantize"]


def errors_of(obj: Objective, points: Tensor, chunk_size: int | None) -> Tensor:
    """The 0-1 error on ``obj``'s data at each point (float64, a multiple of 1/n).

    A point whose loss is not finite counts as wrong on every sample.
    """
    acc = obj.evaluate_metrics(points, chunk_size=chunk_size)["accuracy"]
    acc = acc.detach().double().cpu()
    err = torch.where(torch.isnan(acc), torch.ones_like(acc), 1.0 - acc)
    n = obj.n_samples
    return (err * n).round() / n


Sampler = Callable[[int, torch.Generator], Tensor]


class Errors:
    """0-1 errors at many parameter points on the training and test data."""

    def __init__(self, obj: Objective, test: Objective | None, chunk: int | None):
        self.obj, self.test, self.chunk = obj, test, chunk
        self.center = obj.theta.double()
        self.block = max(1, min(256, (1 << 27) // obj.dim))  # <= 1 GiB of float64

    def at(self, points: Tensor) -> tuple[Tensor, Tensor | None]:
        train = errors_of(self.obj, points, self.chunk)
        test = None if self.test is None else errors_of(self.test, points, self.chunk)
        return train, test

    def posterior(
        self, sample: Sampler, m: int, gen: torch.Generator, *, test: bool
    ) -> tuple[float, float]:
        """Mean train (and test) error of ``m`` draws ``theta + sample(...)``."""
        train_sum, test_sum, done = 0.0, 0.0, 0
        while done < m:
            k = min(self.block, m - done)
            points = (self.center + sample(k, gen)).to(self.obj.dtype)
            train_sum += float(errors_of(self.obj, points, self.chunk).sum())
            if test and self.test is not None:
                test_sum += float(errors_of(self.test, points, self.chunk).sum())
            done += k
        with_test = test and self.test is not None
        return train_sum / m, (test_sum / m if with_test else math.nan)


def quantize(obj: Objective, theta: Tensor, bits: int) -> Tensor:
    """Uniform symmetric per-tensor quantization to ``bits`` bits.

    Each tensor ``w`` gets the scale ``s = max|w| / (2^(bits-1) - 1)`` rounded to
    float32 (the 32 bits stored per tensor), integer codes
    ``q = clamp(round(w / s), -(2^(bits-1) - 1), 2^(bits-1) - 1)`` (``bits`` each)
    and is decoded as ``q * s`` in the model's dtype (``s = 0``: all zero).
    """
    levels = 2 ** (bits - 1) - 1
    big = torch.finfo(torch.float32).max
    out = []
    for w in obj.unflatten(theta.double()).values():
        top = float(w.abs().max())
        scale = float(torch.tensor(min(top / levels, big), dtype=torch.float32))
        if scale == 0.0:
            out.append(torch.zeros_like(w).reshape(-1))
            continue
        q = torch.clamp(torch.round(w / scale), -levels, levels)
        out.append((q * scale).reshape(-1))
    return torch.cat(out).to(obj.dtype)


def parameter_count_bound(
    errors: Errors, opts: Options, n: int, delta_each: float
) -> ParameterCountBound:
    obj = errors.obj
    n_tensors = len(obj.names)
    points = torch.stack([quantize(obj, obj.theta, b) for b in opts.bits])
    train, test = errors.at(points)
    rows = []
    for i, b in enumerate(opts.bits):
        length = b * obj.dim + 32 * n_tensors
        e = float(train[i])
        rows.append(
            {
                "bound": occam_bound(e, length, n, delta_each),
                "bits": b,
                "description_bits": length,
                "train_error": e,
                "test_error": math.nan if test is None else float(test[i]),
                "complexity": (length * math.log(2) + math.log(1 / delta_each)) / n,
                "delta": delta_each,
            }
        )
    best = min(rows, key=lambda r: (r["bound"], r["bits"]))
    return ParameterCountBound(**best, candidates=rows)
