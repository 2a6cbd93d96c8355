"""Opening anything that reads as a bundle: a folder, a zip, or a stored version ``REPO@REF``.

The one place that knows both the bundle format and the repository, so neither imports the other.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MaskstoreError
from .format import Bundle
from .writer import WritableBundle


def open_bundle(path: str | os.PathLike, writable: bool = False) -> Bundle:
    """Open a bundle directory, a ``.zip`` of one, or a repository version ``REPO@REF``, lazily.

    Args:
        path: the bundle, or ``REPO@REF`` for a stored version (read-only).
        writable: open a directory bundle for adding personas.
    Returns:
        A :class:`Bundle`.
    """
    s = str(path)
    if (
        "@" in s
        and not Path(s).exists()
        and (Path(s.rsplit("@", 1)[0]) / "maskstore-repo.json").exists()
    ):
        if writable:
            raise MaskstoreError(
                f"{s} is a stored version and read-only: check it out to modify it"
            )
        from .repo import open_version  # the repository loads only for versions

        return open_version(s).bundle
    return WritableBundle(path) if writable else Bundle(path)
