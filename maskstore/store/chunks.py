"""Arrays chunk by chunk: one typed metadata record and one chunk-source interface.

:class:`ArrayMeta` is an array's ``zarr.json`` parsed once. A :class:`ChunkSource` yields an
array's row chunks in order; two implement it: :class:`StoreArray` here (a bundle's zarr v3
arrays, in any :class:`~maskstore.store.stores.Store`) and the repository's object arrays
(``maskstore.repo.snapshot``).

maskstore writes 2-D arrays on a regular chunk grid, split along rows only, with the default chunk
key encoding (``c/<i>/0``), a ``bytes`` serializer and at most one compressor (zstd, gzip or
blosc). For that profile a chunk is one stored object decoded by one numcodecs call, which
:class:`StoreArray` does directly: about ten times faster than ``zarr.Array`` for the many small
reads of set algebra and persona switching (``benchmarks/bench_overlap.py``), and zarr is not even
imported. Arrays outside the profile (re-encoded by other tools, sharded, ...) are read through
zarr instead.
"""

from __future__ import annotations

import json
import threading
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import IntegrityError, MaskstoreError
from . import codecs
from .stores import Store

_CODECS = ("zstd", "gzip", "blosc")
MAX_META_BYTES = 1 << 20  # an array's zarr.json is a few hundred bytes; refuse absurd ones


def _decoder(name: str) -> Any:
    """The numcodecs decoder for blosc (zstd and gzip are decoded here, bounded)."""
    import numcodecs  # decoding needs no configuration: the frames describe themselves

    return numcodecs.Blosc() if name == "blosc" else None


