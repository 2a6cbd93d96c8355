"""Opening anything that reads as a bundle: a folder, a zip, or a stored version ``REPO@REF``.

The one place that knows both the bundle format and the repository, so neither imports the other.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import MaskstoreError
from ..files import shorten
from .format import Bundle
from .writer import WritableBundle

_PATH_ERRORS = (errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENOTDIR)


def open_bundle(path: str | os.PathLike, writable: bool = False) -> Bundle:
    """Open a bundle lazily from wherever it lives: a folder, a ``.zip`` of one, an ``s3://``
    bundle, or a repository version ``REPO@REF`` where REPO is a folder or an ``s3://``
    repository (a remote that ``push`` wrote).

    Args:
        path: the bundle, or ``REPO@REF`` for a stored version (read-only).
        writable: open a folder bundle for adding personas.
    Returns:
        A :class:`Bundle` (only the chunks that are read are fetched).
    Raises:
        MaskstoreError: nothing readable as a bundle is there, or the path itself cannot be
            used (too long, not permitted, a loop of links).
    """
    try:
        return _open(path, writable)
    except OSError as e:
        if e.errno not in _PATH_ERRORS:
            raise
        raise MaskstoreError(f"cannot open {shorten(str(path))}: {e.strerror}") from None


def _open(path: str | os.PathLike, writable: bool) -> Bundle:
    s = str(path)
    remote = "://" in s and not s.startswith("file://")
    if "@" in s and (remote or not Path(s).exists()):
        repo, _ = s.rsplit("@", 1)
        if _is_repo(repo, remote):
            if writable:
                raise MaskstoreError(
                    f"{s} is a stored version and read-only: check it out to modify it"
                )
            from ..repo import open_version  # the repository loads only for versions

            return open_version(s).bundle
    if remote:
        if writable:
            raise MaskstoreError(f"{s} is a remote bundle and read-only here: copy it to a folder")
        from .format import StoreSource
        from .stores import open_store

        return Bundle(source=StoreSource(open_store(s), s))
    return WritableBundle(path) if writable else Bundle(path)


def _is_repo(path: str, remote: bool) -> bool:
    if not remote:
        return (Path(path) / "maskstore-repo.json").exists()
    from .stores import open_store

    return open_store(path).get("maskstore-repo.json", limit=4096) is not None
