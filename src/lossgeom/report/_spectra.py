"""Figures of spectra: a spectral density with marked eigenvalues."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from lossgeom.report._base import array, finish, parameter, subplots

__all__ = ["plot_density"]


def _title(result: Any, operator: str) -> str:
    method = str(getattr(result, "method", "?"))
    probes = parameter(result, "n_probes")
    steps = parameter(result, "lanczos_steps")
    moments = parameter(result, "n_moments")
    parts = [method.upper()]
    if probes is not None and steps is not None:
        parts.append(f"{probes} probes x {steps} Lanczos steps")
    elif probes is not None and moments is not None:
        parts.append(f"{probes} probes x {moments} moments")
    sigma = getattr(result, "sigma", None)
    if sigma is not None:
        parts.append(f"sigma={sigma:.1e}")
    mass = parameter(result, "mass_on_grid")
    if mass is not None and mass < 0.999:
        parts.append(f"{100 * mass:.1f}% of the mass on the grid")
    return f"{operator} spectral density ({', '.join(parts)})"


def plot_density(
    result: Any,
    eigenvalues: Any = None,
    *,
    operator: str = "Hessian",
    log: bool = True,
    floor: float = 1e-8,
    ax: Any = None,
    path: str | os.PathLike | None = None,
    dpi: int = 150,
) -> Any:
    """A spectral density, optionally with eigenvalues marked as vertical lines.

    The curve is ``result.values`` over ``result.grid`` as computed; the title
    says how (method, probes and steps, kernel width, and the share of the mass
    on the grid when some lies outside it).

    Args:
        result: a :class:`~lossgeom.DensityResult` (``lg.density``).
        eigenvalues: eigenvalues to mark: an :class:`~lossgeom.EigenResult` (its
            unconverged pairs are drawn dotted, in grey, and labelled so), a tensor
            or a sequence of floats; ``None`` marks none.
        operator: what the spectrum belongs to, for the labels.
        log: a logarithmic density axis.
        floor: with ``log``, the lowest density shown, relative to the peak.
        ax: draw here (default: a new figure).
        path: write a PNG here (atomically).
        dpi: resolution of the PNG.

    Returns:
        The matplotlib figure.

    Example:
        >>> import torch, lossgeom as lg
        >>> A = lg.DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> fig = plot_density(lg.density(A, 4, 10), lg.eigenvalues(A, 2))
        >>> [round(line.get_xdata()[0], 6) for line in fig.axes[0].lines[1:]]
        [10.0, 9.0]
    """
    fig, ax = subplots(ax, size=(6.0, 3.5))
    x, y = array(result.grid), array(result.values)
    ax.plot(x, y, lw=1.2, label=f"{str(getattr(result, 'method', '')).upper()} density")
    if log:
        ax.set_yscale("log")
        peak = float(np.nanmax(y)) if y.size else 0.0
        if peak > 0:
            ax.set_ylim(bottom=floor * peak, top=2 * peak)
    if eigenvalues is not None:
        values = array(getattr(eigenvalues, "values", eigenvalues)).reshape(-1)
        converged = getattr(eigenvalues, "converged", None)
        ok = (
            np.ones(values.shape, dtype=bool)
            if converged is None
            else np.asarray(array(converged), dtype=bool).reshape(-1)
        )
        which = getattr(eigenvalues, "which", None)
        method = getattr(eigenvalues, "method", None)
        label = f"{values.size} {which + ' ' if which else ''}eigenvalues"
        label += f" ({method})" if method else ""
        first_ok = first_bad = True
        for v, good in zip(values.tolist(), ok.tolist(), strict=True):
            if good:
                ax.axvline(
                    v,
                    color="tab:red",
                    lw=0.8,
                    ls="--",
                    label=label if first_ok else None,
                )
                first_ok = False
            else:
                ax.axvline(
                    v,
                    color="0.5",
                    lw=0.8,
                    ls=":",
                    label="not converged" if first_bad else None,
                )
                first_bad = False
    ax.set_xlabel(f"eigenvalue of the {operator}")
    ax.set_ylabel("density")
    ax.set_title(_title(result, operator), fontsize=8)
    ax.legend(fontsize=8)
    return finish(fig, path, dpi)
