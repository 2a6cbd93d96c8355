"""The ``maskstore`` command line: a thin typer layer over the library.

Each ``*_cmd`` module registers its commands on :data:`maskstore.cli.app.app`; torch-heavy library
modules are imported inside the commands that need them, so inspection commands start fast.
"""

from __future__ import annotations

import sys

from maskstore.errors import MaskstoreError

from . import build_cmd, bundle_cmd, repo_cmd, runtime_cmd  # noqa: F401 - register commands
from ._common import err_console
from .app import app


def main() -> None:
    """Console entry point: one-line errors, never a traceback."""
    try:
        app()
    except MaskstoreError as e:
        err_console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - last resort: still one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        err_console.print(
            f"[red]error:[/] {type(e).__name__}: {msg}", highlight=False, soft_wrap=True
        )
        sys.exit(1)
