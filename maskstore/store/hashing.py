"""Content digests. See ``schemas/FORMAT.md`` ("Digests") for the exact byte streams.

* xxh3-128 (hex, 32 chars) for chunks, arrays, personas and the bundle: fast, catches accidents.
* blake2b-256 (hex, 64 chars) for anything trusted across teams: version ids, tags, remote objects.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import xxhash


def canonical_json(obj: Any) -> bytes:
    """UTF-8 JSON with sorted keys, no whitespace: the byte form every digest of metadata uses."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def xxh3(data: bytes | memoryview | np.ndarray) -> str:
    """xxh3-128 hex digest of raw bytes (an array contributes its C-order bytes)."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).data
    return xxhash.xxh3_128_hexdigest(data)


def array_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The bytes hashed before an array's data: ``{"dtype": "<u1", "shape": [..]}`` canonical."""
    return canonical_json({"dtype": np.dtype(dtype).str, "shape": list(shape)})


class ArrayHasher:
    """Streaming array digest: the header, then the C-order bytes, rows in order.

    Feed it row blocks in any split: the digest depends only on dtype, shape and content.
    """

    def __init__(self, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self._h = xxhash.xxh3_128()
        self._h.update(array_header(dtype, shape))

    def update(self, block: np.ndarray) -> None:
        self._h.update(np.ascontiguousarray(block).data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def metadata_digest(obj: Any) -> str:
    """xxh3-128 of the canonical JSON of ``obj``."""
    return xxh3(canonical_json(obj))


def blake2b_hex(data: bytes) -> str:
    """Cryptographic digest (blake2b, 32 bytes) for ids trusted across teams."""
    import hashlib  # imported on first use: inspection commands never need it

    return hashlib.blake2b(data, digest_size=32).hexdigest()
