"""Layer 6: the ``lossgeom`` command."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from lossgeom.cli._advise import advise_cmd
from lossgeom.cli._report import report_cmd
from lossgeom.cli._study import analyze_cmd, study_app

app = typer.Typer(
    name="lossgeom",
    help="Measure the geometry of neural-network loss landscapes.",
    no_args_is_help=True,
    add_completion=False,
)


app.add_typer(study_app)
app.command("analyze")(analyze_cmd)
app.command("advise")(advise_cmd)
app.command("report")(report_cmd)


@app.callback()
def _root() -> None:
    """Measure the geometry of neural-network loss landscapes."""


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Output folder."),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Probe one small model instead (OUT/results.json and figures).",
    ),
    seeds: int = typer.Option(3, help="Seeds per batch size of the study."),
    jobs: int | None = typer.Option(None, help="Runs at once (default: the cores)."),
    steps: int = typer.Option(300, help="--quick: SGD steps of training."),
    width: int = typer.Option(32, help="--quick: hidden width of the MLP."),
    seed: int = typer.Option(0, help="--quick: seed of initialisation and directions."),
    dense: bool = typer.Option(True, help="--quick: also the exact dense spectrum."),
) -> None:
    """Run the batch-size study and test H1; --quick probes one small MLP instead.

    The study: 2 batch sizes x 3 seeds of an MLP on sklearn digits, stopped at the
    same train loss, probed at the end; writes OUT/report.html. --quick writes
    OUT/results.json and figures.
    """
    if not quick:
        from lossgeom.cli._demo_study import format_summary, run_demo_study

        try:
            results = run_demo_study(out, seeds=seeds, jobs=jobs, progress=True)
        except ValueError as err:
            _fail("cannot run the demo", err, 2)
        typer.echo(format_summary(results))
        return
    from lossgeom.cli._demo import format_table, run_demo

    try:
        results = run_demo(out, steps=steps, width=width, seed=seed, dense=dense)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    typer.echo(format_table(results))
    typer.echo(f"\nwrote {out / 'results.json'}")


@app.command("train")
def train_cmd(
    config: Path = typer.Argument(..., help="Training config (YAML)."),
    out: Path | None = typer.Option(
        None, "--out", help="Run directory (default runs/<config name>)."
    ),
    resume: bool = typer.Option(
        True, help="Continue from the last checkpoint in the run directory."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No line per measurement."),
    allow_factory: bool = typer.Option(
        False,
        "--allow-factory",
        help="Allow model.factory: import and run the code the config names.",
    ),
) -> None:
    """Train from CONFIG, writing metrics.jsonl, checkpoints and status.json.

    Under torchrun the run is data-parallel and rank 0 alone writes and prints.

    Exit codes: 0 finished, 3 diverged; on an error one line on stderr and 2
    (config), 4 (damaged file), 5 (run directory in use), 6 (I/O: disk full,
    permissions), 130 (interrupted) or 1 (anything else).
    """
    from lossgeom.train import train

    try:
        result = train(
            config, out, resume=resume, progress=not quiet, allow_factory=allow_factory
        )
    except KeyboardInterrupt as err:
        _fail("interrupted", err, 130)
    except Exception as err:  # one clear line per kind of error, never a traceback
        kind, code = _error_kind(err)
        _fail(kind, err, code)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone prints
        typer.echo(
            f"{result.status} at step {result.step} in {result.cost.seconds:.1f} s; "
            f"run directory {result.run_dir}"
        )
    if result.status != "finished":
        raise typer.Exit(code=3)


def _error_kind(err: BaseException) -> tuple[str, int]:
    """What kind of error ``err`` is, for the message, and the exit code."""
    from lossgeom.train import ConfigError, DamagedFileError, RunLockedError

    if isinstance(err, ConfigError):
        return "config error", 2
    if isinstance(err, DamagedFileError):
        return "damaged file", 4
    if isinstance(err, RunLockedError):
        return "run directory in use", 5
    if isinstance(err, FileNotFoundError) and "training config" in str(err):
        return "config error", 2
    if isinstance(err, OSError):
        return "I/O error", 6
    if isinstance(err, (ValueError, TypeError)):
        return "error", 2
    return f"unexpected error ({type(err).__name__})", 1


def _fail(kind: str, err: BaseException, code: int) -> None:
    """Print ``kind: message`` (and where the traceback is) and exit with ``code``."""
    typer.echo(f"{kind}: {err}", err=True)
    where = getattr(err, "traceback_file", None)
    if where is not None:
        typer.echo(f"traceback: {where}", err=True)
    raise typer.Exit(code=code) from None


def main() -> None:
    """Entry point of the ``lossgeom`` console script."""
    app()
