import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maskstore.store.bits import pack, pad_mask, popcount, unpack, unpack_torch


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40), st.integers(1, 70), st.floats(0, 1), st.integers(0, 2**31))
def test_pack_roundtrip_and_zero_padding(rows, cols, p, seed):
    m = np.random.default_rng(seed).random((rows, cols)) < p
    packed = pack(m)
    assert packed.shape == (rows, (cols + 7) // 8) and packed.dtype == np.uint8
    assert np.array_equal(unpack(packed, cols), m)
    assert np.array_equal(unpack_torch(torch.from_numpy(packed), cols).numpy(), m)
    assert popcount(packed) == int(m.sum())
    # padding bits are zero: masking with pad_mask changes nothing
    assert np.array_equal(packed & pad_mask(cols), packed)


def test_bit_order_is_little():
    m = np.zeros((1, 9), dtype=bool)
    m[0, 0] = m[0, 8] = True
    assert pack(m).tolist() == [[1, 1]]


def test_unpack_torch_generic_path_matches_numpy():
    # unpack_torch's device path (shifts), called on a CPU tensor: no GPU needed to test it
    from maskstore.store import bits

    for shape in ((5, 13), (3, 8), (1, 1), (4, 17)):
        m = np.random.default_rng(0).random(shape) < 0.3
        packed = torch.from_numpy(pack(m))
        assert np.array_equal(bits._unpack_shifts(packed, shape[1]).numpy(), m)
        assert np.array_equal(unpack_torch(packed, shape[1]).numpy(), m)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 20), st.integers(1, 70), st.floats(0, 1), st.integers(0, 2**31))
def test_pack_device_path_matches_numpy(rows, cols, p, seed):
    """pack's device path (a mask on a GPU is packed there, so 1/8 of it crosses to the host),
    called on CPU tensors: the same bytes as numpy's packbits, padding bits zero, and
    unpack_torch's device path takes them back."""
    from maskstore.store import bits

    m = np.random.default_rng(seed).random((rows, cols)) < p
    got = bits._pack_shifts(torch.from_numpy(m))
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), pack(m))
    assert np.array_equal(bits._unpack_shifts(got, cols).numpy(), m)
