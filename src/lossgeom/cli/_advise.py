"""``lossgeom advise``: the training advisor on a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def advise_cmd(
    run_dir: Path = typer.Argument(..., help="The run directory."),
    early_fraction: float = typer.Option(
        0.1,
        "--early-fraction",
        help="The window the rules read, as a fraction of the run's steps.",
    ),
    other: list[Path] = typer.Option(
        [],
        "--other",
        help="Run directory of another seed of the same model and data "
        "(repeatable): the barrier between their early weights.",
    ),
    save: bool = typer.Option(
        True, "--save/--no-save", help="Save the advice in RUN_DIR/advice/."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the advice as JSON."),
    allow_factory: bool = typer.Option(
        False,
        "--allow-factory",
        help="Allow model.factory (imports user code) to measure the barrier.",
    ),
) -> None:
    """Advice for a training run from its early metrics (docs/advice.md).

    Prints each recommendation (rule, evidence, expected effect, config change)
    and the rules that could not be evaluated with what to turn on.

    Exit codes: 0 no rule fires; 3 advice given; 2 not a run directory, no
    metrics in the window yet, or a bad option; 4 a damaged file.
    """
    import lossgeom as lg

    try:
        result = lg.train.advise(
            run_dir,
            early_fraction=early_fraction,
            others=other,
            save=save,
            allow_factory=allow_factory,
        )
    except lg.train.DamagedFileError as err:
        _fail("damaged file", err, 4)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        _fail("cannot advise", err, 2)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=1))
    else:
        typer.echo(result.summary())
        if save:
            typer.echo(f"saved in {Path(run_dir) / 'advice'}")
    if result.recommendations:
        raise typer.Exit(code=3)


def _fail(kind: str, err: BaseException, code: int) -> None:
    typer.echo(f"{kind}: {err}", err=True)
    raise typer.Exit(code=code) from None
