"""Interactive figures of the HTML report: plotly, drawn from the stored results.

Each builder takes a :class:`~lossgeom.report._document.Figure` block's data
and returns a ``plotly.graph_objects.Figure``; nothing is recomputed beyond
means and quantiles of what a result holds. plotly is imported on first use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lossgeom.report._base import array
from lossgeom.report._document import Curves, Figure, fmt
from lossgeom.report._landscape import _axis_labels

__all__ = ["COLORS", "color", "plotly_figure"]

#: Line colours by group (matplotlib's tab10); group -1 is near-black.
COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def color(group: int, alpha: float = 1.0) -> str:
    """The colour of ``group`` as ``rgba(...)`` with opacity ``alpha``."""
    hexa = "#282828" if group < 0 else COLORS[group % len(COLORS)]
    r, g, b = (int(hexa[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha:g})"


def _go() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the HTML report needs plotly: pip install 'lossgeom[report]' (or plotly)"
        ) from err
    return go


def _layout(fig: Any, xlabel: str, ylabel: str, height: int = 400) -> Any:
    fig.update_layout(
        template="plotly_white",
        height=height,
        margin={"l": 64, "r": 24, "t": 16, "b": 48},
        legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0},
        font={
            "family": "system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif"
        },
        hovermode="closest",
    )
    fig.update_xaxes(title_text=xlabel)
    fig.update_yaxes(title_text=ylabel)
    return fig


def _band(go: Any, x: Any, lo: Any, hi: Any, group: int, legend: str) -> Any:
    """A filled band between ``lo`` and ``hi`` as one closed polygon."""
    return go.Scatter(
        x=np.concatenate([x, x[::-1]]),
        y=np.concatenate([hi, lo[::-1]]),
        mode="lines",
        fill="toself",
        fillcolor=color(group, 0.18),
        line={"width": 0},
        hoverinfo="skip",
        showlegend=False,
        legendgroup=legend,
    )


def _curves(c: Curves) -> Any:
    go = _go()
    fig = go.Figure()
    for s in c.series:
        x, y = array(s.x), array(s.y)
        if s.lo is not None and s.hi is not None:
            fig.add_trace(_band(go, x, array(s.lo), array(s.hi), s.group, s.label))
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                name=s.label,
                mode="lines+markers" if x.size < 40 and s.dash != "dash" else "lines",
                marker={"size": 4},
                line={"color": color(s.group), "dash": s.dash, "width": 1.8},
                legendgroup=s.label,
            )
        )
    return _layout(fig, c.xlabel, c.ylabel)


def _marks(go: Any, eig: Any, label: str, group: int, ylo: float, yhi: float) -> list:
    """The eigenvalues as vertical segments: converged dashed, others dotted grey."""
    values = array(eig.values).reshape(-1)
    ok = np.asarray(array(eig.converged), dtype=bool).reshape(-1)
    traces = []
    for good, style, name in (
        (True, "dash", "top eigenvalues"),
        (False, "dot", "not converged"),
    ):
        v = values[ok == good]
        if not v.size:
            continue
        xs = np.repeat(v, 3)
        ys = np.tile([ylo, yhi, np.nan], v.size)
        xs[2::3] = np.nan
        traces.append(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                name=f"{label}: {name} ({', '.join(fmt(t) for t in v.tolist())})",
                line={"color": color(group if good else 7), "dash": style, "width": 1},
                hovertemplate="eigenvalue %{x:.4g}<extra></extra>",
            )
        )
    return traces


def _density(items: list, floor: float = 1e-8) -> Any:
    go = _go()
    fig = go.Figure()
    peak = max((float(np.nanmax(array(d.values))) for _, d, _ in items), default=1.0)
    peak = peak if peak > 0 else 1.0
    ylo, yhi = floor * peak, 2 * peak
    for i, (label, d, eig) in enumerate(items):
        y = array(d.values)
        y = np.where(y > 0, y, np.nan)  # a log axis has no place for zero
        fig.add_trace(
            go.Scatter(
                x=array(d.grid),
                y=y,
                mode="lines",
                name=f"{label}: {str(d.method).upper()} density",
                line={"color": color(i), "width": 1.6},
            )
        )
        if eig is not None:
            fig.add_traces(_marks(go, eig, label, i, ylo, yhi))
    fig = _layout(fig, "eigenvalue of the Hessian", "density")
    fig.update_yaxes(
        type="log", range=[np.log10(ylo), np.log10(yhi)], exponentformat="power"
    )
    return fig


def _slice(items: list) -> Any:
    go = _go()
    fig = go.Figure()
    for i, (label, r) in enumerate(items):
        a, loss = array(r.alphas), array(r.loss)
        n = loss.shape[0]
        if 1 < n <= 20:
            for row in loss:
                fig.add_trace(
                    go.Scatter(
                        x=a,
                        y=row,
                        mode="lines",
                        line={"color": color(i, 0.3), "width": 0.8},
                        showlegend=False,
                        hoverinfo="skip",
                        legendgroup=label,
                    )
                )
        if n > 1:
            lo, hi = r.band(0.1, 0.9)
            fig.add_trace(_band(go, a, array(lo), array(hi), i, label))
        fig.add_trace(
            go.Scatter(
                x=a,
                y=loss.mean(0),
                mode="lines",
                name=f"{label}: train loss (mean of {n})",
                line={"color": color(i), "width": 2.2},
                legendgroup=label,
            )
        )
        for extra, name, dash in (
            (r.eval_loss, "eval loss", "dot"),
            (r.quadratic, "quadratic model", "dash"),
        ):
            if extra is not None:
                fig.add_trace(
                    go.Scatter(
                        x=a,
                        y=array(extra).mean(0),
                        mode="lines",
                        name=f"{label}: {name}",
                        line={"color": color(i), "dash": dash, "width": 1.2},
                    )
                )
    norm = items[0][1].directions.get("normalization", "given")
    return _layout(fig, f"alpha ({norm}-normalized direction)", "loss")


def _surface(surface: Any) -> Any:
    go = _go()
    a, b, z = array(surface.alphas), array(surface.betas), array(surface.loss)
    fig = go.Figure(
        go.Contour(
            x=a,
            y=b,
            z=z.T,  # plotly's z is indexed [y][x]; loss[i, j] is at (alpha_i, beta_j)
            colorscale="Viridis",
            colorbar={"title": {"text": "loss"}},
            ncontours=30,
        )
    )
    if surface.trajectory is not None:
        t = array(surface.trajectory)
        fig.add_trace(
            go.Scatter(
                x=t[:, 0],
                y=t[:, 1],
                mode="lines+markers",
                name="trajectory (projected)",
                line={"color": "white", "width": 1},
                marker={"size": 3, "color": "white"},
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[0.0],
            y=[0.0],
            mode="markers",
            name="the weights",
            marker={"symbol": "star", "size": 12, "color": "red"},
        )
    )
    xlabel, ylabel = _axis_labels(surface.directions)
    return _layout(fig, xlabel, ylabel, height=460)


def _paths(items: list) -> Any:
    go = _go()
    fig = go.Figure()
    for i, (label, r) in enumerate(items):
        ts = array(r.ts)
        fig.add_trace(
            go.Scatter(
                x=ts,
                y=array(r.loss),
                mode="lines+markers",
                marker={"size": 4},
                name=f"{label}: {r.kind} (barrier {fmt(float(r.barrier))})",
                line={"color": color(i), "width": 1.8},
            )
        )
        if getattr(r, "eval_loss", None) is not None:
            fig.add_trace(
                go.Scatter(
                    x=ts,
                    y=array(r.eval_loss),
                    mode="lines",
                    name=f"{label}: eval set",
                    line={"color": color(i), "dash": "dot", "width": 1.2},
                )
            )
        if getattr(r, "linear_loss", None) is not None:
            fig.add_trace(
                go.Scatter(
                    x=ts,
                    y=array(r.linear_loss),
                    mode="lines",
                    name=f"{label}: straight line (barrier {fmt(float(r.linear_barrier))})",
                    line={"color": color(i), "dash": "dash", "width": 1.2},
                )
            )
    return _layout(fig, "t (0: first seed, 1: second seed)", "loss")


_BUILDERS = {
    "curves": _curves,
    "density": _density,
    "slice": _slice,
    "surface": _surface,
    "paths": _paths,
}


def plotly_figure(figure: Figure) -> Any:
    """The plotly figure of a figure block.

    Raises:
        ValueError: an unknown figure kind.
    """
    if figure.kind not in _BUILDERS:
        raise ValueError(
            f"unknown figure kind {figure.kind!r}; known: {sorted(_BUILDERS)}"
        )
    return _BUILDERS[figure.kind](figure.data)
