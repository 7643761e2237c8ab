"""The result of :func:`~lossgeom.theory.fit_marchenko_pastur`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from lossgeom._results import Result
from lossgeom.theory._rmt import Numbers, marchenko_pastur, marchenko_pastur_cdf

__all__ = ["DEFINITION", "MarchenkoPasturFit"]

DEFINITION = (
    "Marchenko-Pastur law (Marchenko & Pastur 1967) of the eigenvalues of "
    "W = (scale/n) X^T X, X (n, p) with i.i.d. unit-variance entries, ratio = p/n: "
    "density sqrt((l+ - x)(x - l-)) / (2 pi scale ratio x) on "
    "[l-, l+] = scale (1 -+ sqrt(ratio))^2, plus mass 1 - 1/ratio at 0 when "
    "ratio > 1; fitted by minimum Cramer-von Mises distance (Wolfowitz 1957): "
    "least squares of F(x_i) - u_i between the fitted CDF and the empirical CDF "
    "at mid-positions u_i"
)


@dataclass(frozen=True, kw_only=True, eq=False)
class MarchenkoPasturFit(Result):
    """A Marchenko-Pastur law fitted to a spectrum.

    Attributes:
        ratio: the fitted aspect ratio ``p / n``.
        scale: the fitted variance of the entries (the mean eigenvalue).
        ratio_stderr: standard error of ``ratio``: parametric bootstrap for
            eigenvalues (refits of Wishart spectra of the same size drawn at the
            fitted law), jackknife over probes for an SLQ density; NaN without.
        scale_stderr: the same for ``scale``.
        lower_edge: ``scale (1 - sqrt(ratio))^2``.
        upper_edge: ``scale (1 + sqrt(ratio))^2``.
        point_mass: ``max(0, 1 - 1/ratio)``, the fitted law's mass at 0.
        zero_fraction: the share of zero eigenvalues (or quadrature weight) in
            the data, which ``point_mass`` should match.
        ks_statistic: Kolmogorov-Smirnov distance between the non-zero
            eigenvalues and the fitted law's continuous part
            (``scipy.stats.kstest``); for a density, the largest distance
            between the two CDFs over the quadrature atoms.
        ks_pvalue: p-value of ``ks_statistic`` from the parametric bootstrap
            with refitting (Stute, Gonzalez Manteiga & Presedo Quindimil 1993):
            ``(1 + #{bootstrap spectra fitting at least as badly}) / (1 + B)``;
            NaN for densities and without a bootstrap.
        dimension: ``p``: the number of eigenvalues, or the operator's dimension
            for a density (``None`` when unknown).
        n_eigenvalues: eigenvalues (or quadrature atoms, or grid points) fitted.
        source: ``"eigenvalues"``, ``"density"`` (SLQ quadrature) or
            ``"density-grid"`` (a density without quadrature).
        converged: whether the least-squares fit met its tolerance.
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`; ``details`` holds the moment estimates,
            the counts of zero and negative eigenvalues and the bootstrap's
            replicates summary.
    """

    ratio: float
    scale: float
    ratio_stderr: float
    scale_stderr: float
    lower_edge: float
    upper_edge: float
    point_mass: float
    zero_fraction: float
    ks_statistic: float
    ks_pvalue: float
    dimension: int | None
    n_eigenvalues: int
    source: str
    converged: bool
    definition: str = DEFINITION

    @property
    def n_samples(self) -> float:
        """The implied number of samples ``n = dimension / ratio`` (NaN if unknown)."""
        return math.nan if self.dimension is None else self.dimension / self.ratio

    def pdf(self, x: Numbers) -> Tensor:
        """The fitted density (continuous part) at ``x``."""
        return marchenko_pastur(x, self.ratio, self.scale)

    def cdf(self, x: Numbers) -> Tensor:
        """The fitted CDF (point mass included) at ``x``."""
        return marchenko_pastur_cdf(x, self.ratio, self.scale)

    def scalars(self) -> dict[str, float]:
        """The parameters with their errors, the edges and the fit statistic."""
        names = (
            "ratio",
            "ratio_stderr",
            "scale",
            "scale_stderr",
            "lower_edge",
            "upper_edge",
            "point_mass",
            "ks_statistic",
            "ks_pvalue",
        )
        return {k: float(getattr(self, k)) for k in names}

    def summary(self) -> str:
        """One line: parameters with standard errors, edges, fit statistic."""
        data = {
            "eigenvalues": f"{self.n_eigenvalues} eigenvalues",
            "density": f"an SLQ density ({self.n_eigenvalues} quadrature nodes)",
        }.get(self.source, f"a density on {self.n_eigenvalues} grid points")
        return (
            f"Marchenko-Pastur fit to {data}: ratio = "
            f"{self.ratio:.4g} +- {self.ratio_stderr:.2g}, scale = {self.scale:.4g} "
            f"+- {self.scale_stderr:.2g}, bulk [{self.lower_edge:.4g}, "
            f"{self.upper_edge:.4g}], mass at 0 {self.point_mass:.3g} (data "
            f"{self.zero_fraction:.3g}), KS {self.ks_statistic:.3g} (p = "
            f"{self.ks_pvalue:.3g})"
        )
