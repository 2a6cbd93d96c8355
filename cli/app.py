"""The typer application that every command module registers on (a leaf: it imports no command)."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    name="maskstore",
    help="Store, compare, version and serve persona masks over LLM weights.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


@app.callback()
def _root() -> None:
    """Store, compare, version and serve persona masks over LLM weights."""
    # A callback keeps typer in group mode when a command line loads one command module
    # (maskstore.cli.main imports only the module of the command asked for).
