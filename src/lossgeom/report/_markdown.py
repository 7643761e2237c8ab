"""The Markdown report: text and tables, figures as PNGs in a folder beside it.

For papers and notes: ``report.md`` with its figures in ``report_files/``
(``fig-01-loss.png``, ...), drawn with matplotlib by the ``lg.plot_*``
functions where one fits (densities, slices, planes, paths) and by a plain
line drawing for training curves. Every file is written atomically; PNGs of
an earlier report in that folder that this one does not draw are removed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from lossgeom._io import atomic_write_text
from lossgeom.report._base import array, finish, new_figure
from lossgeom.report._document import (
    Bullets,
    Code,
    Curves,
    Document,
    Figure,
    Heading,
    Items,
    Note,
    Table,
    Text,
)
from lossgeom.report._landscape import plot_paths, plot_slice, plot_surface
from lossgeom.report._plotly import COLORS
from lossgeom.report._spectra import plot_density

__all__ = ["figures_folder", "write_markdown"]

_STYLE = {"solid": "-", "dot": ":", "dash": "--"}
DPI = 110


def figures_folder(out: Path) -> Path:
    """Where the PNGs of the Markdown report ``out`` go: ``<stem>_files/``."""
    return out.with_name(f"{out.stem}_files")


def _curves(c: Curves) -> Any:
    fig = new_figure((6.4, 3.8))
    ax = fig.add_subplot(111)
    for s in c.series:
        col = "0.15" if s.group < 0 else COLORS[s.group % len(COLORS)]
        x, y = array(s.x), array(s.y)
        ax.plot(x, y, _STYLE.get(s.dash, "-"), color=col, lw=1.4, label=s.label)
        if s.lo is not None and s.hi is not None:
            ax.fill_between(x, array(s.lo), array(s.hi), color=col, alpha=0.18, lw=0)
    ax.set_xlabel(c.xlabel)
    ax.set_ylabel(c.ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _grid(n: int) -> tuple[Any, list]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = new_figure((4.8 * cols, 3.6 * rows))
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def _density(items: list) -> Any:
    fig, axes = _grid(len(items))
    for ax, (label, d, eig) in zip(axes, items, strict=True):
        plot_density(d, eig, ax=ax)
        ax.set_title(f"{label}\n{ax.get_title()}", fontsize=8)
    fig.tight_layout()
    return fig


def _slice(items: list) -> Any:
    fig, axes = _grid(len(items))
    for ax, (label, r) in zip(axes, items, strict=True):
        plot_slice(r, ax=ax)
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    return fig


def _draw(figure: Figure) -> Any:
    if figure.kind == "curves":
        return _curves(figure.data)
    if figure.kind == "density":
        return _density(figure.data)
    if figure.kind == "slice":
        return _slice(figure.data)
    if figure.kind == "surface":
        return plot_surface(figure.data)
    if figure.kind == "paths":
        labels = [label for label, _ in figure.data]
        return plot_paths([r for _, r in figure.data], labels=labels)
    raise ValueError(f"unknown figure kind {figure.kind!r}")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "figure"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(table: Table) -> list[str]:
    lines = [
        "| " + " | ".join(_cell(h) for h in table.header) + " |",
        "|" + "|".join("---" for _ in table.header) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    if table.caption:
        lines += ["", f"*{table.caption}*"]
    return lines


def _note(note: Note) -> list[str]:
    head = "Missing" if note.kind == "missing" else "Could not read"
    lines = [f"> **{head}:** {note.text}".replace("\n", "\n> ")]
    if note.fix:
        lines += [">", f"> How to get it: {note.fix}"]
    return lines


def _figure(figure: Figure, number: int, folder: Path, written: set[str]) -> list[str]:
    name = f"fig-{number:02d}-{_slug(figure.title)}.png"
    try:
        fig = _draw(figure)
        finish(fig, folder / name, DPI)
        fig.clf()
    except Exception as err:  # noqa: BLE001 - one figure never stops the report
        return _note(
            Note(
                f"the figure {figure.title!r} could not be drawn: {err}", kind="damaged"
            )
        )
    written.add(name)
    return [
        f"![{figure.title}]({folder.name}/{name})",
        "",
        f"*{figure.title}.* {figure.caption}",
    ]


def _block(block: Any, state: dict) -> list[str]:
    if isinstance(block, Heading):
        return [f"### {block.text}"]
    if isinstance(block, Text):
        return [block.text]
    if isinstance(block, Note):
        return _note(block)
    if isinstance(block, Code):
        return [f"```{block.language}", block.text.rstrip("\n"), "```"]
    if isinstance(block, Items):
        return [f"- **{k}**: {v}" for k, v in block.entries]
    if isinstance(block, Bullets):
        return ([block.title, ""] if block.title else []) + [
            f"- {i}" for i in block.items
        ]
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Figure):
        state["n"] += 1
        return _figure(block, state["n"], state["folder"], state["written"])
    raise TypeError(f"unknown report block {type(block).__name__}")


def write_markdown(doc: Document, out: Path) -> Path:
    """Write the report as Markdown at ``out``, its figures in :func:`figures_folder`."""
    folder = figures_folder(out)
    state = {"n": 0, "folder": folder, "written": set()}
    lines = [f"# {doc.title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in doc.facts]
    lines += ["", "Contents:", ""]
    lines += [f"{i}. [{s.title}](#{s.id})" for i, s in enumerate(doc.sections, 1)]
    for section in doc.sections:
        lines += ["", f'<a id="{section.id}"></a>', "", f"## {section.title}"]
        for block in section.blocks:
            lines += ["", *_block(block, state)]
    atomic_write_text(out, "\n".join(lines) + "\n")
    for old in folder.glob("fig-*.png") if folder.is_dir() else []:
        if old.name not in state["written"]:
            old.unlink(missing_ok=True)
    return out
