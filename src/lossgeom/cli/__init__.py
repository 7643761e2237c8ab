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


def main() -> None:
    """Entry point of the ``lossgeom`` console script."""
    app()
