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
from lossgeom.theory._rmt import (
    bbp_threshold,
    marchenko_pastur,
    marchenko_pastur_cdf,
    mp_edges,
    spiked_outliers,
)
from lossgeom.theory._rmt_fit import fit_marchenko_pastur
from lossgeom.theory._rmt_outliers import MarchenkoPasturOutliers, count_outliers
from lossgeom.theory._rmt_results import MarchenkoPasturFit
from lossgeom.theory._sde import SDEPath, sgd_temperature, simulate_sde
from lossgeom.theory._sde_base import (
    BatchedLoss,
    ObjectiveLoss,
    batched_loss,
    hessian_at,
)
from lossgeom.theory._sde_basins import BasinOccupancy, basin_occupancy
from lossgeom.theory._sde_rates import (
    EscapeRate,
    KramersRate,
    escape_rate,
    kramers_rate,
)
from lossgeom.theory._sde_sgd import simulate_sgd, simulate_sgd_sde

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
    # random matrices: Marchenko-Pastur, spiked covariance, outliers
    "MarchenkoPasturFit",
    "MarchenkoPasturOutliers",
    "bbp_threshold",
    "count_outliers",
    "fit_marchenko_pastur",
    "marchenko_pastur",
    "marchenko_pastur_cdf",
    "mp_edges",
    "spiked_outliers",
    # SGD as a stochastic differential equation
    "BatchedLoss",
    "ObjectiveLoss",
    "SDEPath",
    "batched_loss",
    "hessian_at",
    "sgd_temperature",
    "simulate_sde",
    "simulate_sgd",
    "simulate_sgd_sde",
    # stationary measure, basins and escape rates of the SDE
    "BasinOccupancy",
    "EscapeRate",
    "KramersRate",
    "basin_occupancy",
    "escape_rate",
    "kramers_rate",
]
