"""Reading the local files a user names (calibration text, multiple-choice and pair CSVs, text
lists): regular files only, opened without blocking, read up to a bound.

A FIFO with no writer would block a plain ``open`` forever, and ``/dev/zero`` would grow memory
until the process dies: both are refused in one line before a byte is read. Symbolic links are
followed (the user named the path); what maskstore reads from bundles and repositories goes
through :mod:`maskstore.store.stores`, which never follows them.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import MaskstoreError

MAX_TEXT = 256 << 20  # calibration sets and evaluation files are kilobytes to megabytes


def shorten(text: str, keep: int = 120) -> str:
    """``text`` cut to about ``keep`` characters (its start and end), for messages that name
    a path someone else chose."""
    if len(text) <= keep:
        return text
    return f"{text[: keep // 2]}...{text[-(keep // 2) :]} ({len(text)} characters)"


def open_regular(path: str | os.PathLike, what: str = "file", follow: bool = True) -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file.

    Args:
        follow: follow a symbolic link at ``path`` (a path the user typed); False for files
            found in a folder from elsewhere, whose links could point anywhere.
    Raises:
        MaskstoreError: the file is missing or unreadable, or is a FIFO, socket, device or
            folder (refused without blocking), or a symbolic link when ``follow`` is False.
    """
    path = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise MaskstoreError(f"{what} {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:
            raise MaskstoreError(
                f"{what} {path} is a symbolic link: refused (links are not followed here)"
            ) from None
        raise MaskstoreError(f"cannot read {what} {shorten(str(path))}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
            raise MaskstoreError(f"{what} {path} is {kind}: give a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_text(path: str | os.PathLike, what: str = "file", limit: int = MAX_TEXT) -> str:
    """The UTF-8 text of the regular file ``path`` (at most ``limit`` bytes), newlines as
    they are in the file.

    Raises:
        MaskstoreError: as :func:`open_regular`, or the file is larger than ``limit`` or not
            UTF-8.
    """
    with open_regular(path, what) as f:
        big = os.fstat(f.fileno()).st_size > limit
        data = b"" if big else f.read(limit + 1)  # /proc files say 0 bytes: read to the bound
    if big or len(data) > limit:
        raise MaskstoreError(
            f"{what} {path} is larger than {limit >> 20} MiB: split it or take a sample"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MaskstoreError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
