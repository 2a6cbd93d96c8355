"""The compiled switching kernels (``maskstore.runtime._switch``) against ``torch.mul(base, gate)``:
widths that take the sixteen-lane vector path (multiples of 64) and widths that go weight by
weight, float32 and bfloat16 bits, every gate transition, gammas that change, and the values a
sloppy kernel would lose (-0.0, NaN, inf, subnormals, bfloat16 ties)."""

import numpy as np
import pytest
import torch

from maskstore.runtime import _switch
from maskstore.store.bits import pad_mask

WIDTHS = [64, 192, 72, 9]  # two vector widths, two weight-by-weight ones


def _base(rng: np.random.Generator, out: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    w = torch.from_numpy(rng.standard_normal((out, width)).astype(np.float32))
    specials = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf"), 1e-40, 3.0e38])
    flat = w.view(-1)
    flat[rng.choice(flat.numel(), specials.numel() * 4, replace=False)] = specials.repeat(4)
    return w.to(dtype)


def _gate(base: torch.Tensor, keep: np.ndarray | None, gamma: float) -> torch.Tensor:
    if keep is None:
        return base.clone()
    g = torch.where(torch.from_numpy(keep), 1.0, gamma).to(base.dtype)
    return torch.mul(base, g)


def _raw(t: torch.Tensor) -> np.ndarray:
    return t.numpy() if t.dtype == torch.float32 else t.view(torch.int16).numpy().view(np.uint16)


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    ints = {2: torch.int16, 4: torch.int32}[got.element_size()]
    equal = got.view(ints) == want.view(ints)
    return bool((equal | (got.isnan() & want.isnan())).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("width", WIDTHS)
def test_file_kernel_writes_the_gate_of_every_transition(rng, dtype, width):
    """From the base model, between personas (same and other gamma) and back to base, the
    kernel that reads pruned weights back from the checkpoint's bytes leaves exactly
    ``torch.mul(base, gate)``, in one call or split over row blocks."""
    out = 37
    base = _base(rng, out, width, dtype)
    keeps = [rng.random((out, width)) < p for p in (0.5, 0.9, 0.1)]
    steps = [(None, 0.0), (0, 0.0), (1, 0.0), (1, 0.3), (2, 0.7), (0, 0.7), (None, 0.0),
             (2, 0.0), (None, 0.0)]  # fmt: skip
    w = base.clone()
    cur, cur_g = None, 0.0
    tail = pad_mask(width)
    for split in (False, True):
        for k, gamma in steps:
            new = None if k is None else np.packbits(keeps[k], axis=1, bitorder="little")
            g = float(torch.tensor(gamma).to(dtype).float())
            same_gamma = cur is None or new is None or cur_g == g
            kernel, args, rows, _ = _switch.job_file(
                _raw(w), _raw(base), cur, new, tail, g, same_gamma, dtype == torch.bfloat16
            )
            if split:
                for r in range(0, rows, 5):
                    kernel(*args, r, min(rows, r + 5))
            else:
                kernel(*args, 0, rows)
            want = _gate(base, None if k is None else keeps[k], g)
            assert _same(w, want), (split, k, gamma)
            cur, cur_g = new, g
    assert torch.equal(w.view(torch.uint8), base.view(torch.uint8))  # back to base, bit for bit


@pytest.mark.parametrize("width", [64, 128])
def test_vector_path_rounds_bfloat16_as_torch(rng, width):
    """Products that land on a bfloat16 rounding tie, overflow to inf or underflow: the
    sixteen-lane path rounds to nearest even exactly as torch's bfloat16 multiply."""
    out = 8
    bits = rng.integers(0, 1 << 16, (out, width), dtype=np.uint16)
    base = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    keep = rng.random((out, width)) < 0.5
    packed = np.packbits(keep, axis=1, bitorder="little")
    for gamma in (0.5, 0.3, 3.0, 1e-30):
        g = float(torch.tensor(gamma).to(torch.bfloat16).float())
        w = base.clone()
        kernel, args, rows, _ = _switch.job_file(
            _raw(w), _raw(base), None, packed, pad_mask(width), g, True, True
        )
        kernel(*args, 0, rows)
        assert _same(w, _gate(base, keep, g)), gamma
