"""Compiled persona switching on CPU (numba): writes only the weights whose gate changes.

A masked module keeps the base values of the *stored* positions ``S`` only (every position some
persona used so far prunes), packed like the masks (1 bit a weight, rows padded to bytes), plus
the values in row-major order and each row's offset into them. Positions outside ``S`` always
hold their base values, so restoring the base model rewrites ``S`` alone, and a switch from
persona A to B rewrites only ``S ∩ (A xor B)`` (or, when gamma changes, every position either
prunes). Kernels walk packed bytes, skip bytes with nothing to do, and run in a few plain Python
threads over row blocks (no spin-waiting thread pool, so another busy process slows a switch by
its share of the CPU and no more).

Weights of float32 are multiplied in float32; bfloat16 ones in float32 and rounded to nearest
even, as torch does, so a gated weight has the bits of ``torch.mul(base, gate)`` (a NaN product
is a NaN, whose payload torch itself writes differently on its scalar and vector paths).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

THREADS = max(1, min(4, os.cpu_count() or 1))
_POOL = ThreadPoolExecutor(max_workers=THREADS)
_POP = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


@njit(nogil=True, cache=True)
def _row_counts(stored, extra, out, r0, r1):  # pragma: no cover - compiled
    """``out[i] = popcount(stored[i] | extra[i])``."""
    pop = _POP
    for i in range(r0, r1):
        n = 0
        for b in range(stored.shape[1]):
            n += pop[stored[i, b] | extra[i, b]]
        out[i] = n


@njit(nogil=True, cache=True)
def _grow(w, stored, off, vals, extra, new_stored, new_off, new_vals, r0, r1):  # pragma: no cover
    """Add the positions ``extra`` to the stored set: their values come from ``w`` (which holds
    base values outside the stored set), the others from ``vals``. Works on raw bits."""
    for i in range(r0, r1):
        k_old = off[i]
        k_new = new_off[i]
        for b in range(stored.shape[1]):
            s = stored[i, b]
            u = s | extra[i, b]
            new_stored[i, b] = u
            if u == 0:
                continue
            for bit in range(8):
                m = 1 << bit
                if u & m:
                    if s & m:
                        new_vals[k_new] = vals[k_old]
                        k_old += 1
                    else:
                        new_vals[k_new] = w[i, b * 8 + bit]
                    k_new += 1


@njit(nogil=True, cache=True, inline="always")
def _todo(s, c, n, same_gamma, full):  # pragma: no cover - compiled
    if full:
        return s
    if same_gamma:
        return (c ^ n) & s
    return (~(c & n)) & s & 0xFF


@njit(nogil=True, cache=True)
def _apply_f32(
    w, stored, off, vals, cur, new, cur_base, new_base, g_new, same_gamma, full, r0, r1
):  # pragma: no cover - compiled
    """``w = base * gate_new`` at the stored positions whose gate differs from ``cur``'s."""
    pop = _POP
    g = np.float32(g_new)
    for i in range(r0, r1):
        k = off[i]
        for b in range(stored.shape[1]):
            s = stored[i, b]
            if s == 0:
                continue
            c = 0xFF if cur_base else cur[i, b]
            n = 0xFF if new_base else new[i, b]
            d = _todo(s, c, n, same_gamma, full)
            if d == 0:
                k += pop[s]
                continue
            for bit in range(8):
                m = 1 << bit
                if s & m:
                    if d & m:
                        if n & m:
                            w[i, b * 8 + bit] = vals[k]
                        else:
                            w[i, b * 8 + bit] = vals[k] * g
                    k += 1


@njit(nogil=True, cache=True)
def _apply_bf16(
    w, stored, off, vals, cur, new, cur_base, new_base, g_new, same_gamma, full, r0, r1
):  # pragma: no cover - compiled
    """As :func:`_apply_f32` on bfloat16 bits: the product in float32, rounded to nearest even."""
    pop = _POP
    g = np.float32(g_new)
    tf = np.empty(1, np.float32)
    tu = tf.view(np.uint32)
    for i in range(r0, r1):
        k = off[i]
        for b in range(stored.shape[1]):
            s = stored[i, b]
            if s == 0:
                continue
            c = 0xFF if cur_base else cur[i, b]
            n = 0xFF if new_base else new[i, b]
            d = _todo(s, c, n, same_gamma, full)
            if d == 0:
                k += pop[s]
                continue
            for bit in range(8):
                m = 1 << bit
                if s & m:
                    if d & m:
                        v = vals[k]
                        if not (n & m):
                            tu[0] = np.uint32(v) << np.uint32(16)
                            tf[0] = tf[0] * g
                            u = tu[0]
                            if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                                v = np.uint16(0xFFFF)  # NaN, as torch's vectorised rounding
                            else:
                                u += np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
                                v = np.uint16(u >> np.uint32(16))
                        w[i, b * 8 + bit] = v
                    k += 1


def _blocks(rows: int, work: int) -> list[tuple[int, int]]:
    if THREADS == 1 or work < 1 << 16 or rows < 2:
        return [(0, rows)]
    step = -(-rows // THREADS)
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def _run(kernel, args: tuple, rows: int, work: int) -> None:
    blocks = _blocks(rows, work)
    if len(blocks) == 1:
        kernel(*args, 0, rows)
        return
    list(_POOL.map(lambda b: kernel(*args, *b), blocks))


def grow(
    w: np.ndarray, stored: np.ndarray, off: np.ndarray, vals: np.ndarray, extra: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored set and values after adding positions ``extra`` (packed like ``stored``).

    Args:
        w: ``(out, in)`` raw bits of the weight (uint16 or uint32 view), base values outside
            the stored set.
        off: ``(out + 1,)`` int64 row offsets into ``vals``.
    Returns:
        ``(stored, off, vals)`` new arrays.
    """
    rows = stored.shape[0]
    counts = np.empty(rows, np.int64)
    _run(_row_counts, (stored, extra, counts), rows, stored.size)
    new_off = np.zeros(rows + 1, np.int64)
    np.cumsum(counts, out=new_off[1:])
    new_stored = np.empty_like(stored)
    new_vals = np.empty(int(new_off[-1]), vals.dtype)
    args = (w, stored, off, vals, extra, new_stored, new_off, new_vals)
    _run(_grow, args, rows, stored.size * 8)
    return new_stored, new_off, new_vals


def apply(
    w: np.ndarray,
    stored: np.ndarray,
    off: np.ndarray,
    vals: np.ndarray,
    cur: np.ndarray | None,
    new: np.ndarray | None,
    gamma: float,
    same_gamma: bool,
    full: bool,
    bf16: bool,
) -> None:
    """Write ``base * gate(new, gamma)`` into ``w`` where the gate differs from ``cur``'s
    (None: the base model; ``full``: at every stored position)."""
    dummy = stored[:1]
    args = (
        w,
        stored,
        off,
        vals,
        dummy if cur is None else cur,
        dummy if new is None else new,
        cur is None,
        new is None,
        float(gamma),
        bool(same_gamma),
        bool(full),
    )
    _run(_apply_bf16 if bf16 else _apply_f32, args, stored.shape[0], stored.size * 8)