@dataclass(frozen=True)
class ArrayMeta:
    """An array's ``zarr.json``, parsed and checked once.

    Attributes:
        shape: the array shape.
        chunk_rows: rows per chunk (chunks span whole rows in maskstore's profile).
        dtype: the element type.
        codec: ``"zstd"``, ``"gzip"``, ``"blosc"``, None for raw bytes.
        in_profile: False when the array must be read through zarr.
        attrs: the array attributes (maskstore's under ``"maskstore"``).
        raw: the parsed document, as stored.
    """

    shape: tuple[int, ...]
    chunk_rows: int
    dtype: np.dtype
    codec: str | None
    in_profile: bool
    fill_value: Any
    attrs: dict = field(repr=False)
    raw: dict = field(repr=False)

    @classmethod
    def parse(cls, data: bytes | dict, where: str = "array") -> ArrayMeta:
        """Parse a ``zarr.json`` document (bytes or already decoded).

        Raises:
            MaskstoreError: when it is not a 2-D-or-more zarr v3 array with a regular chunk grid.
        """
        try:
            if isinstance(data, bytes | bytearray):
                if len(data) > MAX_META_BYTES:
                    raise ValueError("metadata over 1 MiB")
                data = json.loads(data)
            m = data
            if m.get("zarr_format") != 3 or m.get("node_type") != "array":
                raise ValueError("not a zarr v3 array")
            shape = tuple(int(x) for x in m["shape"])
            grid = m["chunk_grid"]
            chunk_shape = tuple(int(x) for x in grid["configuration"]["chunk_shape"])
            dtype = np.dtype(m["data_type"])
            if len(shape) < 1 or len(chunk_shape) != len(shape) or min(shape, default=0) < 0:
                raise ValueError("bad shape")
            if not 1 <= chunk_shape[0] <= max(shape[0], 1):
                raise ValueError("chunk rows outside 1..rows")
        except MaskstoreError:
            raise
        except Exception as e:  # noqa: BLE001 - any malformed document is the same problem
            raise IntegrityError(  # a stored array's own metadata: damage (exit 1), not bad input
                f"{where}: unreadable zarr.json ({type(e).__name__}); the data is damaged"
            ) from None
        codec, ok = None, True
        enc = m.get("chunk_key_encoding", {})
        codecs = m.get("codecs", [])
        if (
            grid.get("name") != "regular"
            or len(shape) != 2
            or chunk_shape[1:] != shape[1:]
            or enc.get("name") != "default"
            or enc.get("configuration", {}).get("separator", "/") != "/"
            or not codecs
            or codecs[0].get("name") != "bytes"
            or (
                dtype.itemsize > 1
                and codecs[0].get("configuration", {}).get("endian", "little") != "little"
            )
        ):
            ok = False
        elif len(codecs) == 2 and codecs[1].get("name") in _CODECS:
            codec = codecs[1]["name"]
        elif len(codecs) != 1:
            ok = False
        return cls(
            shape=shape,
            chunk_rows=chunk_shape[0],
            dtype=dtype,
            codec=codec,
            in_profile=ok,
            fill_value=m.get("fill_value", 0) or 0,
            attrs=m.get("attributes", {}) or {},
            raw=m,
        )

    @property
    def nchunks(self) -> int:
        return -(-self.shape[0] // self.chunk_rows) if self.shape[0] else 0

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def rows_of(self, i: int) -> int:
        """Rows in chunk ``i`` (the last chunk may be short)."""
        return min(self.chunk_rows, self.shape[0] - i * self.chunk_rows)

    @property
    def maskstore(self) -> Any:
        return self.attrs.get("maskstore")


class ChunkSource(ABC):
    """An array readable chunk by chunk, rows in order."""

    meta: ArrayMeta

    @abstractmethod
    def chunks(self) -> Iterator[np.ndarray]:
        """Every chunk in order, as ``(rows, ...)`` blocks; a block may be a view into a reused
        buffer, valid only until the next step: copy it to keep it."""


class StoreArray(ChunkSource):
    """A zarr v3 array of a bundle, read from a :class:`~maskstore.store.stores.Store`.

    Args:
        store: where the bundle lives.
        path: the array's folder inside the store (``personas/a/masks/<module>``).
        meta: the array's parsed ``zarr.json``.
    """

    def __init__(self, store: Store, path: str, meta: ArrayMeta) -> None:
        self.store = store
        self.path = path
        self.meta = meta
        self._zarr: Any = None

    def chunks(self) -> Iterator[np.ndarray]:
        """Chunks decoded into two reused buffers: fresh page-faulting allocations per chunk
        would cost more than the reads and decoding themselves."""
        m = self.meta
        if not m.in_profile:
            yield from self._through_zarr()
            return
        r, row_bytes = m.chunk_rows, m.row_bytes
        need = r * row_bytes
        out = _POOL.take(need)
        raw = _POOL.take(need + (need >> 7) + 1024)
        decoder = _decoder(m.codec) if m.codec not in (None, "zstd") else None
        try:
            for i in range(m.nchunks):
                yield self._chunk(i, need, raw, out, decoder)
        finally:
            _POOL.give(out)
            _POOL.give(raw)

    def _chunk(self, i: int, need: int, raw: bytearray, out: bytearray, decoder: Any):
        m = self.meta
        rows = m.rows_of(i)
        n = self.store.read_into(f"{self.path}/c/{i}/0", raw)
        if n is None:  # zarr leaves chunks equal to the fill value unwritten
            return np.full((rows, *m.shape[1:]), m.fill_value, dtype=m.dtype)
        src = memoryview(raw)[:n]
        if m.codec is None:
            if len(src) != need:
                raise ValueError("raw chunk has the wrong size")
            data = src
        elif m.codec == "zstd":
            data = memoryview(out)[:need]
            if codecs.zstd_decompress_into(src, data) != need:
                raise ValueError("chunk decodes to the wrong size")
        elif m.codec == "gzip":  # zlib stops at the size the chunk must have
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            raw_out = d.decompress(src, need + 1)
            if len(raw_out) != need or not d.eof:
                raise ValueError("chunk decodes to the wrong size")
            data = memoryview(out)[:need]
            data[:] = raw_out
        else:  # blosc: its 16-byte header says what it expands to; check before decoding
            if len(src) < 16 or int.from_bytes(bytes(src[4:8]), "little") != need:
                raise ValueError("chunk declares the wrong size")
            data = memoryview(out)[:need]
            decoder.decode(src, out=data)
        full = np.frombuffer(data, dtype=m.dtype.newbyteorder("<"), count=need // m.dtype.itemsize)
        return full.reshape(m.chunk_rows, *m.shape[1:])[:rows]

    def _through_zarr(self) -> Iterator[np.ndarray]:
        import zarr

        if self._zarr is None:
            self._zarr = zarr.open_array(
                self.store.zarr_store(), path=self.path, mode="r", zarr_format=3
            )
        m = self.meta
        for i in range(m.nchunks):
            r0 = i * m.chunk_rows
            yield self._zarr[r0 : r0 + m.rows_of(i)]


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
