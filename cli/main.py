"""The ``maskstore`` command line: a thin typer layer over the library.

Each ``*_cmd`` module registers its commands on :data:`maskstore.cli.app.app`. A command line
imports only the module of the command it names (``--help`` and unknown names import them all),
and torch-heavy library modules are imported inside the commands that need them, so inspection
commands start fast (``benchmarks/bench_startup.py``).
"""

from __future__ import annotations

import importlib
import sys
import warnings

from maskstore.errors import IntegrityError, MaskstoreError

from ._common import err_console, safe
from .app import app

# command -> the module that registers it (tests check that this covers every command)
COMMANDS = {
    "build": "build_cmd",
    **dict.fromkeys(
        (
            "info verify overlap diff union intersect subtract xor complement vote blend import-pt "
            "export-pt pack cp mv rm"
        ).split(),
        "bundle_cmd",
    ),
    **dict.fromkeys(
        (
            "init commit log tag sign branch checkout push pull merge export import gc remote "
            "fetch clone status"
        ).split(),
        "repo_cmd",
    ),
    **dict.fromkeys(("run", "eval", "similarity", "export-model"), "runtime_cmd"),
    "serve": "serve_cmd",
}


def register(argv: list[str] | None = None) -> None:
    """Import the command modules that ``argv`` needs (all of them when it names none)."""
    argv = sys.argv if argv is None else argv
    first = next((a for a in argv[1:] if not a.startswith("-")), None)
    modules = {COMMANDS[first]} if first in COMMANDS else set(COMMANDS.values())
    for m in sorted(modules):
        importlib.import_module(f"{__package__}.{m}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr, without the source location."""
    from ._common import as_flags

    err_console.print(
        f"[yellow]warning:[/] {safe(as_flags(str(message)), one_line=True)}",
        highlight=False,
        soft_wrap=True,
    )


def _json_error(message: str, code: int, extra: dict | None = None) -> None:
    """With ``--json``, an error is also a JSON object on stdout (a merge conflict adds the
    ``conflicts`` it names)."""
    if "--json" in sys.argv[1:]:
        from ._common import emit_json

        emit_json({"error": " ".join(message.split()), "exit_code": code, **(extra or {})})


def main() -> None:
    """Console entry point: one-line errors (exit 2 for bad input), never a traceback."""
    warnings.showwarning = _show_warning
    try:
        from typer._click import exceptions as click_exc
    except ImportError:  # typer before 0.26 uses click itself
        from click import exceptions as click_exc  # type: ignore[no-redef]
    try:
        register()
        rc = app(prog_name="maskstore", standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except click_exc.NoArgsIsHelpError as e:
        e.show()
        sys.exit(2)
    except click_exc.UsageError as e:
        sub = e.ctx.info_name if e.ctx is not None and e.ctx.parent is not None else None
        hint = f"maskstore {sub} --help" if sub else "maskstore --help"
        err_console.print(
            f"[red]error:[/] {safe(e.format_message(), one_line=True)} (see {safe(hint)})",
            highlight=False,
            soft_wrap=True,
        )
        _json_error(e.format_message(), 2)
        sys.exit(2)
    except click_exc.ClickException as e:
        err_console.print(f"[red]error:[/] {safe(e.format_message(), one_line=True)}")
        sys.exit(2)
    except getattr(click_exc, "Abort", KeyboardInterrupt):
        err_console.print("[red]interrupted[/]")
        sys.exit(130)
    except MaskstoreError as e:
        from ._common import as_flags

        msg = as_flags(str(e))
        err_console.print(
            f"[red]error:[/] {safe(msg, one_line=True)}", highlight=False, soft_wrap=True
        )
        code = 1 if isinstance(e, IntegrityError) else 2  # 1: damage, 2: bad input
        conflicts = getattr(e, "conflicts", None)
        _json_error(msg, code, {"conflicts": conflicts} if conflicts else None)
        sys.exit(code)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - last resort: still one line
        hint = _s3_hint(e) or _disk_hint(e) or _path_hint(e)
        if hint is not None:
            err_console.print(f"[red]error:[/] {safe(hint)}", highlight=False, soft_wrap=True)
            _json_error(hint, 2)
            sys.exit(2)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        msg = f"internal error, please report it: {type(e).__name__}: {msg}"
        err_console.print(f"[red]error:[/] {safe(msg, one_line=True)}", highlight=False,
                          soft_wrap=True)  # fmt: skip
        _json_error(msg, 3)
        sys.exit(3)


def _path_hint(e: Exception) -> str | None:
    """One line for a path the system refuses (too long, not permitted, a loop of links, a
    file where a folder should be), naming it cut short."""
    import errno

    from maskstore.files import shorten

    bad = (errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENOTDIR, errno.EROFS)
    if isinstance(e, OSError) and e.errno in bad:
        where = f" {shorten(str(e.filename))}" if e.filename else ""
        return f"cannot use the path{where}: {e.strerror}; check it (and its permissions)"
    return None


def _disk_hint(e: Exception) -> str | None:
    """One line for a full disk (or a file-size limit) met while writing."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        where = f" writing {e.filename}" if e.filename else ""
        return (f"no space left{where} ({e.strerror}): free some and run it again; what was "
                "being written was not kept")  # fmt: skip
    return None


def _s3_hint(e: Exception) -> str | None:
    """One line naming the bucket or endpoint and the fix for the S3 errors users meet (None
    for any other error)."""
    import os

    name, text = type(e).__name__, str(e)
    url = next((a for a in sys.argv[1:] if a.startswith("s3://")), "s3://...")
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return ("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                "AWS_PROFILE), and AWS_ENDPOINT_URL for a server other than AWS")  # fmt: skip
    if "NoSuchBucket" in text or "bucket does not exist" in text:
        return f"S3 bucket {bucket!r} does not exist: create it, or check the URL {url}"
    if name in ("EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError") or (
        "Could not connect to the endpoint" in text
    ):
        where = os.environ.get("AWS_ENDPOINT_URL", "the S3 endpoint")
        return f"cannot reach {where} for {url}: check that it runs (AWS_ENDPOINT_URL)"
    if name in ("InvalidAccessKeyId", "SignatureDoesNotMatch") or "AccessDenied" in text:
        return f"S3 refused access to bucket {bucket!r}: check the credentials and its policy"
    return None
