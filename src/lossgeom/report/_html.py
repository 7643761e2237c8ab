"""The HTML report: one self-contained page that opens offline.

plotly's JavaScript is embedded once, in the page's head; each figure is a
``div`` and a short script that draws it (``fig.to_html(full_html=False,
include_plotlyjs=False, include_mathjax=False)``). The page names no remote
file: no CDN, no remote font, no image by URL. A Content-Security-Policy in the
page forbids every network request besides, so a browser that opens it reaches
nothing but the page itself.
"""

from __future__ import annotations

import datetime as _dt
import html
from importlib import metadata
from typing import Any

from lossgeom.report._document import (
    Bullets,
    Code,
    Document,
    Figure,
    Heading,
    Items,
    Note,
    Section,
    Table,
    Text,
)

__all__ = ["CSP", "PLOTLY_CONFIG", "render_html"]

#: The page's Content-Security-Policy: inline scripts and styles, data: images;
#: no request to any other origin, nor to the page's own.
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data: blob:; font-src data:; connect-src 'none'; base-uri 'none'; "
    "form-action 'none'"
)

#: plotly's options for every figure: no logo link, no cloud button.
PLOTLY_CONFIG = {
    "displaylogo": False,
    "responsive": True,
    "showSendToCloud": False,
    "toImageButtonOptions": {"format": "png", "scale": 2},
}

_CSS = """
:root { --fg: #1d1f23; --muted: #5b616b; --line: #d9dce1; --bg: #ffffff;
  --soft: #f5f6f8; --accent: #1f5fa8; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: var(--bg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
header, main, nav, footer { max-width: 1120px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 24px; }
h1 { font-size: 26px; margin: 0 0 8px; }
h2 { font-size: 20px; margin: 36px 0 12px; padding-top: 8px;
  border-top: 1px solid var(--line); }
h3 { font-size: 16px; margin: 20px 0 8px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px;
  margin: 8px 0 16px; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; word-break: break-word; }
nav ol { columns: 2; margin: 8px 0; padding-left: 20px; }
nav a, a { color: var(--accent); text-decoration: none; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 4px;
  padding: 10px 12px; overflow: auto; max-height: 420px; font-size: 13px; }
.table-wrap { overflow-x: auto; margin: 8px 0 16px; }
table { border-collapse: collapse; font-size: 13.5px; }
caption { caption-side: bottom; text-align: left; color: var(--muted);
  padding-top: 6px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left;
  vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.verdict { font-weight: 600; padding: 1px 8px; border-radius: 10px; }
.verdict-supported { background: #dcf2e0; color: #17612a; }
.verdict-contradicted { background: #fbe0df; color: #8f1d18; }
.verdict-inconclusive { background: #eceef1; color: #464b53; }
.note { border-left: 4px solid #d39e00; background: #fff8e1; padding: 8px 12px;
  margin: 10px 0; border-radius: 0 4px 4px 0; white-space: pre-wrap; }
.note-damaged { border-left-color: #c62828; background: #fdecea; }
.note .fix { display: block; color: var(--muted); margin-top: 2px; }
figure.lg-figure { margin: 16px 0 24px; }
figure .fig-title { font-weight: 600; margin-bottom: 4px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
dl.items { margin: 4px 0 14px; }
dl.items dt { font-weight: 600; }
dl.items dd { margin: 0 0 6px 18px; word-break: break-word; }
footer { color: var(--muted); font-size: 12.5px; padding: 24px; }
"""

_VERDICTS = ("supported", "contradicted", "inconclusive")


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _note(note: Note) -> str:
    head = "Missing" if note.kind == "missing" else "Could not read"
    fix = f'<span class="fix">How to get it: {_e(note.fix)}</span>' if note.fix else ""
    return (
        f'<div class="note note-{_e(note.kind)}"><strong>{head}:</strong> '
        f"{_e(note.text)}{fix}</div>"
    )


def _cell(text: str) -> str:
    if text in _VERDICTS:
        return f"<td>{_badge(text)}</td>"
    try:
        float(text)
        numeric = True
    except ValueError:
        numeric = text == "n/a"
    return f'<td class="num">{_e(text)}</td>' if numeric else f"<td>{_e(text)}</td>"


