"""What every figure shares: a fresh Agg figure or the caller's axes, the PNG write.

Figures are made with :class:`matplotlib.figure.Figure` on an Agg canvas, never
through ``pyplot``: drawing one changes no global backend and leaves no figure
open in ``pyplot``'s registry. matplotlib is imported on first use, so
``import lossgeom`` works without it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lossgeom._io import atomic_path

__all__ = [
    "array",
    "as_list",
    "finish",
    "new_figure",
    "number",
    "parameter",
    "subplots",
]

_INSTALL = "figures need matplotlib: pip install 'lossgeom[report]' (or matplotlib)."


def new_figure(size: tuple[float, float]) -> Any:
    """A new figure of ``size`` inches on its own Agg canvas."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL) from err
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def subplots(
    ax: Any, projection: str | None = None, size: tuple[float, float] = (5.5, 4.0)
) -> tuple[Any, Any]:
    """``(figure, axes)``: the caller's ``ax`` and its figure, or a new pair."""
    if ax is not None:
        return ax.figure, ax
    fig = new_figure(size)
    return fig, fig.add_subplot(111, projection=projection)


def finish(fig: Any, path: str | os.PathLike | None, dpi: int) -> Any:
    """Write ``fig`` as a PNG at ``path`` atomically (when given); return ``fig``."""
    if path is not None:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    return fig


def array(values: Any) -> np.ndarray:
    """A float64 numpy array of a tensor (any device), array or sequence."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def parameter(result: Any, key: str, default: Any = None) -> Any:
    """A setting (``parameters``) or, failing that, a detail (``details``) of a result."""
    for where in ("parameters", "details"):
        found = getattr(result, where, None)
        if isinstance(found, Mapping) and key in found:
            return found[key]
    return default


def number(value: Any) -> float | None:
    """A JSON value as a float, or ``None`` where it holds no number.

    Numbers stay as they are; the strings strict JSON writes for non-finite floats
    (``"NaN"``, ``"Infinity"``, ``"-Infinity"``) become those floats.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, str):
        try:
            x = float(value)
        except ValueError:
            return None
        return x if not math.isfinite(x) else None
    return None


def as_list(value: Any) -> list:
    """``value`` as a list: one item, or the items of a sequence that is not a string."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return list(value)
    return [value]
