"""The ``dynconv`` command line."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

import dynconv

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Dynamic convolutions from trained models.")


@app.callback()
def _root() -> None:
    """Dynamic convolutions (CondConv, DyConv, DyNet) initialised from trained convs."""


@app.command()
def kinds() -> None:
    """List the dynamic convolution kinds this install provides."""
    table = Table("kind", "layer", "routing")
    for name, cls in dynconv.LAYERS.items():
        table.add_row(name, f"dynconv.{cls.__name__}", (cls.__doc__ or "").strip().splitlines()[0])
    Console().print(table)


@app.command()
def version() -> None:
    """Print the dynconv and torch versions."""
    import torch

    typer.echo(f"dynconv {dynconv.__version__} (torch {torch.__version__})")


def main() -> None:
    """Console-script entry point."""
    app()
