"""Layer 5: figures of results (``lg.plot_*``); matplotlib, Agg canvas.

Every figure function takes results (never a model), draws into a given ``ax`` or
a new figure, returns the figure, and writes a PNG atomically when given
``path``. Nothing here trains or measures: a figure draws what a result holds.
:func:`write_report` writes the report of a run or study directory: one
self-contained HTML page (plotly, opens offline) or Markdown with PNGs.
Install the extra with ``pip install 'lossgeom[report]'``.
"""

from lossgeom.report._files import write_json
from lossgeom.report._landscape import plot_paths, plot_slice, plot_surface
from lossgeom.report._report import FORMATS, write_report
from lossgeom.report._spectra import plot_density
from lossgeom.report._training import PANELS, metrics_rows, plot_training

__all__ = [
    # landscape
    "plot_paths",
    "plot_slice",
    "plot_surface",
    # spectra
    "plot_density",
    # training
    "PANELS",
    "metrics_rows",
    "plot_training",
    # files
    "write_json",
    # the report of a run or study directory
    "FORMATS",
    "write_report",
]
