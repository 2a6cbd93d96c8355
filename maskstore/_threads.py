"""A few plain worker threads for memory-bound work on NumPy arrays (copies, compiled kernels).

Plain threads, not a spin-waiting OpenMP pool: another busy process slows the work by its share
of the CPU and no more. Importing this module is cheap (no numba).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

THREADS = max(1, min(4, os.cpu_count() or 1))
POOL = ThreadPoolExecutor(max_workers=THREADS)


def copy(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> list[bool]:
    """``dst[...] = src`` for each ``(dst, src, check)``, the arrays dealt to the threads.

    Returns:
        Per pair, whether ``src`` equals ``check`` byte for byte (True without ``check``).
    """

    def one(pair: tuple) -> bool:
        dst, src, check = pair
        np.copyto(dst, src)
        return check is None or np.array_equal(dst, check)

    if THREADS == 1 or len(pairs) < 2:
        return [one(p) for p in pairs]
    return list(POOL.map(one, pairs))
