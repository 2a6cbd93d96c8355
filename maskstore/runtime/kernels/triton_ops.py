"""The ``triton`` backend: switching and mixed batches as Triton kernels.

- :func:`gate`: one pass per module that unpacks the packed masks and gates the base values,
  reading and writing only the weights whose gate changes (masked loads and stores: a delta
  switch moves the differing share of the bytes, at the device's sector granularity).
- :func:`sgmv`: the masked segmented matrix product of mixed batches: rows grouped by persona
  (as vLLM's LoRA kernels group tokens by adapter), each program one (segment, output block);
  the weight tile is gated from the persona's packed bits in registers, so ``W`` is never
  rewritten and a persona costs its packed bits. Programs of one output block run side by side
  (the segment is the fastest grid axis), so every persona's read of a ``W`` tile after the
  first comes from L2.

Rounding matches ``torch.mul(base, G)``: float32 and float16 multiply in their own precision
(a product of two float16 values is exact in float32, so rounding once gives torch's bits);
bfloat16 keeps kept weights' bits and multiplies pruned ones in float32, rounded to nearest
even by integer arithmetic (the interpreter truncates casts, the GPU rounds: both give torch's
bits this way; a NaN product is a NaN, whose payload torch itself writes differently on its
CPU and CUDA paths).

Batch invariance: tile shapes are constants (no autotuning, no split-K), so a row's output
is computed by the same instructions whatever its batch-mates.

Run on CPU tensors with ``TRITON_INTERPRET=1`` set before Triton is first imported (the tests
do): there the kernel multiplies 16-bit tiles in float32 (the interpreter's ``tl.dot`` misreads
bfloat16), so mixed products are compared with a tolerance; the switch is bitwise everywhere.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_BLOCK_R, _BLOCK_C = 16, 256  # gate: a tile of weights (256 columns = 32 mask bytes a row)
_BM, _BN, _BK = 16, 64, 64  # sgmv: fixed for batch invariance (16 rows: tl.dot's minimum)
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _gated(b, keep, gamma, KIND: tl.constexpr):
    """``b * (1 if keep else gamma)`` rounded as torch rounds it, in ``b``'s dtype."""
    if KIND == 2:  # bfloat16: float32 product, rounded to nearest even on the bits
        p = b.to(tl.float32) * gamma
        u = p.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(p != p, 0xFFFF, r)  # a NaN as torch's vectorised rounding writes it
        return tl.where(keep, b, r.to(tl.uint16).to(tl.bfloat16, bitcast=True))
    elif KIND == 1:
        return b * tl.where(keep, 1.0, gamma).to(tl.float16)
    else:
        return b * tl.where(keep, 1.0, gamma)


