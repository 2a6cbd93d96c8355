"""Compiled per-row top-k selection on CPU (numba): the hot loop of ``maskstore build``.

Each row is selected in L1 cache with no sort: float32 scores become uint32 keys that sort like
the floats (NaN as ``-inf``, ``-0.0`` as ``+0.0``); a radix histogram over the keys' range finds
the bucket holding the k-th largest, and repeats inside that bucket until a few keys remain,
which are insertion-sorted. The mask is then one comparison against that threshold, plus a
left-to-right pass only in rows whose tied values outnumber the places left: the tied values
are ranked by an optional second score the same way, and the lowest index wins what is left.
Row blocks run in threads; the kernel releases the GIL. Compiled once per machine and cached.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

_WORKERS = os.cpu_count() or 1
_POOL = ThreadPoolExecutor(max_workers=_WORKERS)

_SIGN = np.uint32(0x80000000)


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _key(bits: np.uint32) -> np.uint32:  # pragma: no cover - compiled
    """float32 bits -> uint32 key in the float order; NaN -> key(-inf), -0.0 -> key(+0.0)."""
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        bits = np.uint32(0xFF800000)
    elif bits == _SIGN:
        bits = np.uint32(0)
    if bits & _SIGN:
        return ~bits
    return bits | _SIGN


@njit(nogil=True, cache=True, error_model="numpy")
def _kth_smallest(src, m, r, lo, hi, buf, hist):  # pragma: no cover - compiled
    """The ``r``-th smallest (0-based) of ``src[:m]``, whose keys all lie in ``[lo, hi]``.

    ``buf`` (>= m) is scratch and ``hist`` (>= 256) holds the bucket counts.
    """
    while True:
        if lo == hi:
            return lo
        if m <= 24:
            for i in range(m):
                buf[i] = src[i]
            for i in range(1, m):
                v = buf[i]
                j = i - 1
                while j >= 0 and buf[j] > v:
                    buf[j + 1] = buf[j]
                    j -= 1
                buf[j + 1] = v
            return buf[r]
        log_buckets = 8 if m > 256 else 6 if m > 64 else 4
        span = np.uint64(hi - lo)
        width = 0  # bit length of span
        while span:
            width += 1
            span >>= np.uint64(1)
        shift = np.uint32(max(width - log_buckets, 0))
        for b in range(1 << log_buckets):
            hist[b] = 0
        for i in range(m):
            hist[(src[i] - lo) >> shift] += 1
        below = 0
        b = 0
        while below + hist[b] <= r:
            below += hist[b]
            b += 1
        r -= below
        bucket = np.uint32(b)
        n_in = 0
        for i in range(m):  # compact the bucket's keys to the front of buf (in place after once)
            v = src[i]
            buf[n_in] = v
            n_in += ((v - lo) >> shift) == bucket
        m = n_in
        new_lo = lo + (bucket << shift)
        new_hi = new_lo + ((np.uint32(1) << shift) - np.uint32(1))
        lo = new_lo
        hi = min(hi, new_hi)
        src = buf


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _keep_row(bits, tie, use_tie, keys, k, out_row, buf, keys2, hist):  # pragma: no cover
    """``out_row = `` the k largest of one row of float32 ``bits``.

    Ties at the threshold go to the largest ``tie`` bits (float32) if ``use_tie``, then to the
    lowest index. ``keys``, ``buf``, ``keys2`` (row length) and ``hist`` (256) are scratch.
    """
    n = keys.size
    lo = np.uint32(0xFFFFFFFF)
    hi = np.uint32(0)
    for j in range(n):
        u = _key(bits[j])
        keys[j] = u
        lo = min(lo, u)
        hi = max(hi, u)
    t = _kth_smallest(keys, n, n - k, lo, hi, buf, hist)
    above = 0
    tied = 0
    for j in range(n):
        u = keys[j]
        above += u > t
        tied += u == t
    if above + tied == k:
        for j in range(n):
            out_row[j] = keys[j] >= t
        return
    need = k - above  # more tied values than places left
    t2 = np.uint32(0)
    if use_tie:  # the tied values' own threshold on the tie-break key
        lo = np.uint32(0xFFFFFFFF)
        hi = np.uint32(0)
        m = 0
        for j in range(n):
            if keys[j] == t:
                u = _key(tie[j])
                keys2[m] = u
                m += 1
                lo = min(lo, u)
                hi = max(hi, u)
        t2 = _kth_smallest(keys2, m, m - need, lo, hi, buf, hist)
        for j in range(n):
            if keys[j] == t and _key(tie[j]) > t2:
                need -= 1
    for j in range(n):
        u = keys[j]
        take = u > t
        if u == t:
            if use_tie:
                u2 = _key(tie[j])
                if u2 > t2:
                    take = True
                elif u2 == t2 and need > 0:
                    take = True
                    need -= 1
            elif need > 0:
                take = True
                need -= 1
        out_row[j] = take


@njit(nogil=True, cache=True, error_model="numpy")
def _topk_rows(bits, tie, use_tie, k, out, r0, r1):  # pragma: no cover - compiled
    """Rows ``r0:r1`` of ``bits`` (float32 scores viewed as uint32), ties by ``tie``'s rows."""
    n = bits.shape[1]
    keys = np.empty(n, np.uint32)
    buf = np.empty(n, np.uint32)
    keys2 = np.empty(n, np.uint32)
    hist = np.empty(256, np.int64)
    for i in range(r0, r1):
        _keep_row(bits[i], tie[i if use_tie else 0], use_tie, keys, k, out[i], buf, keys2, hist)