def _table(table: Table) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in table.header)
    body = "".join(
        "<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in table.rows
    )
    caption = f"<caption>{_e(table.caption)}</caption>" if table.caption else ""
    return (
        f'<div class="table-wrap"><table>{caption}<thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _badge(text: str) -> str:
    if text in _VERDICTS:
        return f'<span class="verdict verdict-{text}">{_e(text)}</span>'
    return _e(text)


def _items(items: Items) -> str:
    body = "".join(f"<dt>{_e(k)}</dt><dd>{_badge(v)}</dd>" for k, v in items.entries)
    return f'<dl class="items">{body}</dl>'


def _bullets(bullets: Bullets) -> str:
    title = f"<p>{_e(bullets.title)}</p>" if bullets.title else ""
    return (
        title + "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in bullets.items) + "</ul>"
    )


def _figure(figure: Figure, number: int) -> str:
    """A figure block: title, the plotly figure (or a note when it fails), caption."""
    from lossgeom.report._plotly import plotly_figure

    try:
        fig = plotly_figure(figure)
        plot = fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            include_mathjax=False,
            div_id=f"plot-{number}",
            config=PLOTLY_CONFIG,
            default_width="100%",
        )
    except Exception as err:  # noqa: BLE001 - one figure never stops the report
        return _note(
            Note(
                f"the figure {figure.title!r} could not be drawn: {err}",
                "the data it draws are damaged or of an unexpected shape",
                kind="damaged",
            )
        )
    return (
        f'<figure class="lg-figure" data-kind="{_e(figure.kind)}" id="figure-{number}">'
        f'<div class="fig-title">{_e(figure.title)}</div>{plot}'
        f"<figcaption>{_e(figure.caption)}</figcaption></figure>"
    )


def _block(block: Any, counter: list[int]) -> str:
    if isinstance(block, Heading):
        return f"<h3>{_e(block.text)}</h3>"
    if isinstance(block, Text):
        return f"<p>{_e(block.text)}</p>"
    if isinstance(block, Note):
        return _note(block)
    if isinstance(block, Code):
        return f'<pre><code class="language-{_e(block.language)}">{_e(block.text)}</code></pre>'
    if isinstance(block, Items):
        return _items(block)
    if isinstance(block, Bullets):
        return _bullets(block)
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Figure):
        counter[0] += 1
        return _figure(block, counter[0])
    raise TypeError(f"unknown report block {type(block).__name__}")


def _section(section: Section, counter: list[int]) -> str:
    body = "\n".join(_block(b, counter) for b in section.blocks)
    return (
        f'<section id="{_e(section.id)}"><h2>{_e(section.title)}</h2>\n{body}\n'
        "</section>"
    )


def _head(doc: Document) -> str:
    import plotly
    from plotly.offline import get_plotlyjs

    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="lossgeom {_e(_version("lossgeom"))}">\n'
        f"<title>{_e(doc.title)} - lossgeom report</title>\n"
        f"<style>{_CSS}</style>\n"
        f'<script id="plotly-library" data-version="{_e(plotly.__version__)}">'
        f"{get_plotlyjs()}</script>\n</head>\n"
    )


def render_html(doc: Document) -> str:
    """The whole page of a report, as text."""
    facts = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in doc.facts)
    toc = "".join(
        f'<li><a href="#{_e(s.id)}">{_e(s.title)}</a></li>' for s in doc.sections
    )
    counter = [0]
    body = "\n".join(_section(s, counter) for s in doc.sections)
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        _head(doc)
        + "<body>\n<header>"
        + f"<h1>{_e(doc.title)}</h1>"
        + f'<dl class="facts">{facts}</dl></header>\n'
        + f"<nav><h3>Contents</h3><ol>{toc}</ol></nav>\n"
        + f"<main>\n{body}\n</main>\n"
        + f"<footer>Made by lossgeom {_e(_version('lossgeom'))} on {_e(when)} with "
        + f"plotly {_e(_version('plotly'))}, whose JavaScript this page embeds: it "
        + "opens offline and requests nothing from the network.</footer>\n"
        + "</body>\n</html>\n"
    )
