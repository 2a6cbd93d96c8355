"""Console, progress bars and formatting shared by the commands."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from pathlib import Path

    from rich.progress import Progress

    from maskstore.compare.algebra import Ref

console = Console()
err_console = Console(stderr=True)


_CONTROL = dict.fromkeys([*range(0, 32), 127, *range(0x80, 0xA0)])
_CONTROL.pop(ord("\n"))


def safe(text: object, one_line: bool = False) -> str:
    """``text`` fit for the terminal: control characters (escape sequences included) dropped
    and rich markup escaped. Every string that comes from a bundle, a repository, a remote or
    an argument goes through this before it is printed."""
    from rich.markup import escape

    s = str(text).translate(_CONTROL)
    return escape(s.replace("\n", " ") if one_line else s)


JSON_SCHEMA_VERSION = 1  # of the documents --json prints: snake_case keys, "persona" for a name


# Library messages name Python parameters; the command line says them as its flags (one table).
FLAGS = {
    "force=True": "--force",
    "untie=True": "--untie",
    "check_weights=False": "--no-check-weights",
    "allow_empty=True": "--allow-empty",
    "skip_lm_head=True": "--skip-lm-head",
    "choose another output": "choose another --out",
}


# library parameters that messages name in backquotes, and the flag each is on this command line
PARAMS = {p: "--" + p.replace("_", "-") for p in (
    "samples", "chat_template", "served_model_name", "port", "gamma", "sign", "repo", "ours",
    "theirs", "allowed_signers", "model", "at_least", "offload", "damp", "only", "template",
    "max_memory", "method", "max_new_tokens", "prompt")} | {"pattern": "--modules"}  # fmt: skip


def as_flags(message: str) -> str:
    """A library message with its parameter names said as this command line's flags: the
    boolean forms above, and the backquoted parameters of ``PARAMS`` (`` `max_memory` `` ->
    ``--max-memory``; other backquoted text, a path's say, is left alone)."""
    for python, flag in FLAGS.items():
        message = message.replace(python, flag)
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: PARAMS.get(m.group(1), m.group(0)), message)


def personas_of(values: list[str] | None) -> list[str] | None:
    """The personas a repeatable ``--persona`` names: each value may itself list several,
    comma-separated (``--persona a --persona b`` and ``--persona a,b`` are the same)."""
    if not values:
        return None
    return [p for v in values for p in v.split(",") if p] or None


def one_out(positional: Path | None, option: Path | None) -> Path:
    """The output named either way (the last argument, or --out as elsewhere), exactly once."""
    from maskstore.errors import MaskstoreError

    if (positional is None) == (option is None):
        raise MaskstoreError("name the output once: as the last argument or with --out")
    return positional or option  # type: ignore[return-value]


def check_output(path: Path | None, flag: str) -> None:
    """Fail before any compute when an output file (``--png``, ``--per-item``) cannot be
    written where asked: its folder is missing, or the path is a folder, FIFO or device."""
    import os
    import stat

    from maskstore.errors import MaskstoreError

    if path is None:
        return
    if not path.parent.is_dir():
        raise MaskstoreError(f"{flag} {path}: folder {path.parent} does not exist; create it first")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise MaskstoreError(f"{flag} {path} exists and is not a regular file: choose another path")


def write_output(path: Path, data: bytes, flag: str) -> None:
    """``data`` written to exactly ``path``: into a new file in its folder, then renamed over
    it, so a reader never sees half a file and a link at ``path`` is replaced, not followed."""
    import os
    import tempfile

    check_output(path, flag)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def emit_json(doc: object) -> None:
    """The one JSON document a ``--json`` command prints on stdout (objects carry
    ``schema_version``)."""
    if isinstance(doc, dict):
        doc = {"schema_version": JSON_SCHEMA_VERSION, **doc}
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()  # serve prints its document and keeps running


def progress(disable: bool = False) -> Progress:
    """A transient progress bar with elapsed time and ETA on stderr (hidden when stderr is not
    a terminal, and with ``disable``: commands pass ``disable=json_out``)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=disable,
    )


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def heat(value: float, metric: str, lo: float = 0.0, hi: float = 1.0) -> str:
    """A number coloured on a red-yellow-green scale from ``lo`` to ``hi`` (the range of the
    values shown, so close values still get different colours; higher is greener)."""
    if metric in ("intersection", "hamming"):
        return f"{value:,}"
    span = hi - lo
    v = 0.5 if span <= 0 else max(0.0, min(1.0, (float(value) - lo) / span))
    if metric == "diff_ratio":
        v = 1.0 - v
    r = int(255 * min(1.0, 2 * (1 - v)))
    g = int(255 * min(1.0, 2 * v))
    return f"[rgb({r},{g},60)]{value:.4f}[/]"


def persona_refs(bundle_path: str | Path, personas: list[str] | None) -> list[Ref]:
    """Persona arguments: ``NAME`` (in BUNDLE) or ``OTHER_BUNDLE#NAME``; every name is checked
    (an unknown one fails listing the known ones)."""
    from maskstore.compare import algebra
    from maskstore.store.opener import open_bundle

    base = open_bundle(bundle_path)
    others: dict[str, object] = {}
    refs, sources = [], []
    for p in base.personas if personas is None else personas:
        if "#" in p:
            path, name = p.rsplit("#", 1)
            b = others.setdefault(path, open_bundle(path))
            refs.append(algebra.Ref(b, name))  # type: ignore[arg-type]
            sources.append(path)
        else:
            refs.append(algebra.Ref(base, p))
            sources.append(str(bundle_path))
    for r in refs:
        r.bundle.persona(r.name)
    return algebra.labelled(refs, sources)
