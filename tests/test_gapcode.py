"""The Golomb coder of sparse bits: exact round trips, near the entropy, and hostile frames
refused in one line without allocating what they declare."""

import struct

import numpy as np
import pytest
from _helpers import random_fingerprint, write_bundle
from hypothesis import given, settings
from hypothesis import strategies as st

from maskstore.store import gapcode
from maskstore.store.codecs import entropy


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=600))
def test_any_bytes_round_trip(raw):
    frame = gapcode.encode(raw, limit=len(raw) * 3 + 64)
    if frame is not None:  # None: it would not fit the limit (balanced bits)
        assert gapcode.decode(frame, len(raw)) == raw


@pytest.mark.parametrize("p", [0.0, 0.002, 0.05, 0.3, 0.7, 0.95, 1.0])
def test_sparse_and_dense_bits_round_trip(rng, p):
    raw = np.packbits(rng.random(8 * 5003) < p, bitorder="little")
    frame = gapcode.encode(raw, limit=4 * raw.size + 64)
    assert frame is not None and gapcode.is_frame(frame)
    assert gapcode.decode(frame, raw.size) == raw.tobytes()


def test_edges_first_and_last_bit():
    for raw in (b"\x01" + b"\x00" * 99, b"\x00" * 99 + b"\x80", b"\x80", b"\xff" * 7 + b"\x7f"):
        frame = gapcode.encode(raw, limit=200)
        assert gapcode.decode(frame, len(raw)) == raw


@pytest.mark.parametrize("p", [0.01, 0.05, 0.1])
def test_within_two_percent_of_the_entropy(rng, p):
    bits = rng.random(1 << 21) < p
    raw = np.packbits(bits, bitorder="little")
    frame = gapcode.encode(raw)
    bound = entropy(bits.mean()) * bits.size / 8
    assert len(frame) <= 1.02 * bound + 32


def _frame(m=3, size=16, count=1, flags=0, payload=b"\x00", version=1, magic=gapcode.MAGIC):
    return struct.pack("<4sBBIQQ", magic, version, flags, m, size, count) + payload


@pytest.mark.parametrize(
    "frame, match",
    [
        (_frame(size=1 << 60), "past"),  # would be an exabyte: refused before allocating
        (_frame(count=16 * 8 + 1), "bad header"),
        (_frame(m=0), "bad header"),
        (_frame(version=9), "version"),
        (_frame(flags=6), "version"),
        (b"\x89MSG\x01", "shorter"),
        (_frame(count=5, payload=b""), "ends early"),
        (_frame(m=1, size=1, count=1, payload=b"\xff\xff"), "past its size"),
    ],
)
def test_hostile_frames_are_one_clear_error(frame, match):
    with pytest.raises(ValueError, match=match):
        gapcode.decode(frame, 1 << 20)


def test_a_repository_stores_skewed_masks_gap_coded_and_reads_them_back(tmp_path, rng):
    """Masks with 10% kept, and the xor deltas of related ones, are stored as gap-coded frames
    when smaller; they read back bit for bit; a damaged one is an integrity error."""

    from maskstore.errors import IntegrityError
    from maskstore.repo import init_repo
    from maskstore.repo.objects import chunk_key, decode_chunk
    from maskstore.store.opener import open_bundle

    fp = random_fingerprint(rng)
    fp["modules"] = {m: [300, 400] for m in list(fp["modules"])[:3]}
    a = {m: rng.random((o, i)) < 0.1 for m, (o, i) in fp["modules"].items()}
    b = {m: x ^ (rng.random(x.shape) < 0.02) for m, x in a.items()}
    write_bundle(tmp_path / "b", fp, {"a": a, "b": b})
    repo = init_repo(tmp_path / "repo")
    snap = repo.snapshot(repo.commit(str(tmp_path / "b"), "one"))
    src = open_bundle(tmp_path / "b")
    for p in ("a", "b"):
        for m in src.persona_modules(p):
            assert np.array_equal(snap.bundle.read_mask(p, m), src.read_mask(p, m))
    keys = list(repo.store.list("chunks/"))
    frames = {k: repo.store.get(k) for k in keys}
    gap = [k for k, v in frames.items() if gapcode.is_frame(v)]
    assert gap, "no chunk was gap-coded"
    assert repo.verify() == []
    # pushed to a remote and pulled into another repository, the frames travel as they are
    # (each checked against its manifest's blake2b on the way) and read back the same
    repo.push(str(tmp_path / "remote"), "main")
    other = init_repo(tmp_path / "other")
    other.pull(str(tmp_path / "remote"), "main")
    theirs = other.snapshot("main")
    for p in ("a", "b"):
        for m in src.persona_modules(p):
            assert np.array_equal(theirs.bundle.read_mask(p, m), src.read_mask(p, m))
    assert other.verify() == []
    k = gap[0]
    h = k.replace("chunks/", "").replace("/", "")
    assert chunk_key(h) == k
    data = bytearray(frames[k])
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(IntegrityError, match="damaged"):
        decode_chunk(h, bytes(data), "test")
