"""The ``torch`` backend: switching and mixed batches as plain torch ops on any device.

Every op is elementwise or a matrix product queued on the tensors' device: no boolean
indexing, no ``.item()``, so a switch never waits on the device. It writes every weight of a
module (a full pass; the Triton backend skips weights whose gate does not change), a block of
rows at a time so that its temporaries stay small.
"""

from __future__ import annotations

import torch

_ROWS_ELEMS = 1 << 22  # weights per row block: bounds the unpacked gate's temporaries


def unpack(packed: torch.Tensor, width: int) -> torch.Tensor:
    """``(rows, ceil(width/8))`` uint8, least significant bit first -> ``(rows, width)`` bool."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :width].bool()


def gate_values(packed: torch.Tensor, width: int, gamma: float, dtype: torch.dtype) -> torch.Tensor:
    """``G = M + gamma (1 - M)`` in ``dtype`` (gamma rounded to it, as ``torch.where`` does)."""
    keep = unpack(packed, width)
    return torch.where(keep, 1.0, gamma).to(dtype)


@torch.no_grad()
def gate(
    w: torch.Tensor,
    base: torch.Tensor,
    cur: torch.Tensor | None,
    new: torch.Tensor | None,
    gamma: float,
    same_gamma: bool = True,
) -> None:
    """``w = base * G_new`` in place (``new`` None: ``w = base``). ``cur`` and ``same_gamma``
    are unused: writing an unchanged gate's weights again gives the same bits."""
    del cur, same_gamma
    base = base.to(w.device)
    if new is None:
        w.copy_(base)
        return
    rows, width = w.shape
    step = max(1, _ROWS_ELEMS // max(width, 1))
    for r in range(0, rows, step):
        g = gate_values(new[r : r + step], width, gamma, w.dtype)
        torch.mul(base[r : r + step], g, out=w[r : r + step])


@torch.no_grad()
def sgmv(
    x: torch.Tensor,
    w: torch.Tensor,
    masks: torch.Tensor,
    gamma: float,
    seg_start: list[int],
    seg_slot: list[int],
) -> torch.Tensor:
    """Segmented masked products (see :mod:`maskstore.runtime.kernels`): one gated weight at a
    time, made for its segment and dropped (memory: one weight, never one per persona)."""
    out = x.new_empty((x.shape[0], w.shape[0]))
    width = w.shape[1]
    for s, slot in enumerate(seg_slot):
        a, b = seg_start[s], seg_start[s + 1]
        if a == b:
            continue
        gated = w if slot < 0 else torch.mul(w, gate_values(masks[slot], width, gamma, w.dtype))
        out[a:b] = torch.nn.functional.linear(x[a:b], gated)
    return out
