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

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

from .._threads import POOL as _POOL
from .._threads import THREADS

_LOW16 = np.uint64(0xFFFF)
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


@intrinsic
def _popcount(typingctx, x):  # pragma: no cover - compiled
    """The number of set bits of an unsigned integer (one instruction)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return x(x), codegen


def _lanes16(kind: str):
    """An intrinsic rewriting sixteen weights ``w[pos:pos + 16]`` as one vector, where bit t
    of ``d`` is set: ``w = v * (1 if bit t of n else g)``, ``v`` the base value. ``kind`` says
    where base values are: ``"live"``, in ``w`` itself (every lane of ``d`` is kept by the
    current gate); ``"file"``, in ``w`` where bit t of ``c`` is set, else in ``src[spos + t]``
    (the checkpoint's weight, read as one vector). ``w`` and ``src`` are
    float32, or bfloat16 bits as uint16: then the product is taken in float32 and rounded to
    nearest even (a NaN becomes ``0xFFFF``), and kept lanes take ``v``'s bits, as
    :func:`_gated_bf16` and the scalar loops do. Lanes outside ``d`` are stored back unchanged:
    the sixteen weights must lie in one row, which only this thread writes."""

    @intrinsic
    def lanes(typingctx, w, src, pos, spos, c, n, d, g):
        sig = types.void(w, src, pos, spos, c, n, d, g)

        def codegen(context, builder, sig, args):
            wv_, sv_, wpos, spos_, cw, nw, dw, gamma = args
            wa = cgutils.create_struct_proxy(sig.args[0])(context, builder, value=wv_)
            sa = cgutils.create_struct_proxy(sig.args[1])(context, builder, value=sv_)
            bf = sig.args[0].dtype == types.uint16
            elt = ir.IntType(16) if bf else ir.FloatType()
            vt = ir.VectorType(elt, 16)
            i32 = ir.VectorType(ir.IntType(32), 16)
            f32 = ir.VectorType(ir.FloatType(), 16)

            def mask(x):
                x16 = builder.trunc(x, ir.IntType(16)) if x.type.width > 16 else x
                if x16.type.width < 16:
                    x16 = builder.zext(x16, ir.IntType(16))
                return builder.bitcast(x16, ir.VectorType(ir.IntType(1), 16))

            def splat(vtype, value):
                undef = ir.Constant(vtype, ir.Undefined)
                one = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
                zeros = ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16)
                return builder.shuffle_vector(one, undef, zeros)

            wptr = builder.bitcast(builder.gep(wa.data, [wpos]), vt.as_pointer())
            old = builder.load(wptr, align=2 if bf else 4)
            v = old
            if kind == "file":
                sptr = builder.bitcast(builder.gep(sa.data, [spos_]), vt.as_pointer())
                v = builder.select(mask(cw), old, builder.load(sptr, align=2 if bf else 4))
            keep = mask(nw)
            if not bf:
                gate = builder.select(
                    keep, splat(f32, ir.Constant(ir.FloatType(), 1.0)), splat(f32, gamma)
                )
                out = builder.fmul(v, gate)
            else:
                wide = builder.bitcast(
                    builder.shl(builder.zext(v, i32), ir.Constant(i32, [16] * 16)), f32
                )
                u = builder.bitcast(builder.fmul(wide, splat(f32, gamma)), i32)
                nan = builder.icmp_unsigned(
                    ">",
                    builder.and_(u, ir.Constant(i32, [0x7FFFFFFF] * 16)),
                    ir.Constant(i32, [0x7F800000] * 16),
                )
                odd = builder.and_(builder.lshr(u, ir.Constant(i32, [16] * 16)),
                                   ir.Constant(i32, [1] * 16))  # fmt: skip
                r = builder.add(builder.add(u, ir.Constant(i32, [0x7FFF] * 16)), odd)
                r16 = builder.trunc(builder.lshr(r, ir.Constant(i32, [16] * 16)), vt)
                rounded = builder.select(nan, ir.Constant(vt, [0xFFFF] * 16), r16)
                out = builder.select(keep, v, rounded)
            builder.store(builder.select(mask(dw), out, old), wptr, align=2 if bf else 4)
            return context.get_dummy_value()

        return sig, codegen

    return lanes


_live16 = _lanes16("live")
_file16 = _lanes16("file")


@njit(nogil=True, cache=True, inline="always")
def _gated_bf16(v, g, tf, tu):  # pragma: no cover - compiled
    """bfloat16 bits ``v`` times ``g``: the product in float32, rounded to nearest even."""
    tu[0] = np.uint32(v) << np.uint32(16)
    tf[0] = tf[0] * g
    u = tu[0]
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16(0xFFFF)  # NaN, as torch's vectorised rounding
    u += np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return np.uint16(u >> np.uint32(16))


@njit(nogil=True, cache=True)
def _apply(
    w, stored, off, vals, cur, new, cur_base, new_base, g_new, same_gamma, bf16, r0, r1
):  # pragma: no cover - compiled
    """``w = base * gate_new`` at the stored positions whose gate differs from ``cur``'s.

    ``stored``, ``cur`` and ``new`` are packed rows viewed as unsigned words (uint64 when a
    row's bytes divide by 8, else uint8): a word with nothing to rewrite costs a few
    instructions, and each rewritten weight finds its base value by a popcount. ``w`` and
    ``vals`` are float32, or bfloat16 as uint16 bits (``bf16``).
    """
    g = np.float32(g_new)
    unit = np.float32(1.0)
    tf = np.empty(1, np.float32)
    tu = tf.view(np.uint32)
    nw = stored.shape[1]
    zero = stored.dtype.type(0)
    one = stored.dtype.type(1)
    ones = ~zero
    bits = stored.itemsize * 8
    for i in range(r0, r1):
        k = np.int64(off[i])
        for b in range(nw):
            s = stored[i, b]
            if s == zero:
                continue
            c = ones if cur_base else cur[i, b]
            n = ones if new_base else new[i, b]
            d = ((c ^ n) if same_gamma else ~(c & n)) & s
            while d != zero:
                low = d & (zero - d)
                j = b * bits + np.int64(trailing_zeros(d))
                v = vals[k + np.int64(_popcount(s & (low - one)))]
                keep = (n & low) != zero
                if not bf16:
                    w[i, j] = v * (unit if keep else g)  # x * 1 is x: no branch
                elif keep:
                    w[i, j] = v
                else:
                    w[i, j] = _gated_bf16(v, g, tf, tu)
                d ^= low
            k += np.int64(_popcount(s))


@njit(nogil=True, cache=True)
def _apply_file(
    w, base, cur, new, tail, cur_base, new_base, g_new, same_gamma, bf16, r0, r1
):  # pragma: no cover - compiled
    """``w = base * gate_new`` where the gate differs from ``cur``'s, with every base value at
    hand in ``base`` (the ``(out, in)`` weight memory-mapped from its checkpoint): no stored
    set, the position is the index. ``tail`` masks each row's padding bits (one row of words).
    A position kept by ``cur`` holds its base value already: it is read from ``w``, and the
    file is read only where a pruned weight comes back (or its gamma changes). Rows of whole
    64-bit words (widths that divide by 64) are rewritten sixteen weights a vector, skipping
    groups with nothing to rewrite (``_live16``/``_file16``); other rows weight by weight.
    """
    g = np.float32(g_new)
    unit = np.float32(1.0)
    tf = np.empty(1, np.float32)
    tu = tf.view(np.uint32)
    nw = tail.shape[0]
    zero = tail.dtype.type(0)
    ones = ~zero
    bits = tail.itemsize * 8
    width = w.shape[1]
    for i in range(r0, r1):
        row = np.int64(i) * width
        for b in range(nw):
            c = ones if cur_base else cur[i, b]
            n = ones if new_base else new[i, b]
            d = ((c ^ n) if same_gamma else ~(c & n)) & tail[b]
            if bits == 64:  # four groups of sixteen lanes, each one vector
                if d == zero:
                    continue
                for q in range(4):
                    sh = np.uint64(16 * q)
                    dq = (np.uint64(d) >> sh) & _LOW16
                    if dq == 0:
                        continue
                    cq = (np.uint64(c) >> sh) & _LOW16
                    nq = (np.uint64(n) >> sh) & _LOW16
                    pos = row + b * 64 + 16 * q
                    if dq & ~cq & _LOW16:  # a pruned weight comes back: read the file
                        _file16(w, base, pos, pos, cq, nq, dq, g)
                    else:  # the file's line is not read at all
                        _live16(w, w, pos, pos, cq, nq, dq, g)
                continue
            while d != zero:
                low = d & (zero - d)
                j = b * bits + np.int64(trailing_zeros(d))
                v = w[i, j] if (c & low) != zero else base[row + j]
                keep = (n & low) != zero
                if not bf16:
                    w[i, j] = v * (unit if keep else g)
                elif keep:
                    w[i, j] = v
                else:
                    w[i, j] = _gated_bf16(v, g, tf, tu)
                d ^= low


def _words(a: np.ndarray) -> np.ndarray:
    """Packed rows as uint64 words when each row's bytes divide by 8 (else the bytes)."""
    if a.shape[1] % 8 == 0 and a.flags.c_contiguous:
        return a.view(np.uint64)
    return a


def _run(kernel, args: tuple, rows: int, work: int) -> None:
    """One kernel over row blocks, a block a thread (used by the cold path, :func:`grow`)."""
    if THREADS == 1 or work < 1 << 16 or rows < 2:
        kernel(*args, 0, rows)
        return
    step = -(-rows // THREADS)
    list(_POOL.map(lambda r: kernel(*args, r, min(rows, r + step)), range(0, rows, step)))


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


def job(
    w: np.ndarray,
    stored: np.ndarray,
    off: np.ndarray,
    vals: np.ndarray,
    cur: np.ndarray | None,
    new: np.ndarray | None,
    gamma: float,
    same_gamma: bool,
    bf16: bool,
) -> tuple:
    """One module's switch for :func:`run`: write ``base * gate(new, gamma)`` into ``w`` where
    the gate differs from ``cur``'s (None: the base model): where the kept bit changes, or,
    unless ``same_gamma``, at every position either gate prunes."""
    stored = _words(stored)
    dummy = stored[:1]
    args = (
        w,
        stored,
        off,
        vals,
        dummy if cur is None else _words(cur),
        dummy if new is None else _words(new),
        cur is None,
        new is None,
        float(gamma),
        bool(same_gamma),
        bool(bf16),
    )
    return _apply, args, stored.shape[0], stored.nbytes


def job_file(
    w: np.ndarray,
    base: np.ndarray,
    cur: np.ndarray | None,
    new: np.ndarray | None,
    tail: np.ndarray,
    gamma: float,
    same_gamma: bool,
    bf16: bool,
) -> tuple:
    """:func:`job` for a module whose base values are all in ``base`` (same raw dtype as
    ``w``; memory-mapped from the checkpoint); ``tail`` is :func:`maskstore.store.bits.pad_mask`
    of the row width."""
    tail = _words(tail[None])[0]
    dummy = np.zeros((1, tail.shape[0]), tail.dtype)
    args = (
        w,
        base.reshape(-1),
        dummy if cur is None else _words(cur),
        dummy if new is None else _words(new),
        tail,
        cur is None,
        new is None,
        float(gamma),
        bool(same_gamma),
        bool(bf16),
    )
    return _apply_file, args, w.shape[0], tail.nbytes * w.shape[0]


def run(jobs: list[tuple]) -> None:
    """Run module switches on ``THREADS`` threads: large modules split into row blocks, the
    blocks dealt largest first to the least loaded thread."""
    total = sum(j[3] for j in jobs)
    if not total:
        return
    target = max(total // (THREADS * 4), 1 << 14)
    tasks = []
    for kernel, args, rows, nbytes in jobs:
        parts = max(1, min(rows, nbytes // target))
        step = -(-rows // parts)
        for r in range(0, rows, step):
            tasks.append(
                (nbytes * min(step, rows - r) // rows, kernel, args, r, min(rows, r + step))
            )
    if THREADS == 1 or len(tasks) == 1:
        for _, kernel, args, r0, r1 in tasks:
            kernel(*args, r0, r1)
        return
    lanes: list[list] = [[] for _ in range(THREADS)]
    load = [0] * THREADS
    for t in sorted(tasks, key=lambda t: -t[0]):
        i = load.index(min(load))
        lanes[i].append(t)
        load[i] += t[0]

    def lane(ts: list) -> None:
        for _, kernel, args, r0, r1 in ts:
            kernel(*args, r0, r1)

    list(_POOL.map(lane, lanes))


def warm() -> None:
    """Load the compiled switching kernels for the common argument types (float32 and
    bfloat16 weights, rows of whole 64-bit words) on tiny arrays, so that the first real switch
    does not wait for them."""
    for dtype in (np.float32, np.uint16):
        w = np.zeros((2, 64), dtype)
        masks = np.zeros((2, 8), np.uint8)
        tail = np.full(8, 0xFF, np.uint8)
        for cur, new in ((None, masks), (masks, masks), (masks, None)):
            kernel, args, rows, _ = job_file(w, w.copy(), cur, new, tail, 0.0, True,
                                             dtype == np.uint16)  # fmt: skip
            kernel(*args, 0, rows)
