"""Layer 4: statistics on studies, each answer a result with its verdict.

Tests and estimates come from ``scipy.stats`` and ``statsmodels``; every function
returns a result on the common base (:class:`lossgeom.Result`) that states its
claim, test, sample size, effect with its confidence interval, p-value, verdict
and caveats.
"""

from lossgeom.analysis._base import (
    BootstrapCI,
    GranulatedKendall,
    Score,
    TestResult,
    decide_verdict,
)
from lossgeom.analysis._escape import escape_times
from lossgeom.analysis._hypotheses import (
    HYPOTHESES,
    HypothesisResult,
    analyze,
    h1,
    h2,
    h3,
    h4,
    h5,
)
from lossgeom.analysis._predict import auroc, compare_cv_r2, cv_r2
from lossgeom.analysis._rank import granulated_kendall, kendall
from lossgeom.analysis._regression import regression
from lossgeom.analysis._scaling import PowerLawFit, fit_power_law
from lossgeom.analysis._stats import bootstrap_ci, holm, paired_test
from lossgeom.analysis._survival import hazard_regression

__all__ = [
    # hypotheses
    "HYPOTHESES",
    "HypothesisResult",
    "analyze",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "escape_times",
    # statistics
    "BootstrapCI",
    "GranulatedKendall",
    "Score",
    "TestResult",
    "auroc",
    "bootstrap_ci",
    "compare_cv_r2",
    "cv_r2",
    "decide_verdict",
    "granulated_kendall",
    "hazard_regression",
    "holm",
    "kendall",
    "paired_test",
    "regression",
    # scaling laws
    "PowerLawFit",
    "fit_power_law",
]
