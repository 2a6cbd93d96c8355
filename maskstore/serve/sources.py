"""What ``POST /v1/personas/load`` may open: bundles under the roots the operator named.

A source is a bundle folder, a ``.zip`` of one or ``REPO@REF`` whose path resolves (links
followed) inside a ``--bundle-root`` folder, or an ``s3://`` bundle or repository under a
``--bundle-root s3://bucket/prefix``. Nothing else: no other protocols, no fsspec URL chains
(``zip://x::http://...`` would make the server connect anywhere), no paths elsewhere on the
server's disk. Every refusal, and every failure to open an allowed source, is the same one
line, so a client cannot learn what exists on the server's disk; a source that fails to open
leaves nothing open.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from ..errors import MaskstoreError
from ..store.format import Bundle
from ..store.opener import open_bundle

REFUSED = (
    "source refused: name a bundle folder, a .zip or REPO@REF under a --bundle-root of this "
    "server (and check that it is one)"
)
_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
_S3 = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/-]*)?")


class SourcePolicy:
    """Opens run-time sources under ``roots`` (folders, or ``s3://bucket/prefix`` URLs)."""

    def __init__(self, roots: Sequence[str | os.PathLike]) -> None:
        self.local: list[str] = []
        self.s3: list[str] = []
        for r in roots:
            s = str(r)
            if s.startswith("s3://"):
                if not _S3.fullmatch(s) or any(
                    p in ("", ".", "..") for p in s[5:].split("/")[1:-1]
                ):
                    raise MaskstoreError(f"--bundle-root {s[:80]!r}: not an s3://bucket/prefix URL")
                self.s3.append(s.rstrip("/") + "/")
            elif "://" in s:
                raise MaskstoreError(f"--bundle-root {s[:80]!r}: a folder or an s3:// URL only")
            else:
                real = os.path.realpath(s)
                if not os.path.isdir(real):
                    raise MaskstoreError(f"--bundle-root {s[:80]!r} is not a folder")
                self.local.append(real)

    def __bool__(self) -> bool:
        return bool(self.local or self.s3)

    def resolve(self, source: str) -> str:
        """``source`` as it will be opened, or :data:`REFUSED`."""
        if not isinstance(source, str) or not source or len(source) > 4096 or "\x00" in source:
            raise MaskstoreError(REFUSED)
        if "::" in source or "\\" in source:
            raise MaskstoreError(REFUSED)  # an fsspec chain, or a Windows-style path
        base, ref = source, None
        if "@" in source:
            head, tail = source.rsplit("@", 1)
            if _REF.fullmatch(tail) and ".." not in tail.split("/"):
                base, ref = head, tail
        if base.startswith("s3://"):
            parts = base[5:].split("/")
            if not _S3.fullmatch(base) or any(p in (".", "..") for p in parts):
                raise MaskstoreError(REFUSED)
            if not any((base.rstrip("/") + "/").startswith(r) for r in self.s3):
                raise MaskstoreError(REFUSED)
            out = base
        elif "://" in base:
            raise MaskstoreError(REFUSED)  # http, ftp, file, zip, tar, reference, ...
        else:
            real = os.path.realpath(base)  # a link out of the roots resolves out of them
            if not any(real.startswith(r.rstrip(os.sep) + os.sep) for r in self.local):
                raise MaskstoreError(REFUSED)
            out = real
        return out if ref is None else f"{out}@{ref}"

    def open(self, source: str) -> Bundle:
        """The bundle at ``source``; :data:`REFUSED` for anything else, whatever the reason."""
        where = self.resolve(source)
        try:
            return open_bundle(where)
        except (MaskstoreError, OSError, ValueError) as e:
            raise MaskstoreError(REFUSED) from e