@triton.jit
def _gate_kernel(w_ptr, base_ptr, cur_ptr, new_ptr, rows, cols, pw, gamma,
                 HAS_CUR: tl.constexpr, HAS_NEW: tl.constexpr, SAME_GAMMA: tl.constexpr,
                 KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (r[:, None] < rows) & (c[None, :] < cols)
    off = r[:, None].to(tl.int64) * cols + c[None, :]
    moff = r[:, None].to(tl.int64) * pw + (c // 8)[None, :]
    shift = (c % 8).to(tl.uint8)[None, :]
    if HAS_NEW:
        keep_new = ((tl.load(new_ptr + moff, mask=inside, other=0) >> shift) & 1) != 0
    else:
        keep_new = inside | True
    if HAS_CUR:
        keep_cur = ((tl.load(cur_ptr + moff, mask=inside, other=0) >> shift) & 1) != 0
    else:
        keep_cur = inside | True
    if SAME_GAMMA:
        write = keep_cur != keep_new  # only where the kept bit changes
    else:
        write = (keep_cur & keep_new) == 0  # every weight either gate prunes
    write = write & inside
    b = tl.load(base_ptr + off, mask=write, other=0.0)
    if HAS_NEW:
        b = _gated(b, keep_new, gamma, KIND)
    tl.store(w_ptr + off, b, mask=write)


def gate(
    w: torch.Tensor,
    base: torch.Tensor,
    cur: torch.Tensor | None,
    new: torch.Tensor | None,
    gamma: float,
    same_gamma: bool = True,
) -> None:
    """``w = base * G_new`` in place, writing only where the gate changes from ``cur`` (the
    packed mask ``w`` holds now; None: the base weights) to ``new`` (None: the base weights).
    ``same_gamma``: ``w`` holds ``cur`` gated with this ``gamma`` (else every weight either
    gate prunes is rewritten)."""
    if cur is None and new is None:
        return
    rows, cols = w.shape
    pw = (cols + 7) // 8
    for t in (cur, new):
        if t is not None and (t.shape != (rows, pw) or t.dtype != torch.uint8):
            raise ValueError(f"packed mask of shape {tuple(t.shape)} for a {rows}x{cols} weight")
    if not (w.is_contiguous() and base.is_contiguous() and base.shape == w.shape):
        raise ValueError("gate() needs contiguous weights and base values of the same shape")
    dummy = new if new is not None else cur
    grid = (triton.cdiv(rows, _BLOCK_R), triton.cdiv(cols, _BLOCK_C))
    _gate_kernel[grid](
        w, base, cur if cur is not None else dummy, new if new is not None else dummy,
        rows, cols, pw, float(gamma),
        HAS_CUR=cur is not None, HAS_NEW=new is not None, SAME_GAMMA=bool(same_gamma),
        KIND=_KIND[w.dtype], BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C,
    )  # fmt: skip


@triton.jit
def _sgmv_kernel(x_ptr, w_ptr, m_ptr, y_ptr, seg_start_ptr, seg_slot_ptr, gamma,
                 N, K, sxm, swn, sms, smn, sym,
                 KIND: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    seg = tl.program_id(0)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    row0 = start + tl.program_id(2) * BM
    if row0 < end:
        slot = tl.load(seg_slot_ptr + seg)
        rm = row0 + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            xmask = (rm[:, None] < end) & (rk[None, :] < K)
            xt = tl.load(
                x_ptr + rm[:, None].to(tl.int64) * sxm + rk[None, :], mask=xmask, other=0.0
            )
            wmask = (rn[:, None] < N) & (rk[None, :] < K)
            wt = tl.load(
                w_ptr + rn[:, None].to(tl.int64) * swn + rk[None, :], mask=wmask, other=0.0
            )
            if slot >= 0:
                moff = slot.to(tl.int64) * sms + rn[:, None].to(tl.int64) * smn + (rk // 8)[None, :]
                bits = tl.load(m_ptr + moff, mask=wmask, other=0)
                keep = ((bits >> (rk % 8).to(tl.uint8)[None, :]) & 1) != 0
                wt = _gated(wt, keep, gamma, KIND)
            if UPCAST:  # the interpreter's tl.dot misreads 16-bit floats: multiply in float32
                acc += tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)))
            elif IEEE:
                acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(wt))
        ymask = (rm[:, None] < end) & (rn[None, :] < N)
        tl.store(y_ptr + rm[:, None].to(tl.int64) * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=ymask)  # fmt: skip


def sgmv(
    x: torch.Tensor,
    w: torch.Tensor,
    masks: torch.Tensor,
    gamma: float,
    seg_start: list[int],
    seg_slot: list[int],
) -> torch.Tensor:
    """Segmented masked products (see :mod:`maskstore.runtime.kernels`); ``x`` (m, in) in
    ``w``'s dtype, rows grouped by segment; returns (m, out)."""
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"x has {k} columns but the weight {w.shape[1]}")
    if masks.dim() != 3 or masks.shape[1:] != (n, (k + 7) // 8) or masks.dtype != torch.uint8:
        raise ValueError(
            f"masks must be (slots, {n}, {(k + 7) // 8}) uint8, got {tuple(masks.shape)}"
        )
    x, w, masks = x.contiguous(), w.contiguous(), masks.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    longest = max(b - a for a, b in zip(seg_start[:-1], seg_start[1:], strict=True))
    if longest == 0:
        return y
    starts = torch.tensor(seg_start, dtype=torch.int32).to(x.device, non_blocking=True)
    slots = torch.tensor(seg_slot, dtype=torch.int32).to(x.device, non_blocking=True)
    if masks.shape[0] == 0:  # a valid pointer for the kernel (never read: no slot uses it)
        masks = torch.zeros((1, n, (k + 7) // 8), dtype=torch.uint8, device=w.device)
    grid = (len(seg_slot), triton.cdiv(n, _BN), triton.cdiv(longest, _BM))
    _sgmv_kernel[grid](
        x, w, masks, y, starts, slots, float(gamma), n, k,
        x.stride(0), w.stride(0), masks.stride(0), masks.stride(1), y.stride(0),
        KIND=_KIND[w.dtype], IEEE=w.dtype == torch.float32,
        UPCAST=_INTERPRETING and w.dtype != torch.float32, BM=_BM, BN=_BN, BK=_BK,
    )  # fmt: skip
    return y
