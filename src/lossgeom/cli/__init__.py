"""Layer 6: the ``lossgeom`` command."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    name="lossgeom",
    help="Measure the geometry of neural-network loss landscapes.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Measure the geometry of neural-network loss landscapes."""


@app.command()
def demo(
    out: Path = typer.Option(
        Path("demo-out"), "--out", help="Folder for results.json."
    ),
    steps: int = typer.Option(300, help="SGD steps of training."),
    width: int = typer.Option(32, help="Hidden width of the MLP."),
    seed: int = typer.Option(0, help="Seed of initialisation, batches and directions."),
    dense: bool = typer.Option(True, help="Also compute the exact dense spectrum."),
) -> None:
    """Train a small MLP on sklearn digits, probe its curvature, write OUT/results.json."""
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
) -> None:
    """Train from CONFIG, writing metrics.jsonl, checkpoints and status.json."""
    from lossgeom.train import ConfigError, train

    try:
        result = train(config, out, resume=resume, progress=not quiet)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    typer.echo(
        f"{result.status} at step {result.step} in {result.cost.seconds:.1f} s; "
        f"run directory {result.run_dir}"
    )
    if result.status != "finished":
        raise typer.Exit(code=3)


def main() -> None:
    """Entry point of the ``lossgeom`` console script."""
    app()
