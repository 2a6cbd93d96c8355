"""Repository objects: chunks named by their xxh3-128, version manifests named by their blake2b-256.

Both are zstd frames, except mask chunks that the Golomb coder of :mod:`maskstore.store.gapcode` makes
smaller (sparse or skewed bits; told apart by their magic). A chunk's raw bytes are checked against its name on every read; a manifest's
against its version id. Decompression is bounded by what the object may hold.
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import IntegrityError, MaskstoreError
from ..store import codecs
from ..store.hashing import blake2b_hex, canonical_json, xxh3
from ..store.names import check_persona_name, is_hex
from ..store.stores import Store

REPO_MARKER = "maskstore-repo.json"
REPO_FORMAT = 1


def chunk_key(h: str) -> str:
    """The store key of chunk ``h`` (``chunks/<2 hex>/<30 hex>``)."""
    return f"chunks/{h[:2]}/{h[2:]}"


def version_key(vid: str) -> str:
    return f"versions/{vid}"


GAP_MAGIC = b"\x89MSG"  # maskstore.store.gapcode.MAGIC (not imported: it loads numba)
MAX_OBJECT_BYTES = 256 << 20  # what one chunk may decode to when its size is not known
MAX_MANIFEST_BYTES = 64 << 20  # what one manifest may decode to


def stored_bound(raw_bytes: int) -> int:
    """The most bytes a zstd frame of ``raw_bytes`` can take (zstd's compress bound, rounded
    up): a larger object is refused before it is read."""
    return raw_bytes + (raw_bytes >> 7) + 4096


def encode_chunk(raw: np.ndarray | bytes, kept_share: float | None) -> bytes:
    """A chunk as stored: one zstd frame, its level from the codec policy; for mask bits far
    from half set (skewed masks, xor deltas), the Golomb-coded frame of
    :mod:`maskstore.store.gapcode` instead when it is smaller."""
    frame = codecs.zstd_compress(raw, codecs.zstd_level(kept_share))
    if codecs.is_skewed(kept_share):
        from ..store import gapcode

        gap = gapcode.encode(np.frombuffer(memoryview(raw), np.uint8), limit=len(frame) - 1)
        if gap is not None:
            return gap
    return frame


def decode_chunk(h: str, data: bytes, where: str, limit: int = MAX_OBJECT_BYTES) -> bytes:
    """The raw bytes of chunk object ``h`` (at most ``limit``), checked against its xxh3 name."""
    try:
        if data[:4] == GAP_MAGIC:
            from ..store import gapcode

            raw = gapcode.decode(data, limit)
        else:
            raw = codecs.zstd_decompress(data, limit)
    except ValueError as e:
        raise IntegrityError(f"chunk {h} in {where} cannot be decoded ({e}): damaged") from None
    if xxh3(raw) != h:
        raise IntegrityError(f"chunk {h} in {where} fails its xxh3 digest: damaged")
    return raw


def new_manifest(
    parents: list[str],
    message: str,
    root: dict,
    personas: dict,
    bundle_digest: str,
    author: str | None = None,
) -> dict:
    """The one constructor of a version's manifest (commits and merges)."""
    from datetime import UTC, datetime

    from .._version import __version__
    from ..store.format import FORMAT_VERSION

    return {
        "format": 1,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "parents": parents,
        "message": message,
        **({"author": author} if author else {}),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "bundle_digest": bundle_digest,
        "root": root,
        "personas": personas,
    }


