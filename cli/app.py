"""The typer application that every command module registers on (a leaf: it imports no command)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

app = typer.Typer(
    name="maskstore",
    help="Store, compare, version and serve persona masks over LLM weights.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: wraps at any width, never cuts a word
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
BundleArg = Annotated[str, typer.Argument(help="bundle: a folder, a .zip, s3://..., or REPO@REF")]
WritableBundleArg = Annotated[Path, typer.Argument(help="bundle folder (written in place)")]
DeviceOpt = Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1, ...")]
# the model of commands that use a bundle's personas (build has its own default: the embedded one)
ModelOpt = Annotated[
    str | None,
    typer.Option(help="HF model folder or cached Hub id (default: the bundle's recorded one)"),
]


def choice(*values: str) -> Any:
    """The type of an option that takes one of ``values`` (a ``Literal``): help lists them and
    a wrong value is a usage error naming them."""
    return Literal[values]


def _version(value: bool) -> None:
    if value:
        from maskstore._version import __version__

        typer.echo(f"maskstore {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Store, compare, version and serve persona masks over LLM weights."""
    # A callback keeps typer in group mode when a command line loads one command module
    # (maskstore.cli.main imports only the module of the command asked for).
