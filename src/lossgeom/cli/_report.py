"""``lossgeom report``: the report of a run directory or a study directory."""

from __future__ import annotations

from pathlib import Path

import typer


def _fail(kind: str, err: BaseException, code: int) -> None:
    typer.echo(f"{kind}: {err}", err=True)
    raise typer.Exit(code=code) from None


def report_cmd(
    directory: Path = typer.Argument(
        ..., help="A run directory (lossgeom train) or a study directory."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="The report file (default: report.html, or report.md with --format md).",
    ),
    format: str | None = typer.Option(
        None,
        "--format",
        help="html (one self-contained page) or md (Markdown with PNG figures); "
        "default: from --out's suffix, else html.",
    ),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bar (default: on a terminal)."
    ),
) -> None:
    """Write the report of DIRECTORY: curves, spectra, slices, tables, verdicts.

    HTML is one file that opens offline (plotly embedded, nothing fetched);
    Markdown writes its figures as PNGs into <stem>_files/ beside it. What the
    directory lacks is said in the report, and the rest is shown.

    Exit codes: 0 written; 2 DIRECTORY is not a run or study directory (or a
    bad --format); 6 the report cannot be written (disk full, permissions);
    130 interrupted.
    """
    import lossgeom as lg

    if format is None:
        format = "md" if out is not None and out.suffix.lower() == ".md" else "html"
    if format not in lg.report.FORMATS:
        _fail(
            "error",
            ValueError(
                f"--format must be one of {list(lg.report.FORMATS)}; got {format!r}"
            ),
            2,
        )
    out = out if out is not None else Path(f"report.{format}")
    try:
        written = lg.report.write_report(
            directory, out, format=format, progress=progress
        )
    except KeyboardInterrupt as err:
        _fail("interrupted", err, 130)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        _fail("error", err, 2)
    except OSError as err:
        _fail("I/O error", err, 6)
    typer.echo(f"wrote {written}")
