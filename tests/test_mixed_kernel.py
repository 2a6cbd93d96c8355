"""The fused mixed-persona kernel (``maskstore.runtime._mixed``) against a plain reference: every
row through its persona's gated weight, any shape, float32 and bfloat16 weights, and each row's
outputs bit for bit the same whatever else is in the batch."""

import numpy as np
import pytest
import torch

from maskstore.runtime import _mixed

SHAPES = [  # (rows, out, in, personas): odd widths and heights, in < 16, enough rows for threads
    (16, 96, 64, 4),
    (5, 7, 20, 2),
    (3, 130, 172, 3),
    (9, 4, 9, 1),
    (12, 200, 48, 12),
]


def _case(rng, rows, out, width, personas, dtype):
    w = torch.randn(out, width).to(dtype)
    x = torch.randn(rows, width)
    masks = [np.packbits(rng.random((out, width)) < 0.5, axis=1, bitorder="little")
             for _ in range(personas)]  # fmt: skip
    of = [int(v) for v in rng.integers(-1, personas, rows)]  # -1: the base weight
    groups = list(dict.fromkeys(of))
    order = np.array([r for g in groups for r in range(rows) if of[r] == g], np.int64)
    start = np.cumsum([0] + [of.count(g) for g in groups], dtype=np.int64)
    raw = w.numpy() if dtype == torch.float32 else w.view(torch.uint16).numpy()
    return w, x, masks, of, (np.array(groups, np.int64), order, start), raw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("gamma", [0.0, 0.25])
def test_each_row_through_its_persona_and_alone_bit_for_bit(rng, dtype, gamma):
    for rows, out, width, personas in SHAPES:
        w, x, masks, of, groups, raw = _case(rng, rows, out, width, personas, dtype)
        got = _mixed.linear(x.numpy(), raw, _mixed.mask_list(masks), gamma, *groups)
        assert got.shape == (rows, out)
        for r, p in enumerate(of):
            wf = w.float()
            if p >= 0:
                keep = np.unpackbits(masks[p], axis=1, bitorder="little", count=width)
                wf = torch.where(torch.from_numpy(keep.astype(bool)), wf, wf * gamma)
            want = (x[r].double() @ wf.double().T).float()
            assert torch.allclose(torch.from_numpy(got[r]), want, atol=1e-4, rtol=1e-4), (r, p)
            alone = _mixed.linear(x.numpy()[r : r + 1].copy(), raw, _mixed.mask_list(masks),
                                  gamma, np.array([p], np.int64), np.zeros(1, np.int64),
                                  np.array([0, 1], np.int64))  # fmt: skip
            assert np.array_equal(alone[0], got[r]), (rows, out, width, r)


def test_a_mask_with_every_bit_set_is_the_base_weight(rng):
    w, x, masks, of, groups, raw = _case(rng, 8, 40, 50, 1, torch.float32)
    full = [np.packbits(np.ones((40, 50), bool), axis=1, bitorder="little")]
    sel = np.zeros_like(groups[0])
    with_mask = _mixed.linear(x.numpy(), raw, _mixed.mask_list(full), 0.0, sel, *groups[1:])
    base = _mixed.linear(x.numpy(), raw, _mixed.mask_list(full), 0.0, sel - 1, *groups[1:])
    assert np.array_equal(with_mask, base)
    assert np.allclose(base, (x @ w.T).numpy(), atol=1e-4)