@njit(nogil=True, cache=True, error_model="numpy")
def _topk_fused_rows(
    weight, factor, square, tie_factor, use_tie, k, out, r0, r1
):  # pragma: no cover
    """Rows ``r0:r1`` of the scores ``|weight| * factor``, or ``weight**2 / factor`` if
    ``square``, rounded to float32 after each operation exactly as torch computes them; ties by
    ``|weight| * tie_factor`` if ``use_tie``."""
    n = weight.shape[1]
    score = np.empty(n, np.float32)
    bits = score.view(np.uint32)
    tscore = np.empty(n, np.float32)
    tbits = tscore.view(np.uint32)
    keys = np.empty(n, np.uint32)
    buf = np.empty(n, np.uint32)
    keys2 = np.empty(n, np.uint32)
    hist = np.empty(256, np.int64)
    for i in range(r0, r1):
        if square:
            for j in range(n):
                score[j] = (weight[i, j] * weight[i, j]) / factor[j]
        else:
            for j in range(n):
                score[j] = abs(weight[i, j]) * factor[j]
        if use_tie:
            for j in range(n):
                tscore[j] = abs(weight[i, j]) * tie_factor[j]
        _keep_row(bits, tbits, use_tie, keys, k, out[i], buf, keys2, hist)


def _run(kernel, args: tuple, rows: int, size: int, out: np.ndarray, k: int) -> np.ndarray:
    """Run ``kernel(*args, k, out, r0, r1)`` over row blocks, one block a thread."""
    if _WORKERS == 1 or size < 1 << 16 or rows < 2:
        kernel(*args, k, out, 0, rows)
        return out
    step = -(-rows // _WORKERS)
    blocks = range(0, rows, step)
    list(_POOL.map(lambda r0: kernel(*args, k, out, r0, min(rows, r0 + step)), blocks))
    return out


def topk_rows(scores: np.ndarray, k: int, tie: np.ndarray | None = None) -> np.ndarray:
    """Per row of ``(rows, n)`` float32 ``scores``, a bool mask of the ``k`` largest (0 < k < n).

    Ties go to the largest ``tie`` value of the same shape (if given), then to the lowest column
    index; NaN counts as ``-inf`` in both.

    Returns:
        ``(rows, n)`` bool array.
    """
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    use_tie = tie is not None
    tbits = (
        np.ascontiguousarray(tie, dtype=np.float32).view(np.uint32)
        if use_tie
        else np.zeros((1, bits.shape[1]), np.uint32)
    )
    if use_tie and tbits.shape != bits.shape:
        raise ValueError(f"tie-break shape {tbits.shape} differs from scores {bits.shape}")
    out = np.empty(bits.shape, dtype=bool)
    return _run(_topk_rows, (bits, tbits, use_tie), bits.shape[0], bits.size, out, k)


def topk_fused_rows(
    weight: np.ndarray,
    factor: np.ndarray,
    k: int,
    square: bool,
    tie_factor: np.ndarray | None = None,
) -> np.ndarray:
    """``topk_rows(scores, k)`` for per-column scores formed from the weights, never materialised.

    Args:
        weight: ``(rows, n)`` float32.
        factor: ``(n,)`` float32 per-column factor ``f``.
        square: scores ``weight**2 / f`` (SparseGPT) if true, else ``|weight| * f`` (Wanda).
        tie_factor: ``(n,)`` float32; ties go to the larger ``|weight| * tie_factor`` first.
    Returns:
        ``(rows, n)`` bool array, bit for bit ``topk_rows`` of the float32 scores.
    """
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    factor = np.ascontiguousarray(factor, dtype=np.float32)
    use_tie = tie_factor is not None
    tie_factor = np.ascontiguousarray(factor if tie_factor is None else tie_factor, np.float32)
    out = np.empty(weight.shape, dtype=bool)
    args = (weight, factor, bool(square), tie_factor, use_tie)
    return _run(_topk_fused_rows, args, weight.shape[0], weight.size, out, k)
