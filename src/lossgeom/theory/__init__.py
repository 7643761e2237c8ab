"""Layer 2: theory: generalization bounds (PAC-Bayes, Occam) and their algebra."""

from lossgeom.theory._gaussian import StructuredCovariance, gaussian_kl
from lossgeom.theory._kl import (
    kl_bernoulli,
    kl_inverse,
    langford_caruana_bound,
    occam_bound,
    pac_bayes_kl_bound,
    pac_bayes_mc_bound,
)
from lossgeom.theory._pacbayes import DEFAULT_PRIOR_SIGMAS, pac_bayes_bounds
from lossgeom.theory._pacbayes_results import (
    GaussianPosteriorBound,
    PacBayesResult,
    ParameterCountBound,
)

__all__ = [
    # PAC-Bayes bounds on a trained classifier
    "DEFAULT_PRIOR_SIGMAS",
    "GaussianPosteriorBound",
    "PacBayesResult",
    "ParameterCountBound",
    "pac_bayes_bounds",
    # the scalar algebra of kl bounds
    "kl_bernoulli",
    "kl_inverse",
    "langford_caruana_bound",
    "occam_bound",
    "pac_bayes_kl_bound",
    "pac_bayes_mc_bound",
    # Gaussians with a structured covariance
    "StructuredCovariance",
    "gaussian_kl",
]
