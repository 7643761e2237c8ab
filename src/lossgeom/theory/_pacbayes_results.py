"""The results of :func:`~lossgeom.theory.pac_bayes_bounds`: one per bound, and the whole."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from lossgeom._results import Result, register

__all__ = [
    "DEFINITION",
    "GaussianPosteriorBound",
    "PacBayesResult",
    "ParameterCountBound",
]

DEFINITION = (
    "upper bounds on the 0-1 error, holding together with probability >= "
    "1 - delta_total, delta_total = delta + mc_delta. parameter_count: Occam bound "
    "kl^-1(e_S(h_b), (L ln 2 + ln(J/delta))/n) on the network quantized to b bits "
    "per parameter, L = b D + 32 T bits (Langford 2005). isotropic: posterior "
    "N(theta, s^2 I), prior N(theta_0, s^2 I). hessian: posterior "
    "N(theta, c (H_+ + D_+ + eps I)^-1), prior N(theta_0, s^2 I). Both: "
    "kl^-1(kl^-1(e_mc, ln(2/delta')/m), (KL + ln(2 sqrt(n) J/delta))/n), "
    "PAC-Bayes-kl (Seeger 2002; Maurer 2004) with the Monte Carlo bound of "
    "Langford & Caruana (2002), as in Dziugaite & Roy (2017). J = |bits| + "
    "|prior_sigmas| priors share delta; delta' = mc_delta / 2 per Monte Carlo term"
)


@register
@dataclass(frozen=True)
class ParameterCountBound:
    """The Occam bound on the quantized network (bound (a)).

    The bound is about the *quantized* network ``h_b``, not the trained one;
    ``train_error`` and ``test_error`` are the quantized network's.

    Attributes:
        bound: the bound on ``h_b``'s true 0-1 error, for the best ``bits``.
        bits: bits per parameter of the best quantization.
        description_bits: ``L = bits * D + 32 * T``.
        train_error: ``h_b``'s error on the training sample (exact).
        test_error: ``h_b``'s error on the test data (``nan`` without it).
        complexity: ``(L ln 2 + ln(1/delta_each)) / n``, nats per sample.
        delta: the failure probability of each quantization (``delta / J``).
        candidates: one row per ``bits`` of the grid, with the same fields.
    """

    bound: float
    bits: int
    description_bits: int
    train_error: float
    test_error: float
    complexity: float
    delta: float
    candidates: list


@register
@dataclass(frozen=True)
class GaussianPosteriorBound:
    """A PAC-Bayes-kl bound on a Gaussian posterior (bounds (b) and (c)).

    Attributes:
        bound: the bound on the posterior's expected true 0-1 error.
        kl: ``KL(Q || P)`` in nats (exact).
        prior_sigma: the prior's standard deviation, from the grid.
        posterior: the posterior's parameters: ``sigma`` (isotropic) or ``c``,
            ``eps``, ``scale``, ``eps_factor``, ``reference_curvature``
            (curvature: ``c (H_+ + D_+ + eps I)^-1``).
        mc_error: the mean empirical error of ``mc_samples`` fresh draws.
        mc_error_bound: its Langford-Caruana upper bound.
        mc_samples: the number of those draws.
        mc_test_error: the same draws' mean test error (``nan`` without test data;
            an estimate, not a bound).
        complexity: ``(KL + ln(2 sqrt(n) / delta_prior)) / n``.
        delta_prior: the failure probability of the prior's event (``delta / J``).
        delta_mc: the failure probability of the Monte Carlo term.
        candidates: the grid searched: prior sigma, posterior parameters, KL,
            ``selection_error`` (mean of ``selection_samples`` draws; ``nan`` when
            skipped because even zero error could not beat the best so far) and
            ``selection_bound``.
    """

    bound: float
    kl: float
    prior_sigma: float
    posterior: dict
    mc_error: float
    mc_error_bound: float
    mc_samples: int
    mc_test_error: float
    complexity: float
    delta_prior: float
    delta_mc: float
    candidates: list


@dataclass(frozen=True)
class PacBayesResult(Result):
    r"""Three generalization bounds on one trained classifier, with their parts.

    All three hold together with probability at least ``1 - delta_total`` over
    the training sample and the Monte Carlo draws, so the smallest is a valid
    bound too (on its own hypothesis: the quantized network, or a posterior).

    Attributes:
        parameter_count: bound (a), a :class:`ParameterCountBound`.
        isotropic: bound (b), a :class:`GaussianPosteriorBound`.
        hessian: bound (c), a :class:`GaussianPosteriorBound`.
        train_error: the trained network's 0-1 error on the training sample.
        test_error: its test error (``nan`` without test data).
        delta_total: ``delta + mc_delta``.
        n: the training sample's size.
        d: the number of trainable parameters.
        curvature_values: the top eigenvalues computed (before the positive part).
        curvature_residuals: their residual norms.
        curvature_converged: whether every pair met its tolerance.
        curvature_vectors: the Ritz vectors ``V``, ``(d, k)`` float64 (left out of
            :meth:`to_dict`).
        curvature_diagonal: ``D_+``, the clipped diagonal of the operator minus
            ``V diag(lambda_+) V^T``, ``(d,)`` float64 (left out of :meth:`to_dict`).
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`; ``details["delta_budget"]`` lists each
            term's share of ``delta_total``.
    """

    parameter_count: ParameterCountBound
    isotropic: GaussianPosteriorBound
    hessian: GaussianPosteriorBound
    train_error: float
    test_error: float
    delta_total: float
    n: int
    d: int
    curvature_values: Tensor
    curvature_residuals: Tensor
    curvature_converged: bool
    curvature_vectors: Tensor
    curvature_diagonal: Tensor
    bulky: ClassVar[tuple[str, ...]] = ("curvature_vectors", "curvature_diagonal")

    def scalars(self) -> dict[str, float]:
        """The three bounds, the posteriors' KL and errors, train and test error."""
        out = {
            "parameter_count": self.parameter_count.bound,
            "isotropic": self.isotropic.bound,
            "hessian": self.hessian.bound,
            "isotropic_kl": self.isotropic.kl,
            "hessian_kl": self.hessian.kl,
            "isotropic_mc_error": self.isotropic.mc_error,
            "hessian_mc_error": self.hessian.mc_error,
            "train_error": self.train_error,
        }
        if not math.isnan(self.test_error):
            out["test_error"] = self.test_error
        return {k: float(v) for k, v in out.items()}
