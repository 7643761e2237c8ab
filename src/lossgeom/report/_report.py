"""``write_report``: the report of a run directory or a study directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lossgeom._io import atomic_write_text
from lossgeom.report._collect import detect, run_document
from lossgeom.report._document import Document

__all__ = ["FORMATS", "build_document", "write_report"]

FORMATS = ("html", "md")


def build_document(
    path: str | os.PathLike, *, progress: bool | None = None
) -> Document:
    """Read a run or study directory into the report's sections (no file written).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is neither a run nor a study directory.
    """
    where = Path(path)
    kind = detect(where)
    if kind == "run":
        return run_document(where)
    from lossgeom.report._study import study_document

    if progress is None:
        progress = sys.stderr.isatty()
    return study_document(where, progress=bool(progress))


def write_report(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "html",
    progress: bool | None = None,
) -> Path:
    """Write the report of a run directory or a study directory.

    The directory's kind is detected: a run directory (``lossgeom train``, or
    one of a study's ``runs/<id>/``) holds ``config.yaml``, ``metrics.jsonl``
    and ``status.json``; a study directory (``lossgeom study run``) holds
    ``study.yaml``, ``index.sqlite`` and ``runs/``. The report shows, where the
    data exist: the configuration (for a study, the study file and its swept
    axes); training curves (loss, accuracy, sharpness against its stability
    threshold, the Hessian trace with its standard-error band; for a study,
    per setting, the mean over seeds with a band); spectral densities with the
    top eigenvalues marked; 1-D slices and 2-D planes; interpolation and curve
    barriers; per-setting tables (mean, standard error, n over seeds); every
    stored hypothesis test; advice stored in ``advice/``; and the methods: each
    quantity's definition, parameters and cost as stored in its result.

    What is missing or damaged (no finished run, no metrics yet, a damaged
    result file) is said in the report, with how to get it, and the rest is
    shown: one bad piece never stops the report.

    Args:
        path: the run or study directory.
        out: the file to write (its folder is created). ``"html"``: one
            self-contained page with plotly's JavaScript embedded once; it opens
            offline and requests nothing from the network. ``"md"``: Markdown,
            with its figures as PNGs (matplotlib) in ``<stem>_files/`` beside it.
        format: ``"html"`` or ``"md"``.
        progress: a progress bar while reading a study's results (default: when
            stderr is a terminal).

    Returns:
        The path of the written report.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is neither a run nor a study directory (the message
            says what each holds), or an unknown ``format``.

    Example:
        >>> import lossgeom as lg                             # doctest: +SKIP
        >>> lg.report.write_report("studies/h1", "h1.html")   # doctest: +SKIP
        PosixPath('h1.html')
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}; got {format!r}.")
    out = Path(out)
    doc = build_document(path, progress=progress)
    if format == "md":
        from lossgeom.report._markdown import write_markdown

        return write_markdown(doc, out)
    from lossgeom.report._html import render_html

    atomic_write_text(out, render_html(doc))
    return out
