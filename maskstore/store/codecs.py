"""The compression policy that bundles and repositories share: which zstd level for which bits.

zstd frames are written and read with ``zstandard`` (12 ms to import, where numcodecs takes
over 200 ms), every decode bounded by the size it may produce.

Mask bits with a kept share far from 0.5 compress well and get zstd level 16 (its btultra
strategy with 6-byte minimum matches), whose entropy coder lands within 4% of H(p) where level 3
is 17% off (``benchmarks/bench_storage.py``); balanced masks get level 3, or no compression at
all when a trial shows it saves under 2%.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SKEWED_LEVEL = 16
DEFAULT_LEVEL = 3
TRIAL_BYTES = 1 << 20  # the head of an array that the incompressibility trial compresses


def zstd_compress(data: Any, level: int = DEFAULT_LEVEL) -> bytes:
    """One zstd frame (with its content size) of ``data``.

    At :data:`SKEWED_LEVEL` the frame is made with zstd's btultra strategy and 6-byte
    minimum matches: on mask bits the same entropy coder lands as close to H(p) as plain level
    16 (slightly closer) in 0.35x-0.46x the time, since random bits hold no long matches to
    search for (``benchmarks/bench_storage.py``). Any zstd decoder reads either frame.
    """
    import zstandard

    if level == SKEWED_LEVEL:
        params = zstandard.ZstdCompressionParameters.from_level(
            level,
            source_size=memoryview(data).nbytes,
            strategy=zstandard.STRATEGY_BTULTRA,
            min_match=6,
        )
        return zstandard.ZstdCompressor(compression_params=params).compress(data)
    return zstandard.ZstdCompressor(level=level).compress(data)


def zstd_decompress_into(src: Any, out: memoryview) -> int:
    """Decode one zstd frame into ``out``; return the bytes written.

    Decoding stops at ``len(out)``: a frame that would produce more raises ``ValueError`` before
    a byte past the buffer is produced (a decompression bomb costs no memory).
    """
    import zstandard

    n = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(src) as r:
            while n < len(out):
                k = r.readinto(out[n:])
                if not k:
                    break
                n += k
            if n == len(out) and r.read(1):
                raise ValueError("zstd frame decodes past the size it may have")
    except zstandard.ZstdError as e:
        raise ValueError(f"bad zstd frame: {e}") from None
    return n


def zstd_decompress(src: Any, limit: int) -> bytes:
    """Decode one zstd frame of at most ``limit`` bytes (``ValueError`` past it), growing the
    output as it comes rather than trusting a declared size."""
    import zstandard

    parts, n = [], 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(src) as r:
            while True:
                block = r.read(min(1 << 20, limit - n + 1))
                if not block:
                    break
                n += len(block)
                if n > limit:
                    raise ValueError(f"zstd frame decodes past {limit} bytes")
                parts.append(block)
    except zstandard.ZstdError as e:
        raise ValueError(f"bad zstd frame: {e}") from None
    return b"".join(parts)


def entropy(p: float) -> float:
    """Binary entropy H(p) in bits."""
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def is_skewed(kept_share: float | None) -> bool:
    """True when the share of set bits is below 0.35 or above 0.65."""
    return kept_share is not None and abs(kept_share - 0.5) > 0.15


def zstd_level(kept_share: float | None) -> int:
    """The zstd level for bits with this share of ones (unknown: the default level)."""
    return SKEWED_LEVEL if is_skewed(kept_share) else DEFAULT_LEVEL


def incompressible(sample: np.ndarray) -> bool:
    """True when zstd at the default level saves under 2% on the first MiB of ``sample``."""
    head = np.ascontiguousarray(sample).reshape(-1).view(np.uint8)[:TRIAL_BYTES]
    if not head.size:
        return False
    return len(zstd_compress(head.tobytes())) >= 0.98 * head.size


def share_of_ones(buf: np.ndarray) -> float:
    """Share of set bits in a ``uint8`` buffer."""
    from .bits import popcount

    return popcount(buf) / max(buf.size * 8, 1)
