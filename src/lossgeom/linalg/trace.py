"""Stochastic trace estimation with standard errors: Hutchinson and Hutch++.

* Hutchinson (1989): ``tr(A) ~ mean_i z_i^T A z_i`` with Rademacher ``z_i``;
  variance ``2 (||A||_F^2 - sum_i A_ii^2) / m``.
* XTrace (Epperly, Tropp & Webber 2024): half the budget sketches ``Y = A W``, half
  computes ``A Q``; every probe ``w_i`` gets a Hutch++-style estimate with the
  low-rank part built from the *other* probes, and the estimates are averaged
  (exchangeable: every probe is used both ways). Computed exactly as defined,
  from the shared products, with one small QR per probe.
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021): a third of the budget sketches
  the range of ``A`` (``Q = orth(A S)``), a third computes ``tr(Q^T A Q)``
  exactly, the last third runs Hutchinson on the deflated
  ``(I - QQ^T) A (I - QQ^T)``; error ``O(1/m)`` instead of ``O(1/sqrt(m))`` when
  the spectrum decays.

The standard error is the sample standard deviation of the random part divided by
the square root of its number of probes; the deterministic part of Hutch++ adds
no error. Written here (not taken from a library) to get error bars, batched
probes (one product call per round) and adaptive stopping on ``rel_tol``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lossgeom._results import Cost, Result
from lossgeom.linalg._operator import SymmetricOperator, apply_checked, working

__all__ = ["TraceResult", "trace_estimate"]

Method = Literal["auto", "hutchinson", "hutch++", "xtrace"]


TRACE_DEFINITION = (
    "tr(A) = sum_i A_ii of a symmetric operator, estimated from products with "
    "random sign vectors: Hutchinson (1989), Hutch++ (Meyer, Musco, Musco and "
    "Woodruff 2021) or XTrace (Epperly, Tropp and Webber 2024)"
)


@dataclass(frozen=True)
class TraceResult(Result):
    """A trace estimate with its error bar.

    Attributes:
        value: the estimate.
        stderr: its standard error (sample standard deviation of the random part
            over the square root of its probes).
        method: what ran: ``"hutchinson"``, ``"hutch++"``, ``"xtrace"`` or
            ``"exact"`` (under ``"auto"`` with a budget of at least ``d``).
        n_probes: random probes in the stochastic part.
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`; ``details`` holds the exact low-rank part
            of Hutch++ and the automatic decision.
    """

    value: float
    stderr: float
    method: str
    n_probes: int
    definition: str = field(default=TRACE_DEFINITION, kw_only=True)


def _rademacher(
    d: int, m: int, gen: torch.Generator, like: SymmetricOperator
) -> Tensor:
    bits = torch.randint(0, 2, (d, m), generator=gen, device=like.device)
    return (2 * bits - 1).to(like.dtype)


def _hutchinson_rounds(
    op: SymmetricOperator,
    project: Tensor | None,
    budget: int,
    round_size: int,
    rel_tol: float | None,
    offset: float,
    gen: torch.Generator,
) -> tuple[Tensor, int]:
    """Samples z^T P A P z in rounds; stop early once the stderr meets ``rel_tol``."""
    d = op.shape[0]
    samples: list[Tensor] = []
    used = 0
    while used < budget:
        m = min(round_size, budget - used)
        Z = _rademacher(d, m, gen, op)
        if project is not None:
            Z = Z - project @ (project.T @ Z)
        samples.append((Z * apply_checked(op, Z)).sum(0))
        used += m
        if rel_tol is not None:
            s = torch.cat(samples).double()
            if s.numel() >= 2:
                value = offset + float(s.mean())
                err = float(s.std() / math.sqrt(s.numel()))
                if err <= rel_tol * abs(value):
                    break
    return torch.cat(samples).double(), used


def trace_estimate(
    op: SymmetricOperator,
    max_matvecs: int = 100,
    *,
    method: Method = "auto",
    seed: int = 0,
    rel_tol: float | None = None,
    round_size: int = 10,
) -> TraceResult:
    """Estimate ``tr(A)`` with a standard error.

    ``method="auto"`` sketches first, as Hutch++ does, then predicts the variance
    of finishing with Hutch++ (Hutchinson on the deflated operator, whose
    Frobenius norm follows from the sketch) or with plain Hutchinson on the
    remaining budget, and finishes with the smaller one.

    Args:
        op: symmetric operator.
        max_matvecs: budget of products. With ``method="auto"`` a budget of at
            least ``d`` buys the exact trace, ``sum_i e_i^T A e_i``, with ``d``
            products (``method="exact"``, ``stderr`` 0), and no more are spent.
        method: ``"auto"``, ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        seed: seed of the probes.
        rel_tol: stop early once ``stderr <= rel_tol * |value|`` (checked after
            every round of ``round_size`` probes).
        round_size: probes per product call in the stochastic part.

    Returns:
        A :class:`TraceResult`.

    Example:
        >>> from lossgeom.linalg import DenseOperator
        >>> A = torch.diag(torch.linspace(0, 1, 200, dtype=torch.float64) ** 4)
        >>> est = trace_estimate(DenseOperator(A), 60, method="hutch++")
        >>> abs(est.value - A.trace().item()) <= 3 * est.stderr
        True
    """
    start = time.perf_counter()
    if method not in ("auto", "hutchinson", "hutch++", "xtrace"):
        raise ValueError(
            "method must be 'auto', 'hutchinson', 'hutch++' or 'xtrace'; got "
            f"{method!r}."
        )
    if not isinstance(max_matvecs, int) or max_matvecs < 2:
        raise ValueError(f"max_matvecs must be an integer >= 2; got {max_matvecs!r}.")
    if rel_tol is not None and not rel_tol > 0:
        raise ValueError(f"rel_tol must be positive or None; got {rel_tol!r}.")
    if round_size < 2:
        raise ValueError(f"round_size must be >= 2; got {round_size!r}.")
    op = working(op)  # sketches are orthogonalised in float32 at least
    d = op.shape[0]
    gen = torch.Generator(device=op.device).manual_seed(seed)

    if method == "auto" and max_matvecs >= d:
        return _exact_trace(op, round_size, start)
    if method == "xtrace":
        if max_matvecs < 4:
            raise ValueError(f"xtrace needs max_matvecs >= 4; got {max_matvecs}.")
        return _xtrace(op, max_matvecs, gen, start)
    if method == "hutchinson" or (method == "auto" and max_matvecs < 6):
        samples, used = _hutchinson_rounds(
            op, None, max_matvecs, round_size, rel_tol, 0.0, gen
        )
        return _result(samples, 0.0, used, "hutchinson", start, {"requested": method})

    s = max(1, min(max_matvecs // 3, d))
    S = _rademacher(d, s, gen, op)
    Y = apply_checked(op, S)
    pilot = (S * Y).sum(0).double()  # Hutchinson samples for free
    Q, _ = torch.linalg.qr(Y)
    info: dict = {"requested": method, "sketch_size": s}
    Z = apply_checked(op, Q)  # A Q
    exact = float(torch.einsum("ij,ij->", Q.double(), Z.double()))  # tr(Q^T A Q)
    remaining = max_matvecs - s - Q.shape[1]
    info["exact_part"] = exact
    if Q.shape[1] >= d:  # the sketch spans the whole space: the trace is exact
        return _result(
            torch.zeros(2, dtype=torch.float64), exact, s + d, "hutch++", start, info
        )
    if method == "auto" and remaining >= 4:
        # One round on the deflated operator, then predict both finishes from the
        # sample variances: the pilot's (Hutchinson on A) and this round's.
        r = min(round_size, remaining // 2)
        first, _ = _hutchinson_rounds(op, Q, r, r, None, exact, gen)
        var_h = float(pilot.var()) if pilot.numel() > 1 else float("inf")
        var_pp = float(first.var())
        n_h = s + remaining - r  # pilot + what is left if we switch
        n_pp = remaining
        info["predicted_stderr_hutchinson"] = math.sqrt(var_h / n_h)
        info["predicted_stderr_hutch++"] = math.sqrt(var_pp / n_pp)
        if var_h / n_h < var_pp / n_pp:
            more, used = _hutchinson_rounds(
                op, None, remaining - r, round_size, rel_tol, 0.0, gen
            )
            info.pop("exact_part")
            info["discarded_matvecs"] = Q.shape[1] + r
            samples = torch.cat([pilot, more])
            return _result(
                samples, 0.0, s + Q.shape[1] + r + used, "hutchinson", start, info
            )
        rest, used = _hutchinson_rounds(
            op, Q, remaining - r, round_size, rel_tol, exact, gen
        )
        samples = torch.cat([first, rest])
        return _result(
            samples, exact, s + Q.shape[1] + r + used, "hutch++", start, info
        )
    samples, used = _hutchinson_rounds(
        op, Q, max(remaining, 2), round_size, rel_tol, exact, gen
    )
    return _result(samples, exact, s + Q.shape[1] + used, "hutch++", start, info)


def _exact_trace(op: SymmetricOperator, block: int, start: float) -> TraceResult:
    """``sum_i e_i^T A e_i`` with ``d`` products, ``block`` at a time."""
    d = op.shape[0]
    total = 0.0
    for lo in range(0, d, block):
        hi = min(lo + block, d)
        E = torch.zeros(d, hi - lo, dtype=op.dtype, device=op.device)
        E[torch.arange(lo, hi), torch.arange(hi - lo)] = 1
        total += float(apply_checked(op, E)[lo:hi].diagonal().double().sum())
    return TraceResult(
        value=total,
        stderr=0.0,
        method="exact",
        n_probes=0,
        details={"requested": "auto"},
        cost=Cost(matvecs=d, seconds=time.perf_counter() - start),
    )


def leave_one_out_bases(R: Tensor) -> list[Tensor]:
    """For ``Y = Q R``, coefficient bases of ``span(Y without column i)``, one per ``i``."""
    k = R.shape[1]
    bases = []
    for i in range(k):
        cols = torch.cat([R[:, :i], R[:, i + 1 :]], 1)
        U, _ = torch.linalg.qr(cols)
        bases.append(U)
    return bases


def _xtrace(
    op: SymmetricOperator, max_matvecs: int, gen: torch.Generator, start: float
) -> TraceResult:
    d = op.shape[0]
    k = max(2, min(max_matvecs // 2, d))
    W = _rademacher(d, k, gen, op)
    Y = apply_checked(op, W)  # A W
    Q, R = torch.linalg.qr(Y)
    Z = apply_checked(op, Q)  # A Q
    QtZ, QtW, QtY = Q.T @ Z, Q.T @ W, Q.T @ Y
    # w_i . A w_i, from the sketch
    wAw = (W * Y).sum(0)
    estimates = []
    for i, U in enumerate(leave_one_out_bases(R)):
        # Q_i = Q U: low-rank part from the other probes
        B = U.T @ QtZ @ U  # Q_i^T A Q_i
        low_rank = B.trace()
        c = U.T @ QtW[:, i]  # Q_i^T w_i
        g = U.T @ QtY[:, i]  # Q_i^T A w_i
        # w^T (I - P) A (I - P) w, P = Q_i Q_i^T
        resid = wAw[i] - 2 * torch.dot(c, g) + c @ B @ c
        estimates.append(low_rank + resid)
    samples = torch.stack(estimates).double()
    res = _result(samples, 0.0, 2 * k, "xtrace", start, {"sketch_size": k})
    return res


def _result(
    samples: Tensor, offset: float, n_mv: int, method: str, start: float, info: dict
) -> TraceResult:
    n = samples.numel()
    value = offset + float(samples.mean())
    stderr = float(samples.std() / math.sqrt(n)) if n > 1 else float("inf")
    return TraceResult(
        value=value,
        stderr=stderr,
        method=method,
        n_probes=n,
        details=info,
        cost=Cost(matvecs=n_mv, seconds=time.perf_counter() - start),
    )
