"""A direct chunk reader for the zarr v3 profile maskstore writes.

maskstore writes 2-D arrays on a regular chunk grid, split along rows only, with the default chunk
key encoding (``c/<i>/0``), a ``bytes`` serializer and at most one compressor (zstd, gzip or
blosc). For that profile a chunk is one stored object decoded by one numcodecs call, which this
reader does directly: about ten times faster than going through ``zarr.Array`` for the many small
reads that set algebra and persona switching make (``benchmarks/bench_overlap.py``). Arrays
outside the profile (re-encoded by other tools, sharded, ...) are read through zarr instead.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator

import numcodecs
import numpy as np
import zarr

# Decoding needs no configuration: zstd, gzip and blosc frames describe themselves.
_DECODERS: dict[str, type[numcodecs.abc.Codec]] = {
    "zstd": numcodecs.Zstd,
    "gzip": numcodecs.GZip,
    "blosc": numcodecs.Blosc,
}


class ArrayReader:
    """Chunk-by-chunk reads of one stored array.

    Args:
        meta: the array's parsed ``zarr.json``.
        read_into: reads the object stored under a key relative to the array into the buffer and
            returns its length (or returns the bytes themselves, or None when missing).
        fallback: opens the array with zarr, for arrays outside maskstore's profile.
    """

    def __init__(
        self,
        meta: dict,
        read_into: Callable[[str, bytearray], int | bytes | None],
        fallback: Callable[[], zarr.Array],
    ) -> None:
        self.meta = meta
        self.shape: tuple[int, ...] = tuple(meta["shape"])
        self.chunk_shape: tuple[int, ...] = tuple(
            meta["chunk_grid"]["configuration"]["chunk_shape"]
        )
        self.dtype = np.dtype(meta["data_type"])
        self.attrs: dict = meta.get("attributes", {})
        self._read_into = read_into
        self._fallback = fallback
        self._zarr: zarr.Array | None = None
        self._decoder = self._plan()

    def _plan(self) -> numcodecs.abc.Codec | None | bool:
        """The one decoder of this array, None for raw bytes, False when outside the profile."""
        m = self.meta
        enc = m.get("chunk_key_encoding", {})
        if (
            m["chunk_grid"].get("name") != "regular"
            or len(self.shape) != 2
            or self.chunk_shape[1:] != self.shape[1:]
            or enc.get("name") != "default"
            or enc.get("configuration", {}).get("separator", "/") != "/"
        ):
            return False
        codecs = m.get("codecs", [])
        if not codecs or codecs[0].get("name") != "bytes":
            return False
        endian = codecs[0].get("configuration", {}).get("endian", "little")
        if self.dtype.itemsize > 1 and endian != "little":
            return False
        if len(codecs) == 1:
            return None
        if len(codecs) == 2 and codecs[1]["name"] in _DECODERS:
            return _DECODERS[codecs[1]["name"]]()
        return False

    @property
    def nchunks(self) -> int:
        return -(-self.shape[0] // self.chunk_shape[0]) if self.shape[0] else 0

    def chunks(self) -> Iterator[np.ndarray]:
        """Every chunk in order, decoded into two reused buffers.

        Each yielded block is a view that is only valid until the next step: copy it to keep it.
        Reusing the buffers avoids fresh page-faulting allocations per chunk, which cost more
        than the reads and decoding themselves.
        """
        r = self.chunk_shape[0]
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        out = _POOL.take(r * row_bytes)
        raw = _POOL.take(r * row_bytes + (r * row_bytes >> 7) + 1024)
        try:
            for i in range(self.nchunks):
                r0, r1 = i * r, min((i + 1) * r, self.shape[0])
                yield self._chunk(i, r0, r1, r, row_bytes, raw, out)
        finally:
            _POOL.give(out)
            _POOL.give(raw)

    def _chunk(
        self, i: int, r0: int, r1: int, r: int, row_bytes: int, raw: bytearray, out: bytearray
    ):
        if self._decoder is False:
            if self._zarr is None:
                self._zarr = self._fallback()
            return self._zarr[r0:r1]
        n = self._read_into(f"c/{i}/0", raw)
        if n is None:  # zarr leaves chunks equal to the fill value unwritten
            fill = self.meta.get("fill_value", 0) or 0
            return np.full((r1 - r0, *self.shape[1:]), fill, dtype=self.dtype)
        src = memoryview(raw)[:n] if isinstance(n, int) else n
        if self._decoder is None:
            if len(src) != r * row_bytes:
                raise ValueError("raw chunk has the wrong size")
            data = src
        else:
            data = memoryview(out)[: r * row_bytes]
            self._decoder.decode(src, out=data)
        full = np.frombuffer(
            data, dtype=self.dtype.newbyteorder("<"), count=r * row_bytes // self.dtype.itemsize
        )
        return full.reshape(r, *self.shape[1:])[: r1 - r0]


class _BufferPool:
    """Reusable bytearrays, so chunk reads do not allocate (and fault in) new memory each time."""

    def __init__(self) -> None:
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bytearray:
        with self._lock:
            for k, b in enumerate(self._free):
                if len(b) >= nbytes:
                    return self._free.pop(k)
        return bytearray(nbytes)

    def give(self, buf: bytearray) -> None:
        with self._lock:
            if len(self._free) < 64:
                self._free.append(buf)


_POOL = _BufferPool()


def parse_meta(raw: bytes) -> dict:
    meta = json.loads(raw)
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise ValueError("not a zarr v3 array")
    return meta
