"""``lossgeom study``: run a study, see where it stands, tabulate its results."""

from __future__ import annotations

from pathlib import Path

import typer

study_app = typer.Typer(
    name="study",
    help="Sweeps over hyper-parameters and seeds, stored and resumable.",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(kind: str, err: BaseException, code: int) -> None:
    typer.echo(f"{kind}: {err}", err=True)
    raise typer.Exit(code=code) from None


@study_app.command("run")
def run_cmd(
    study_file: Path = typer.Argument(..., help="The study file (YAML)."),
    out: Path = typer.Option(..., "--out", help="The study directory."),
    jobs: int | None = typer.Option(
        None, "--jobs", min=1, help="Runs at once (local; default: the cores)."
    ),
    executor: str | None = typer.Option(
        None, "--executor", help="local or slurm (default: the study file's)."
    ),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Run failed runs again, from their checkpoint."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Take over a directory of another study (its index set aside).",
    ),
    allow_factory: bool = typer.Option(
        False, "--allow-factory", help="Allow model.factory (imports user code)."
    ),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bar (default: on a terminal)."
    ),
) -> None:
    """Run STUDY_FILE into --out: skip finished runs, resume killed ones.

    Exit codes: 0 every run ended without failing; 3 some runs failed (listed);
    2 an invalid study file or directory; 5 another coordinator runs it;
    130 interrupted.
    """
    import lossgeom as lg

    try:
        result = lg.study.run(
            study_file,
            out,
            jobs=jobs,
            executor=executor,
            retry_failed=retry_failed,
            force=force,
            progress=progress,
            allow_factory=allow_factory,
        )
    except KeyboardInterrupt as err:
        _fail("interrupted (run the same command to resume)", err, 130)
    except lg.study.StudyLockedError as err:
        _fail("study in use", err, 5)
    except (lg.study.StudyError, FileNotFoundError, NotADirectoryError) as err:
        _fail("study error", err, 2)
    typer.echo(result.summary())
    if result.counts.get("failed"):
        typer.echo("re-run with --retry-failed to run the failed runs again", err=True)
        raise typer.Exit(code=3)


@study_app.command("status")
def status_cmd(
    directory: Path = typer.Argument(..., help="The study directory."),
) -> None:
    """Runs by status (finished, diverged, failed, running, pending) and errors."""
    import lossgeom as lg

    try:
        typer.echo(lg.study.status(directory).summary())
    except FileNotFoundError as err:
        _fail("study error", err, 2)


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@study_app.command("table")
def table_cmd(
    directory: Path = typer.Argument(..., help="The study directory."),
    by: str = typer.Option(..., "--by", help="Config paths, comma-separated."),
    metrics: str = typer.Option(
        ..., "--metrics", help="Metric or probe columns, comma-separated."
    ),
    csv: Path | None = typer.Option(None, "--csv", help="Also write the table here."),
) -> None:
    """Mean, standard error and count over seeds of the runs' final values."""
    import pandas as pd

    import lossgeom as lg

    try:
        frame = lg.study.table(directory, by=_names(by), metrics=_names(metrics))
    except (FileNotFoundError, ValueError) as err:
        _fail("study error", err, 2)
    if csv is not None:
        frame.to_csv(csv)
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        typer.echo(frame.to_string(float_format=lambda x: f"{x:.4g}"))


def analyze_cmd(
    directory: Path = typer.Argument(..., help="The study directory."),
    hypothesis: str | None = typer.Option(
        None,
        "--hypothesis",
        help="h1, h2, h3, h4 or h5 (default: every one the study allows).",
    ),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level."),
) -> None:
    """Test the hypotheses on a study; store each result in DIR/analysis/<name>/.

    Exit codes: 0 analysed; 2 the study lacks what the hypothesis needs (the
    message says what and which study file provides it).
    """
    import lossgeom as lg

    names = [hypothesis] if hypothesis else sorted(lg.analysis.HYPOTHESES)
    done = 0
    for name in names:
        try:
            result = lg.analysis.analyze(directory, name, alpha=alpha)
        except (ValueError, FileNotFoundError) as err:
            if hypothesis:
                _fail("cannot analyze", err, 2)
            typer.echo(f"{name}: skipped ({err})")
            continue
        done += 1
        typer.echo(result.summary())
        typer.echo(f"  stored in {Path(directory) / 'analysis' / name.lower()}\n")
    if not done:
        raise typer.Exit(code=2)
