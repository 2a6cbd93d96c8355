"""Bit-packed masks: one bit a weight, rows padded to whole bytes, bit order little.

Bit ``j`` of row ``i`` lives in byte ``j // 8`` of that row, at bit position ``j % 8`` counting from
the least significant bit, exactly as ``np.packbits(mask, axis=1, bitorder="little")``. Padding bits
(positions ``>= in_features`` in the last byte of a row) are always zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def packed_width(in_features: int) -> int:
    """Bytes per packed row for ``in_features`` columns."""
    return (in_features + 7) // 8


def pack(mask: Any) -> np.ndarray:
    """Pack a 2-D bool mask ``(out, in)`` (numpy, or a torch tensor) into ``uint8`` rows
    ``(out, ceil(in/8))``."""
    if hasattr(mask, "detach"):  # a torch tensor; torch is never imported here
        if mask.device.type != "cpu" and mask.dim() == 2:  # packed where it is: 1/8 crosses
            return _pack_shifts(mask.detach().bool()).cpu().numpy()
        mask = mask.detach().cpu().bool().numpy()
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (out, in), got shape {mask.shape}")
    return np.packbits(mask, axis=1, bitorder="little")


def unpack(packed: np.ndarray, in_features: int) -> np.ndarray:
    """Unpack ``uint8`` rows ``(out, ceil(in/8))`` into a bool mask ``(out, in)``."""
    return np.unpackbits(packed, axis=1, count=in_features, bitorder="little").view(bool)


def unpack_torch(packed: Any, in_features: int) -> Any:
    """Unpack a ``uint8`` torch tensor on its own device (so only packed bytes cross to a GPU)."""
    import torch

    if packed.device.type == "cpu":
        return torch.from_numpy(unpack(packed.numpy(), in_features))
    return _unpack_shifts(packed, in_features)


def _pack_shifts(mask: Any) -> Any:
    """The device path of :func:`pack`: a bool ``(out, in)`` torch tensor to ``uint8`` rows
    ``(out, ceil(in/8))`` on its own device, bit ``j`` of byte ``b`` is column ``8b + j``."""
    import torch

    out, cols = mask.shape
    padded = torch.zeros((out, packed_width(cols) * 8), dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (padded.view(out, packed_width(cols), 8) * weights).sum(-1, dtype=torch.uint8)


def _unpack_shifts(packed: Any, in_features: int) -> Any:
    """The device path of :func:`unpack_torch`: shifts and masks, any torch device."""
    import torch

    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # (out, nbytes, 8)
    return bits.reshape(packed.shape[0], packed.shape[1] * 8)[:, :in_features].bool()


def pad_mask(in_features: int) -> np.ndarray:
    """Per-byte mask ``(ceil(in/8),)`` with ones on the real bits and zeros on padding bits."""
    row = np.ones((1, in_features), dtype=bool)
    return pack(row)[0]


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount(buf: np.ndarray) -> int:
    """Number of set bits in a ``uint8`` buffer of any shape (contiguous or not)."""
    flat = np.ascontiguousarray(buf).reshape(-1)
    n8 = flat.size // 8 * 8
    total = int(np.bitwise_count(flat[:n8].view(np.uint64)).sum(dtype=np.uint64))
    if n8 < flat.size:
        total += int(_POPCOUNT8[flat[n8:]].sum())
    return total
