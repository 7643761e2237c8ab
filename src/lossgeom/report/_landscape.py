"""Figures of the landscape: 1-D slices, 2-D surfaces, paths between two points.

Each figure states what it shows: the direction normalization, the number of
directions behind a band, and how far a drawn trajectory lies off the plane.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lossgeom.report._base import array, finish, subplots

__all__ = ["plot_paths", "plot_slice", "plot_surface"]


def _normalization(directions: dict) -> str:
    if directions.get("source") == "given":
        return "given directions"
    return f"{directions.get('normalization', '?')}-normalized"


def _axis_labels(directions: dict) -> tuple[str, str]:
    if directions.get("source") == "pca":
        r = directions.get("explained_variance_ratio", [float("nan")] * 2)
        return (
            f"PC1 ({100 * r[0]:.1f}% of the variance)",
            f"PC2 ({100 * r[1]:.1f}% of the variance)",
        )
    what = _normalization(directions)
    return f"alpha ({what})", f"beta ({what})"


def plot_slice(
    result: Any,
    *,
    ax: Any = None,
    path: str | os.PathLike | None = None,
    band: tuple[float, float] = (0.1, 0.9),
    show_each: bool = True,
    dpi: int = 150,
) -> Any:
    """A 1-D slice: mean over directions, quantile band, each slice, quadratic model.

    Args:
        result: a :class:`~lossgeom.SliceResult`.
        ax: draw here (default: a new figure).
        path: write a PNG here (atomically).
        band: quantiles of the band drawn when there are several directions.
        show_each: draw every direction's slice thinly.
        dpi: resolution of the PNG.

    Returns:
        The matplotlib figure.
    """
    fig, ax = subplots(ax)
    a = array(result.alphas)
    loss = array(result.loss)
    n = loss.shape[0]
    if show_each and n > 1:
        for row in loss:
            ax.plot(a, row, color="C0", alpha=0.15, lw=0.8)
    ax.plot(a, loss.mean(0), color="C0", lw=2, label=f"train loss (mean of {n})")
    if n > 1:
        lo, hi = result.band(*band)
        ax.fill_between(
            a,
            array(lo),
            array(hi),
            color="C0",
            alpha=0.2,
            label=f"{int(band[0] * 100)}-{int(band[1] * 100)}% band",
        )
    if result.eval_loss is not None:
        ax.plot(a, array(result.eval_loss).mean(0), color="C1", lw=2, label="eval loss")
    if result.quadratic is not None:
        ax.plot(
            a,
            array(result.quadratic).mean(0),
            "k--",
            lw=1,
            label="quadratic model L + a g.d + a^2 d.Hd/2",
        )
        lo_, hi_ = float(np.nanmin(loss)), float(np.nanmax(loss))
        pad = 0.05 * (hi_ - lo_ + 1e-12)
        ax.set_ylim(lo_ - pad, hi_ + pad)
    ax.set_xlabel(f"alpha ({_normalization(result.directions)} direction)")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    return finish(fig, path, dpi)


def plot_surface(
    surface: Any,
    *,
    kind: str = "contour",
    ax: Any = None,
    path: str | os.PathLike | None = None,
    levels: int = 30,
    log: bool = False,
    dpi: int = 150,
) -> Any:
    """A 2-D slice as filled contours or a 3-D surface, with any trajectory on top.

    Args:
        surface: a :class:`~lossgeom.Surface`.
        kind: ``"contour"`` or ``"surface"`` (3-D).
        ax: draw here (a 3-D axes for ``"surface"``).
        path: write a PNG here (atomically).
        levels: contour levels.
        log: colour by ``log10(loss)``.
        dpi: resolution of the PNG.

    Returns:
        The matplotlib figure.
    """
    if kind not in ("contour", "surface"):
        raise ValueError(f"kind must be 'contour' or 'surface'; got {kind!r}.")
    if kind == "surface" and ax is not None and getattr(ax, "name", "") != "3d":
        raise ValueError(
            "kind='surface' draws into a 3-D axes; got a 2-D one. Pass an axes made "
            "with projection='3d', or leave ax=None."
        )
    fig, ax = subplots(ax, "3d" if kind == "surface" else None)
    A, B = np.meshgrid(array(surface.alphas), array(surface.betas), indexing="ij")
    Z = array(surface.loss)
    label = "loss"
    if log:
        Z, label = np.log10(np.maximum(Z, 1e-12)), "log10 loss"
    if kind == "contour":
        cs = ax.contourf(A, B, Z, levels=levels, cmap="viridis")
        ax.contour(A, B, Z, levels=levels, colors="k", linewidths=0.3, alpha=0.5)
        fig.colorbar(cs, ax=ax, label=label)
        if surface.trajectory is not None:
            t = array(surface.trajectory)
            ax.plot(t[:, 0], t[:, 1], "w.-", lw=1, ms=3, label="trajectory (projected)")
            if surface.trajectory_residuals is not None:
                r = float(array(surface.trajectory_residuals).max())
                ax.set_title(f"max off-plane distance of the path: {r:.3g}", fontsize=9)
            ax.legend(fontsize=8, loc="upper right")
        ax.plot([0], [0], "r*", ms=8)
    else:
        ax.plot_surface(A, B, Z, cmap="viridis", linewidth=0, antialiased=True)
        ax.set_zlabel(label)
    xlabel, ylabel = _axis_labels(surface.directions)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return finish(fig, path, dpi)


def plot_paths(
    results: Any | Sequence[Any],
    *,
    labels: Sequence[str] | None = None,
    ax: Any = None,
    path: str | os.PathLike | None = None,
    dpi: int = 150,
) -> Any:
    """Loss along one or more paths (``interpolate``, ``connect``), barriers in the legend.

    Args:
        results: results with ``ts``, ``loss`` and ``barrier`` (one or a list).
        labels: legend labels (default: each result's ``kind``).
        ax: draw here.
        path: write a PNG here (atomically).
        dpi: resolution of the PNG.

    Returns:
        The matplotlib figure.
    """
    if not isinstance(results, Sequence):
        results = [results]
    if labels is not None and len(labels) != len(results):
        raise ValueError(f"got {len(labels)} labels for {len(results)} paths.")
    fig, ax = subplots(ax)
    for i, r in enumerate(results):
        name = labels[i] if labels is not None else getattr(r, "kind", f"path {i}")
        ts = array(r.ts)
        ax.plot(
            ts,
            array(r.loss),
            marker=".",
            label=f"{name} (barrier {float(r.barrier):.3g})",
        )
        if getattr(r, "eval_loss", None) is not None:
            ax.plot(
                ts,
                array(r.eval_loss),
                ls="--",
                color=ax.lines[-1].get_color(),
                label=f"{name}, eval set",
            )
    ax.set_xlabel("t")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    return finish(fig, path, dpi)
