"""The device backends' kernels (``maskstore.runtime.kernels``) against plain torch references,
on CPU tensors: Triton under its interpreter (conftest sets ``TRITON_INTERPRET=1`` without a
GPU), torch ops directly. Widths that are not multiples of 8 or of a tile, every gate
transition, gammas that change, -0.0 / NaN / inf / subnormals, segments of every shape and
skewed persona popularity (as vLLM's punica tests sweep), and guard memory around every
buffer: NaN before and after inputs (an out-of-bounds read shows as a NaN), sentinels after
outputs (an out-of-bounds write shows as a changed sentinel)."""

import numpy as np
import pytest
import torch
from test_switch_kernel import _base, _same
from test_switch_kernel import _gate as _gated

from maskstore.runtime import kernels
from maskstore.store.bits import pack

pytest.importorskip("triton")

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PAD = 97  # guard elements on each side of every buffer


def _guarded(t: torch.Tensor, fill: float | int) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` copied into the middle of a flat buffer whose ends hold ``fill``: (view, buffer)."""
    buf = torch.full((t.numel() + 2 * PAD,), fill, dtype=t.dtype)
    view = buf[PAD : PAD + t.numel()].view(t.shape)
    view.copy_(t)
    return view, buf


def _guards_hold(buf: torch.Tensor, fill: float | int) -> bool:
    ends = torch.cat([buf[:PAD], buf[-PAD:]])
    if isinstance(fill, float) and fill != fill:
        return bool(ends.isnan().all())
    return bool((ends == fill).all())


def _rounded(gamma: float, dtype: torch.dtype) -> float:
    return float(torch.tensor(gamma).to(dtype).float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [9, 45, 64, 300])
def test_gate_is_torch_mul_through_every_transition(rng, backend, dtype, cols):
    ops = kernels.get(backend)
    rows = 37
    base, base_buf = _guarded(_base(rng, rows, cols, dtype), float("nan"))
    w, w_buf = _guarded(base.clone(), 7.0)
    a, b = (rng.random((rows, cols)) < 0.6 for _ in range(2))
    pa, pb = torch.from_numpy(pack(a)), torch.from_numpy(pack(b))
    # (cur, gamma the weights hold) -> (new, gamma)
    steps = [(None, 0.0, a, 0.0), (a, 0.0, b, 0.0), (b, 0.0, b, 0.3), (b, 0.3, a, 0.3),
             (a, 0.3, a, 0.0), (a, 0.0, None, 0.0), (None, 0.0, b, 0.5), (b, 0.5, None, 0.0)]  # fmt: skip
    packed = {id(a): pa, id(b): pb}
    for cur, g0, new, g1 in steps:
        g = _rounded(g1, dtype)
        ops.gate(w, base, None if cur is None else packed[id(cur)],
                 None if new is None else packed[id(new)], g, g0 == g1 or cur is None or new is None)  # fmt: skip
        assert _same(w, _gated(base, new, g)), (cur is None, new is None, g0, g1)
    assert _guards_hold(w_buf, 7.0) and _guards_hold(base_buf, float("nan"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_gate_writes_only_weights_whose_gate_changes(rng, dtype):
    """A delta switch moves the differing share: weights whose gate is the same in both
    personas are never written (a full pass would overwrite the sentinels planted there)."""
    ops = kernels.get("triton")
    rows, cols = 40, 100
    base = _base(rng, rows, cols, dtype)
    a = rng.random((rows, cols)) < 0.7
    b = a.copy()
    flip = rng.random((rows, cols)) < 0.05
    b[flip] = ~b[flip]
    w = _gated(base, a, 0.0)
    w[torch.from_numpy(~flip)] = 5.0  # unchanged gate: must stay as it is
    ops.gate(w, base, torch.from_numpy(pack(a)), torch.from_numpy(pack(b)), 0.0, True)
    assert bool((w[torch.from_numpy(~flip)] == 5.0).all())
    assert _same(w[torch.from_numpy(flip)], _gated(base, b, 0.0)[torch.from_numpy(flip)])
    # a new gamma: every weight either gate prunes is rewritten, kept-in-both ones are not
    w = _gated(base, b, 0.0)
    both = torch.from_numpy(a & b)
    w[both] = 5.0
    ops.gate(w, base, torch.from_numpy(pack(b)), torch.from_numpy(pack(a)), 0.25, False)
    assert bool((w[both] == 5.0).all())
    assert _same(w[~both], _gated(base, a, _rounded(0.25, dtype))[~both])


def _segments(kind: str, rows: int, slots: int, rng: np.random.Generator):
    """Row counts and slots per segment for a popularity pattern (-1: the base model)."""
    if kind == "one":
        return [rows], [0]
    if kind == "each-row":
        return [1] * rows, [(i % (slots + 1)) - 1 for i in range(rows)]
    if kind == "skewed":  # one persona holds most rows, a long tail the rest
        big = rows - slots
        return [big] + [1] * slots, [0] + list(range(slots - 1, -1, -1))
    if kind == "with-empty":
        return [0, rows // 2, 0, rows - rows // 2], [1, -1, 0, slots - 1]
    counts = rng.multinomial(rows, np.ones(slots + 1) / (slots + 1)).tolist()
    return counts, list(range(-1, slots))


def _reference(x, w, masks, gamma, start, slot):
    """Per segment: ``x @ (w * G_p)^T`` with the gated weight rounded to w's dtype, in float32."""
    out = torch.zeros((x.shape[0], w.shape[0]))
    for s, p in enumerate(slot):
        a, b = start[s], start[s + 1]
        if a == b:
            continue
        g = (
            w
            if p < 0
            else torch.mul(w, torch.where(_unpack(masks[p], w.shape[1]), 1.0, gamma).to(w.dtype))
        )
        out[a:b] = x[a:b].float() @ g.float().T
    return out


def _unpack(packed: torch.Tensor, width: int) -> torch.Tensor:
    return torch.from_numpy(
        np.unpackbits(packed.numpy(), axis=1, count=width, bitorder="little").view(bool)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["one", "each-row", "skewed", "with-empty", "random"])
@pytest.mark.parametrize(("n", "k"), [(37, 45), (64, 130)])
def test_sgmv_matches_a_per_persona_reference(rng, backend, dtype, kind, n, k):
    ops = kernels.get(backend)
    slots = 3
    counts, slot = _segments(kind, 21, slots, rng)
    start = np.concatenate([[0], np.cumsum(counts)]).tolist()
    m = start[-1]
    x, xb = _guarded(
        torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype), float("nan")
    )
    w, wb = _guarded(
        torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)).to(dtype), float("nan")
    )
    masks = torch.stack([torch.from_numpy(pack(rng.random((n, k)) < 0.6)) for _ in range(slots)])
    for gamma in (0.0, 0.25):
        g = _rounded(gamma, dtype)
        y = ops.sgmv(x, w, masks, g, start, slot)
        want = _reference(x, w, masks, g, start, slot)
        assert y.shape == (m, n) and y.dtype == dtype
        assert not y.isnan().any()  # no read past an input
        tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
        scale = want.abs().max().item() + 1.0
        assert (y.float() - want).abs().max().item() <= tol * scale, (kind, gamma)
    assert _guards_hold(xb, float("nan")) and _guards_hold(wb, float("nan"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_sgmv_rows_do_not_depend_on_their_batch_mates(rng, dtype):
    """Batch invariance: a row computed alone, in a batch of its persona, or in a batch of many
    personas gives the same bits (fixed tiles, no split-K)."""
    ops = kernels.get("triton")
    n, k = 50, 70
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)).to(dtype)
    masks = torch.stack([torch.from_numpy(pack(rng.random((n, k)) < 0.6)) for _ in range(4)])
    x = torch.randn(20, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    counts, slot = [6, 1, 9, 4], [2, -1, 0, 3]
    start = np.concatenate([[0], np.cumsum(counts)]).tolist()
    y = ops.sgmv(x, w, masks, 0.0, start, slot)
    for s, p in enumerate(slot):
        for r in range(start[s], start[s + 1]):
            alone = ops.sgmv(x[r : r + 1], w, masks, 0.0, [0, 1], [p])
            assert torch.equal(alone[0], y[r]), (s, r)
        part = ops.sgmv(x[start[s] : start[s + 1]], w, masks, 0.0, [0, counts[s]], [p])
        assert torch.equal(part, y[start[s] : start[s + 1]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_refuse_shapes_that_do_not_fit(backend):
    ops = kernels.get(backend)
    w = torch.zeros(8, 20)
    if backend == "triton":
        with pytest.raises(ValueError, match="packed mask"):
            ops.gate(w, w.clone(), None, torch.zeros(8, 2, dtype=torch.uint8), 0.0)
        with pytest.raises(ValueError, match="masks must be"):
            ops.sgmv(
                torch.zeros(2, 20), w, torch.zeros(1, 8, 2, dtype=torch.uint8), 0.0, [0, 2], [0]
            )
        with pytest.raises(ValueError, match="columns"):
            ops.sgmv(
                torch.zeros(2, 19), w, torch.zeros(1, 8, 3, dtype=torch.uint8), 0.0, [0, 2], [0]
            )
    y = ops.sgmv(torch.zeros(0, 20), w, torch.zeros(0, 8, 3, dtype=torch.uint8), 0.0, [0, 0], [-1])
    assert y.shape == (0, 8)


def test_backend_selection_and_its_errors(monkeypatch):
    from maskstore.errors import MaskstoreError

    monkeypatch.delenv("MASKSTORE_BACKEND", raising=False)
    assert kernels.select("cpu") == "numba"
    assert kernels.select("xpu") in ("torch", "triton")
    monkeypatch.setenv("MASKSTORE_BACKEND", "torch")
    assert kernels.select("cpu") == "torch"
    monkeypatch.setenv("MASKSTORE_BACKEND", "../../etc/passwd\n" * 10)
    with pytest.raises(MaskstoreError, match="is not a backend") as e:
        kernels.select("cpu")
    assert "\n" not in str(e.value) and len(str(e.value)) < 200
    monkeypatch.setenv("MASKSTORE_BACKEND", "numba")
    with pytest.raises(MaskstoreError, match="CPU tensors only"):
        kernels.select("cuda")
    monkeypatch.setenv("MASKSTORE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(MaskstoreError, match="TRITON_INTERPRET=1"):
        kernels.select("cpu")
    with pytest.raises(MaskstoreError, match="not a device backend"):
        kernels.get("numba")