def check_manifest(man: object, where: str) -> None:
    """Refuse a manifest whose structure is not what maskstore writes (names, object ids and
    delta references included), with one line naming what is wrong."""

    def bad(what: str) -> IntegrityError:
        return IntegrityError(f"{where}: {what}; the version is damaged or forged: refused")

    if not isinstance(man, dict):
        raise bad("the manifest is not an object")
    for key, kind in (("parents", list), ("personas", dict), ("root", dict), ("message", str)):
        if not isinstance(man.get(key), kind):
            raise bad(f"{key!r} is missing or not a {kind.__name__}")
    if not all(is_hex(v, 64) for v in man["parents"]):
        raise bad("a parent is not a version id")
    author = man.get("author")
    if author is not None and not (isinstance(author, str) and len(author) <= 256):
        raise bad("'author' is not a string of at most 256 characters")
    for name, pe in man["personas"].items():
        try:
            check_persona_name(name)
        except MaskstoreError:
            raise bad(f"persona name {name!r} is invalid") from None
        if not isinstance(pe, dict) or not isinstance(pe.get("meta"), dict):
            raise bad(f"persona {name!r} has no metadata")
        if not isinstance(pe.get("arrays"), dict):
            raise bad(f"persona {name!r} has no arrays")
        for key, e in pe["arrays"].items():
            if not isinstance(e, dict) or not isinstance(e.get("zarr"), dict):
                raise bad(f"{name}/{key} has no array metadata")
            chunks = e.get("chunks", [])
            if not isinstance(chunks, list) or not all(
                isinstance(c, list) and len(c) == 2 and is_hex(c[0], 32) and is_hex(c[1], 64)
                for c in chunks
            ):
                raise bad(f"{name}/{key} names a chunk that is not an object id")
            d = e.get("delta")
            if d is not None and not (
                isinstance(d, dict)
                and isinstance(d.get("persona"), str)
                and (d.get("version") is None or is_hex(d.get("version"), 64))
            ):
                raise bad(f"{name}/{key} has a malformed delta reference")


class Objects:
    """Chunks and manifests of one store, manifests cached once verified."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._manifests: dict[str, dict] = {}

    def read_chunk(
        self,
        h: str,
        store: Store | None = None,
        limit: int = MAX_OBJECT_BYTES,
        blake2b: str | None = None,
    ) -> bytes:
        """Chunk ``h``'s raw bytes (at most ``limit``), checked against its xxh3 name and, when
        given, the blake2b its manifest records."""
        src = store or self.store
        data = src.get(chunk_key(h), limit=stored_bound(limit))
        if data is None:
            raise IntegrityError(f"chunk {h} is missing from {src.url}: the repository is damaged")
        raw = decode_chunk(h, data, src.url, limit)
        if blake2b is not None and blake2b_hex(raw) != blake2b:
            raise IntegrityError(
                f"chunk {h} in {src.url} does not match its manifest's blake2b: refused"
            )
        return raw

    def size(self, h: str) -> int:
        return self.store.size(chunk_key(h))

    def put_chunk(self, raw: np.ndarray, kept_share: float | None) -> tuple[str, str]:
        """Store a raw chunk once; returns its (xxh3, blake2b)."""
        raw = np.ascontiguousarray(raw)
        h, b = xxh3(raw), blake2b_hex(raw.tobytes())
        key = chunk_key(h)
        if not self.store.has(key):
            self.store.put(key, encode_chunk(raw, kept_share))
        return h, b

    def manifest(self, version: str, store: Store | None = None) -> dict:
        """A version's manifest, checked against its blake2b id."""
        if store is None and version in self._manifests:
            return self._manifests[version]
        src = store or self.store
        if not is_hex(version, 64):
            raise MaskstoreError(f"{version!r} is not a version id")
        data = src.get(version_key(version), limit=stored_bound(MAX_MANIFEST_BYTES))
        if data is None:
            raise MaskstoreError(f"unknown version {version} in {src.url}")
        try:
            text = codecs.zstd_decompress(data, MAX_MANIFEST_BYTES)
        except ValueError:
            raise IntegrityError(
                f"version {version} in {src.url} cannot be decoded: damaged"
            ) from None
        if blake2b_hex(text) != version:
            raise IntegrityError(
                f"version {version} in {src.url} fails its blake2b digest: damaged or forged"
            )
        try:
            man = json.loads(text)
        except ValueError:
            raise IntegrityError(f"version {version} in {src.url} is not JSON: damaged") from None
        check_manifest(man, f"version {version[:12]} in {src.url}")
        if store is None:
            self._manifests[version] = man
        return man

    def put_manifest(self, man: dict) -> str:
        """Store a manifest; returns its version id (blake2b-256 of its canonical JSON)."""
        text = canonical_json(man)
        vid = blake2b_hex(text)
        if not self.store.has(version_key(vid)):
            self.store.put(version_key(vid), codecs.zstd_compress(text))
        return vid
