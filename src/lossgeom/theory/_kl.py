r"""The scalar algebra of kl-form generalization bounds (float64).

* :func:`kl_bernoulli`: :math:`\mathrm{kl}(q\|p) = q\ln\frac qp +
  (1-q)\ln\frac{1-q}{1-p}`, the KL divergence between Bernoulli(q) and
  Bernoulli(p), with its limits at 0 and 1 (``scipy.special.rel_entr``).
* :func:`kl_inverse`: :math:`\mathrm{kl}^{-1}(q, c) = \max\{p \in [q, 1]:
  \mathrm{kl}(q\|p) \le c\}`, the upper inverse every bound below ends in.
* :func:`langford_caruana_bound`: the Monte Carlo term. With ``m`` independent
  draws of the posterior whose empirical errors average :math:`\hat e`, with
  probability at least :math:`1 - \delta'` the posterior's expected empirical
  error is at most :math:`\mathrm{kl}^{-1}(\hat e, \ln(2/\delta')/m)`
  (Langford & Caruana 2002, "(Not) Bounding the True Error", NIPS; used so by
  Dziugaite & Roy 2017, "Computing Nonvacuous Generalization Bounds for Deep
  (Stochastic) Neural Networks with Many More Parameters than Training Data",
  UAI). Each draw's error lies in [0, 1]; the Chernoff bound of a mean of
  [0, 1]-valued variables is at most that of Bernoulli ones (Maurer 2004), so
  the bound holds for them too.
* :func:`pac_bayes_kl_bound`: the PAC-Bayes-kl bound (Seeger 2002, "PAC-Bayesian
  Generalisation Error Bounds for Gaussian Process Classification", JMLR;
  Maurer 2004, "A Note on the PAC Bayesian Theorem", arXiv:cs/0411099): for a
  prior :math:`P` fixed before the sample and :math:`n \ge 8`, with probability
  at least :math:`1 - \delta` over the sample, for every posterior :math:`Q` at
  once, :math:`\mathrm{kl}(e_S(Q)\|e(Q)) \le (\mathrm{KL}(Q\|P) +
  \ln(2\sqrt n/\delta))/n`.
* :func:`pac_bayes_mc_bound`: the two composed, as Dziugaite & Roy (2017) do:
  :math:`e(Q) \le \mathrm{kl}^{-1}(\mathrm{kl}^{-1}(\hat e, \ln(2/\delta')/m),
  (\mathrm{KL} + \ln(2\sqrt n\,K/\delta))/n)` for a grid of ``K`` priors,
  at confidence :math:`1 - \delta - \delta'` (the union bound gives each prior
  :math:`\delta/K`; ``kl_inverse`` rises with its first argument, so the Monte
  Carlo upper bound may stand in for the unknown :math:`e_S(Q)`).
* :func:`occam_bound`: a finite class with a prefix code of ``L`` bits for the
  hypothesis (a prior :math:`2^{-L}`): :math:`e(h) \le \mathrm{kl}^{-1}(\hat
  e_S(h), (L\ln 2 + \ln(1/\delta))/n)` for every ``h`` at once (the Chernoff
  bound and a union bound over the class; Langford 2005, "Tutorial on Practical
  Prediction Theory for Classification", JMLR, Occam's Razor bound).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.special import rel_entr

__all__ = [
    "kl_bernoulli",
    "kl_inverse",
    "langford_caruana_bound",
    "occam_bound",
    "pac_bayes_kl_bound",
    "pac_bayes_mc_bound",
]


def _probability(name: str, x: object, fix: str = "") -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number in [0, 1]; got {type(x).__name__}.")
    x = float(x)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be in [0, 1]; got {x!r}.{fix}")
    return x


def _delta(name: str, delta: object) -> float:
    if (
        isinstance(delta, bool)
        or not isinstance(delta, (int, float, np.floating))
        or not 0.0 < float(delta) < 1.0
    ):
        raise ValueError(
            f"{name} must be a probability in (0, 1) (the bound fails with at most "
            f"this probability, e.g. 0.05); got {delta!r}."
        )
    return float(delta)


def _count(name: str, m: object, least: int = 1) -> int:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < least:
        raise ValueError(f"{name} must be an integer >= {least}; got {m!r}.")
    return int(m)


def _nonnegative(name: str, x: object) -> float:
    if (
        isinstance(x, bool)
        or not isinstance(x, (int, float, np.floating, np.integer))
        or not float(x) >= 0.0
    ):
        raise ValueError(f"{name} must be a number >= 0; got {x!r}.")
    return float(x)


def kl_bernoulli(q: float, p: float) -> float:
    r"""The binary KL divergence :math:`\mathrm{kl}(q\|p)` in nats.

    :math:`0 \ln 0 = 0`, and the divergence is ``inf`` where ``p`` is 0 or 1 and
    ``q`` is not.

    Args:
        q: the first Bernoulli parameter, in [0, 1].
        p: the second, in [0, 1].

    Returns:
        :math:`q\ln(q/p) + (1-q)\ln((1-q)/(1-p)) \ge 0`.

    Example:
        >>> kl_bernoulli(0.0, 0.5) == math.log(2.0)
        True
        >>> kl_bernoulli(0.5, 1.0)
        inf
    """
    q, p = _probability("q", q), _probability("p", p)
    return float(rel_entr(q, p) + rel_entr(1.0 - q, 1.0 - p))


def kl_inverse(q: float, c: float) -> float:
    r"""The upper inverse :math:`\max\{p \in [q, 1]: \mathrm{kl}(q\|p) \le c\}`.

    :math:`\mathrm{kl}(q\|\cdot)` rises from 0 at ``q`` to ``inf`` at 1, so the
    answer is its root on ``[q, 1)``, found by ``scipy.optimize.brentq`` to the
    last bits, then raised by a few units in the last place until
    :math:`\mathrm{kl}(q\|p) \ge c`: the result is never below the exact inverse
    (up to the rounding of ``kl`` itself), as an upper bound must be. Exact at the
    edges: ``c = 0`` gives ``q``, ``q = 1`` or ``c = inf`` gives 1, ``q = 0``
    gives :math:`1 - e^{-c}` (one unit in the last place up); when even the largest float below 1 has ``kl <= c``
    the answer is 1.

    Args:
        q: an empirical error, in [0, 1].
        c: a complexity, >= 0 (nats per sample).

    Returns:
        The inverse, in ``[q, 1]``.

    Example:
        >>> kl_inverse(0.1, 0.0)
        0.1
        >>> p = kl_inverse(0.1, 0.05)
        >>> abs(kl_bernoulli(0.1, p) - 0.05) < 1e-12 and p > 0.1
        True
    """
    q, c = _probability("q", q), _nonnegative("c", c)
    if c == 0.0 or q == 1.0:
        return q
    if math.isinf(c):
        return 1.0
    if q == 0.0:  # kl(0 || p) = -ln(1 - p); one ulp up covers expm1's rounding
        return min(1.0, math.nextafter(-math.expm1(-c), 1.0))
    below_one = math.nextafter(1.0, 0.0)

    def excess(p: float) -> float:
        return kl_bernoulli(q, p) - c

    if excess(below_one) <= 0.0:
        return 1.0
    p = brentq(excess, q, below_one, xtol=1e-300, rtol=4 * np.finfo(float).eps)
    for _ in range(64):  # round up: never report less than the inverse
        if excess(p) >= 0.0 or p >= below_one:
            break
        p = math.nextafter(p, 1.0)
    return float(p)


def langford_caruana_bound(mean_error: float, m: int, delta: float) -> float:
    r"""Upper bound on a posterior's expected empirical error from ``m`` draws.

    :math:`\mathrm{kl}^{-1}(\hat e, \ln(2/\delta')/m)`, holding with probability
    at least :math:`1 - \delta'` over the draws (Langford & Caruana 2002; the
    factor 2 of their two-sided statement is kept, as in Dziugaite & Roy 2017).

    Args:
        mean_error: :math:`\hat e`, the mean over the draws of each draw's
            empirical error, in [0, 1].
        m: number of independent draws.
        delta: :math:`\delta'`, the probability the bound may fail.

    Returns:
        The upper bound, in ``[mean_error, 1]``.

    Example:
        >>> b = langford_caruana_bound(0.0, 1000, 0.01)  # closed form at 0
        >>> abs(b - (1 - (0.01 / 2) ** (1 / 1000))) < 1e-15
        True
    """
    e = _probability("mean_error", mean_error)
    m = _count("m", m)
    delta = _delta("delta", delta)
    return kl_inverse(e, math.log(2.0 / delta) / m)


def pac_bayes_kl_bound(
    empirical_error: float, kl: float, n: int, delta: float
) -> float:
    r"""The PAC-Bayes-kl bound :math:`\mathrm{kl}^{-1}(e_S, (\mathrm{KL} + \ln(2\sqrt n/\delta))/n)`.

    Seeger (2002), with Maurer's (2004) constant; needs :math:`n \ge 8`.

    Args:
        empirical_error: the posterior's expected error on the sample, or an
            upper bound on it (e.g. :func:`langford_caruana_bound`).
        kl: :math:`\mathrm{KL}(Q\|P)` in nats.
        n: the sample size.
        delta: the probability the bound may fail (for this one prior).

    Returns:
        The bound on the posterior's expected true error.

    Example:
        >>> b = pac_bayes_kl_bound(0.0, 10.0, 100, 0.05)  # 1 - exp(-c) at 0
        >>> abs(b - (1 - math.exp(-(10 + math.log(20 / 0.05)) / 100))) < 1e-15
        True
    """
    e = _probability("empirical_error", empirical_error)
    kl = _nonnegative("kl", kl)
    n = _count("n", n, least=8)
    delta = _delta("delta", delta)
    return kl_inverse(e, (kl + math.log(2.0 * math.sqrt(n) / delta)) / n)


def pac_bayes_mc_bound(
    mean_error: float,
    m: int,
    kl: float,
    n: int,
    *,
    delta: float,
    mc_delta: float,
    n_priors: int = 1,
) -> float:
    r"""The PAC-Bayes-kl bound on a posterior known through ``m`` draws.

    :math:`\mathrm{kl}^{-1}\big(\mathrm{kl}^{-1}(\hat e, \ln(2/\delta')/m),\,
    (\mathrm{KL} + \ln(2\sqrt n/(\delta/K)))/n\big)`, holding with probability at
    least :math:`1 - \delta - \delta'` over the sample and the draws, with the
    prior picked from a grid of ``K`` fixed in advance (Dziugaite & Roy 2017).

    Args:
        mean_error: mean empirical error of the ``m`` draws.
        m: number of draws (independent of any choice of the posterior).
        kl: :math:`\mathrm{KL}(Q\|P)`.
        n: the sample size (>= 8).
        delta: :math:`\delta`, shared by the ``K`` priors.
        mc_delta: :math:`\delta'`, for the Monte Carlo term.
        n_priors: ``K``, the size of the prior grid.

    Returns:
        The bound on the posterior's expected true error.

    Example:
        >>> b = pac_bayes_mc_bound(0.05, 1000, 20.0, 1000, delta=0.025, mc_delta=0.01)
        >>> 0.05 < b < 1
        True
    """
    delta, mc_delta = _delta("delta", delta), _delta("mc_delta", mc_delta)
    if delta + mc_delta >= 1.0:
        raise ValueError(
            f"delta + mc_delta must be < 1 (the bound holds with probability "
            f"1 - delta - mc_delta); got {delta} + {mc_delta}."
        )
    k = _count("n_priors", n_priors)
    upper = langford_caruana_bound(mean_error, m, mc_delta)
    return pac_bayes_kl_bound(upper, kl, n, delta / k)


def occam_bound(train_error: float, bits: float, n: int, delta: float) -> float:
    r"""The Occam (finite class, kl form) bound :math:`\mathrm{kl}^{-1}(\hat e, (L\ln 2 + \ln(1/\delta))/n)`.

    Holds for every hypothesis of a class described by a prefix code at once,
    ``L`` the length in bits of the hypothesis' code word (Langford 2005).

    Args:
        train_error: the hypothesis' error on the sample.
        bits: ``L``, its description length in bits.
        n: the sample size.
        delta: the probability the bound may fail.

    Returns:
        The bound on the hypothesis' true error.

    Example:
        >>> b = occam_bound(0.0, 10, 100, 0.05)
        >>> abs(b - (1 - 2 ** (-10 / 100) * 0.05 ** (1 / 100))) < 1e-15
        True
    """
    e = _probability("train_error", train_error)
    bits = _nonnegative("bits", bits)
    n = _count("n", n)
    delta = _delta("delta", delta)
    return kl_inverse(e, (bits * math.log(2.0) + math.log(1.0 / delta)) / n)
