"""The report as plain data: sections of text, notes, tables, code and figures.

Reading a directory (``_collect``) builds a :class:`Document`; the HTML page
(``_html``) and the Markdown file (``_markdown``) render the same document, so
both say the same things. A figure block holds the results it draws, never a
drawing: each format draws it its own way (plotly, matplotlib).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from lossgeom._results import jsonable

__all__ = [
    "Bullets",
    "Code",
    "Curves",
    "Document",
    "Figure",
    "Heading",
    "Items",
    "Note",
    "Section",
    "Series",
    "Table",
    "Text",
    "attempt",
    "fmt",
    "guarded",
    "short_json",
]

T = TypeVar("T")


@dataclass
class Text:
    """A paragraph of plain text."""

    text: str


@dataclass
class Heading:
    """A sub-heading inside a section."""

    text: str


@dataclass
class Note:
    """Something the report cannot show: what is missing or damaged, and the fix.

    Attributes:
        text: what is missing or damaged (naming the file).
        fix: how to get it.
        kind: ``"missing"`` (not there yet) or ``"damaged"`` (there, unreadable).
    """

    text: str
    fix: str = ""
    kind: str = "missing"


@dataclass
class Code:
    """A verbatim block (a config file)."""

    text: str
    language: str = "yaml"


@dataclass
class Items:
    """A list of ``(term, description)`` pairs."""

    entries: list[tuple[str, str]]


@dataclass
class Bullets:
    """A bulleted list under an optional lead-in line."""

    items: list[str]
    title: str = ""


@dataclass
class Table:
    """A table of formatted cells (strings), one list per row."""

    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Series:
    """One line of a :class:`Curves` figure, with an optional band around it.

    Attributes:
        label: the legend entry.
        x, y: the points (numpy arrays).
        lo, hi: the band's edges at ``x`` (``None``: no band).
        group: lines of one group share a colour (a setting, a run).
        dash: ``"solid"``, ``"dot"`` (test-set lines) or ``"dash"`` (thresholds).
    """

    label: str
    x: Any
    y: Any
    lo: Any = None
    hi: Any = None
    group: int = 0
    dash: str = "solid"


@dataclass
class Curves:
    """Lines against the training step: one panel of training curves."""

    ylabel: str
    series: list[Series]
    xlabel: str = "step"


@dataclass
class Figure:
    """A figure to draw.

    Attributes:
        kind: ``"curves"`` (a :class:`Curves`), ``"density"``, ``"slice"``,
            ``"paths"`` (lists of ``(label, result)``; for densities
            ``(label, DensityResult, EigenResult or None)``) or ``"surface"``
            (one ``Surface``).
        title: its title.
        data: what it draws.
        caption: what it shows, in words.
    """

    kind: str
    title: str
    data: Any
    caption: str = ""


Block = Heading | Text | Note | Code | Items | Bullets | Table | Figure


@dataclass
class Section:
    """A titled part of the report; ``id`` is its anchor."""

    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Document:
    """A whole report.

    Attributes:
        title: the page title.
        kind: ``"run"`` or ``"study"``.
        source: the directory reported on.
        facts: ``(name, value)`` pairs shown at the top.
        sections: in order.
    """

    title: str
    kind: str
    source: Path
    facts: list[tuple[str, str]] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)

    def figures(self) -> list[Figure]:
        """Every figure block, in order."""
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]


def fmt(value: Any, digits: int = 4) -> str:
    """A number as ``digits`` significant digits (``n/a`` for none or NaN).

    Example:
        >>> fmt(0.123456), fmt(float("nan")), fmt(3), fmt(None)
        ('0.1235', 'n/a', '3', 'n/a')
    """
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "n/a" if math.isnan(x) else f"{x:.{digits}g}"


def short_json(value: Any, limit: int = 240) -> str:
    """``value`` as compact JSON text, cut at ``limit`` characters."""
    try:
        text = json.dumps(jsonable(value), separators=(", ", ": "), sort_keys=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def attempt(notes: list[Block], what: str, fix: str, fn: Callable[[], T]) -> T | None:
    """``fn()``, or ``None`` with a :class:`Note` in ``notes`` when it raises.

    One bad piece (a damaged file, a missing table) costs its own part of the
    report, never the report: the note names ``what`` failed, why, and ``fix``.
    An interrupt (``KeyboardInterrupt``) still stops the report.
    """
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - reported in the page, not raised
        reason = str(err).strip() or type(err).__name__
        kind = "missing" if isinstance(err, FileNotFoundError) else "damaged"
        notes.append(Note(f"{what}: {reason}", fix, kind))
        return None


def guarded(
    what: str, fn: Callable[[], T], sid: str, title: str
) -> tuple[T | None, Section | None]:
    """``(fn(), None)``, or ``(None, a section holding the note of why it failed)``.

    For a whole part of the report (the training curves, the probe sections):
    when making it raises, the report shows the section ``sid`` with the error.
    """
    notes: list[Block] = []
    made = attempt(notes, f"{what} could not be made", "", fn)
    return made, (Section(sid, title, notes) if notes else None)
