"""Mixed-persona matrix products on CPU (numba): one pass over a Linear's weight serves every
persona in the batch, gated from their packed bits as it goes.

Row ``r`` of ``x`` (one token of one request) uses persona ``p_r``:
``y[r] = x[r] @ (W * G_{p_r})^T`` with ``G = M + gamma * (1 - M)``. Gated weight copies per
persona would hold, read and write the whole weight once per persona. Here four output rows of
``W`` at a time are gated for each persona of the batch into a small buffer, sixteen weights an
instruction (a 16-bit word of the packed mask is the select mask of a 16-lane vector: the
:func:`_gate16` intrinsic), and that persona's rows are multiplied with them four at a time
(sixteen accumulators, vectorised over the input dimension).

**Batch invariance.** Every output element is computed by the same code whatever else is in
the batch (a group of 1-3 rows repeats its last row to fill the block of four), so a request's
outputs do not depend on its batch-mates, bit for bit.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.typed import List

from .._threads import POOL, THREADS

_MASK_TYPE = types.uint8[:, ::1]  # a packed mask (out, ceil(in/8)), C-contiguous


@intrinsic
def _gate16(typingctx, dst, src, doff, soff, word, g):
    """``dst[doff + t] = src[soff + t] * (1 if bit t of word else g)`` for t in 0..15, as one
    16-lane select; ``src`` float32, or bfloat16 bits as uint16 (widened exactly)."""
    sig = types.void(dst, src, doff, soff, word, g)

    def codegen(context, builder, sig, args):
        d, s, dpos, spos, bits, gamma = args
        da = cgutils.create_struct_proxy(sig.args[0])(context, builder, value=d)
        sa = cgutils.create_struct_proxy(sig.args[1])(context, builder, value=s)
        f16 = ir.VectorType(ir.FloatType(), 16)
        src_ptr = builder.gep(sa.data, [spos])
        if sig.args[1].dtype == types.uint16:
            i16 = ir.VectorType(ir.IntType(16), 16)
            raw = builder.load(builder.bitcast(src_ptr, i16.as_pointer()), align=2)
            wide = builder.zext(raw, ir.VectorType(ir.IntType(32), 16))
            shift = ir.Constant(ir.VectorType(ir.IntType(32), 16), [16] * 16)
            v = builder.bitcast(builder.shl(wide, shift), f16)
        else:
            v = builder.load(builder.bitcast(src_ptr, f16.as_pointer()), align=4)
        w16 = builder.trunc(bits, ir.IntType(16)) if bits.type.width > 16 else bits
        mask = builder.bitcast(w16, ir.VectorType(ir.IntType(1), 16))
        undef = ir.Constant(f16, ir.Undefined)
        one = builder.insert_element(undef, gamma, ir.Constant(ir.IntType(32), 0))
        splat = builder.shuffle_vector(
            one, undef, ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16)
        )
        out = builder.select(mask, v, builder.fmul(v, splat))
        builder.store(out, builder.bitcast(builder.gep(da.data, [dpos]), f16.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True)
def _gate_rows(buf, w, wf, bf16, m, i, nq, g, tf, tu):  # pragma: no cover - compiled
    """``buf[q] = W[i + q] * gate`` for q < nq, the gate from packed rows ``m`` (none when
    ``m`` has no rows: the base weight); rows q >= nq are zeroed. ``tf``/``tu``: one float32
    and its uint32 view, to widen a bfloat16 tail weight."""
    k = w.shape[1]
    nw = k >> 4
    bf = buf.reshape(-1)
    base = m.shape[0] == 0
    for q in range(4):
        if q >= nq:
            buf[q, :] = 0
            continue
        row = i + q
        for b in range(nw):
            word = np.uint32(0xFFFF)
            if not base:
                word = np.uint32(m[row, 2 * b]) | (np.uint32(m[row, 2 * b + 1]) << np.uint32(8))
            _gate16(bf, wf, q * k + b * 16, row * k + b * 16, word, g)
        for j in range(nw * 16, k):  # the last in % 16 weights of the row
            if bf16:
                tu[0] = np.uint32(w[row, j]) << np.uint32(16)
                v = tf[0]
            else:
                v = np.float32(w[row, j])
            if base or (m[row, j >> 3] >> (j & 7)) & 1:
                buf[q, j] = v
            else:
                buf[q, j] = v * g


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def _dot4x4(x, buf, a0, a1, a2, a3, out, i, nq):  # pragma: no cover - compiled
    """``out[a, i + q] = x[a] . buf[q]`` for the four rows ``a`` and the ``nq`` outputs q."""
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0.0)
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0.0)
    for j in range(buf.shape[1]):
        x0, x1, x2, x3 = x[a0, j], x[a1, j], x[a2, j], x[a3, j]
        b0, b1, b2, b3 = buf[0, j], buf[1, j], buf[2, j], buf[3, j]
        s00 += x0 * b0
        s01 += x0 * b1
        s02 += x0 * b2
        s03 += x0 * b3
        s10 += x1 * b0
        s11 += x1 * b1
        s12 += x1 * b2
        s13 += x1 * b3
        s20 += x2 * b0
        s21 += x2 * b1
        s22 += x2 * b2
        s23 += x2 * b3
        s30 += x3 * b0
        s31 += x3 * b1
        s32 += x3 * b2
        s33 += x3 * b3
    # the rows in reverse: a repeated last row only writes the same values again
    _store(out, a3, i, nq, s30, s31, s32, s33)
    _store(out, a2, i, nq, s20, s21, s22, s23)
    _store(out, a1, i, nq, s10, s11, s12, s13)
    _store(out, a0, i, nq, s00, s01, s02, s03)


@njit(nogil=True, cache=True, inline="always")
def _store(out, a, i, nq, s0, s1, s2, s3):  # pragma: no cover - compiled
    out[a, i] = s0
    if nq > 1:
        out[a, i + 1] = s1
    if nq > 2:
        out[a, i + 2] = s2
    if nq > 3:
        out[a, i + 3] = s3


@njit(nogil=True, fastmath=True, cache=True)
def _rows(x, w, bf16, masks, g, sel, order, start, out, r0, r1):  # pragma: no cover - compiled
    """Output rows ``r0:r1`` (``r0`` a multiple of 4) of ``x @ (W * G)^T``: group ``k`` is the
    rows ``order[start[k]:start[k+1]]``, gated by ``masks[sel[k]]`` (-1: the base weight)."""
    buf = np.empty((4, w.shape[1]), np.float32)
    wf = w.reshape(-1)
    tf = np.empty(1, np.float32)
    tu = tf.view(np.uint32)
    none = np.empty((0, 1), np.uint8)
    for i in range(r0, r1, 4):
        nq = min(4, r1 - i)
        for k in range(start.shape[0] - 1):
            m = masks[sel[k]] if sel[k] >= 0 else none
            _gate_rows(buf, w, wf, bf16, m, i, nq, g, tf, tu)
            rr, end = start[k], start[k + 1]
            while rr < end:
                last = end - 1
                _dot4x4(x, buf, order[rr], order[min(rr + 1, last)], order[min(rr + 2, last)],
                        order[min(rr + 3, last)], out, i, nq)  # fmt: skip
                rr += 4


def mask_list(arrays: list[np.ndarray]) -> List:
    """Packed masks as the numba typed list :func:`linear` indexes (no copies of C-contiguous
    uint8 arrays)."""
    out = List.empty_list(_MASK_TYPE)
    for a in arrays:
        out.append(np.ascontiguousarray(a, dtype=np.uint8))
    return out


def linear(
    x: np.ndarray,
    w: np.ndarray,
    masks: List,
    gamma: float,
    sel: np.ndarray,
    order: np.ndarray,
    start: np.ndarray,
) -> np.ndarray:
    """``(rows, out)`` float32: each group of rows of ``x`` through its persona's gated weight.

    Args:
        x: ``(rows, in)`` float32, C-contiguous.
        w: ``(out, in)`` float32, or bfloat16 as its uint16 bits; C-contiguous.
        masks: packed ``(out, ceil(in/8))`` masks (:func:`mask_list`).
        gamma: the gate of pruned weights.
        sel: ``(groups,)`` int64: each group's index into ``masks`` (-1: the base weight).
        order: ``(rows,)`` int64, the rows group by group; ``start``: ``(groups + 1,)`` int64.
    """
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    args = (x, w, w.dtype == np.uint16, masks, np.float32(gamma), sel, order, start, out)
    rows = w.shape[0]
    step = -(-rows // THREADS // 4) * 4
    if THREADS == 1 or rows <= 64:
        _rows(*args, 0, rows)
        return out
    # the pool takes all blocks but the last, which this thread runs meanwhile
    futures = [POOL.submit(_rows, *args, r, min(rows, r + step)) for r in range(0, rows, step)[:-1]]
    _rows(*args, range(0, rows, step)[-1], rows)
    for f in futures:
        f.result()
    return out


def warm() -> None:
    """Compile (or load from numba's cache) the kernel for float32 and bfloat16 weights."""
    x = np.ones((5, 20), np.float32)
    masks = mask_list([np.full((3, 3), 0x55, np.uint8)])
    groups = (np.array([0, -1]), np.arange(5), np.array([0, 3, 5]))
    for w in (np.ones((3, 20), np.float32), np.ones((3, 20), np.uint16)):
        linear(x, w, masks, 0.0, *groups)
