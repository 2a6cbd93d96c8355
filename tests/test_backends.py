"""One battery of switching and mixing tests, run over every backend on CPU tensors (as PEFT
runs one battery over every tuner): numba (the CPU default), torch ops and Triton (under its
interpreter), forced with ``MASKSTORE_BACKEND``. Bitwise restore in float32, bfloat16 (and
float16 on the device backends), every gate transition, gammas that change, widths that are not
multiples of 8; the device LRU's bound; mixed rows against each persona switched in place."""

import pytest
import torch
from _tiny import tiny_llama

import maskstore
from maskstore import create_bundle
from maskstore.errors import MaskstoreError
from maskstore.modules import maskable_modules, model_fingerprint

pytest.importorskip("triton")

BACKENDS = ["numba", "torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("MASKSTORE_BACKEND", request.param)
    return request.param


def _bundle(tmp_path, model, rng, personas=("a", "b")):
    mods = maskable_modules(model)
    with create_bundle(tmp_path / "b", model_fingerprint(model, mods, hash_weights=True)) as b:
        for p in personas:
            with b.persona_writer(p, method="t") as w:
                for n, m in mods.items():
                    w.write_mask(n, rng.random((m.out_features, m.in_features)) < 0.6)
    return tmp_path / "b"


def _bits(t):
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _same(got, want):
    return bool(((_bits(got) == _bits(want)) | (got.isnan() & want.isnan())).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_backend_switches_bit_for_bit(tmp_path, rng, backend, dtype):
    if backend == "numba" and dtype == torch.float16:
        pytest.skip("numba switches float16 by torch indexing (covered in test_runtime)")
    model = tiny_llama(seed=2, layers=1).to(dtype)
    path = _bundle(tmp_path, model, rng)
    base = {n: m.weight.detach().clone() for n, m in maskable_modules(model).items()}
    h = maskstore.attach(model, path, check_weights=False)
    assert h.backend == backend
    bundle = maskstore.open(path)
    for p, g in (("a", 0.0), ("b", 0.0), ("b", 0.3), ("a", 0.3), ("a", 0.0), (None, 0.0),
                 ("b", 0.5), ("a", 0.5), (None, 0.0)):  # fmt: skip
        h.use(p, g)
        for n, m in h.modules.items():
            if p is None:
                want = base[n]
            else:
                keep = torch.from_numpy(bundle.read_mask(p, n))
                want = torch.mul(base[n], torch.where(keep, 1.0, g).to(dtype))
            assert _same(m.weight, want), (p, g, n)
    h.use("b")
    h.detach()
    assert all(_same(m.weight, base[n]) for n, m in maskable_modules(model).items())


def test_device_backends_keep_masks_in_a_bounded_device_lru(tmp_path, rng, monkeypatch):
    """The device LRU holds packed bits only (a persona costs 1 bit a masked weight), evicts
    past its bound, and a switch back to a cached persona reads no mask from the host."""
    monkeypatch.setenv("MASKSTORE_BACKEND", "torch")
    model = tiny_llama(seed=3, layers=1)
    path = _bundle(tmp_path, model, rng, ("a", "b", "c"))
    mods = maskable_modules(model)
    per_persona = sum(m.out_features * ((m.in_features + 7) // 8) for m in mods.values())
    h = maskstore.attach(model, path, device_cache_bytes=2 * per_persona, check_weights=False)
    for p in ("a", "b"):
        h.use(p)
    info = h.device_cache_info()
    assert info.bytes == 2 * per_persona and info.entries == 2 * len(mods)
    hits = info.hits
    h.use("a")
    assert h.device_cache_info().hits == hits + len(mods)  # every module's mask from the LRU
    h.use("c")  # evicts b, the least recently used
    info = h.device_cache_info()
    assert info.bytes <= 2 * per_persona
    weights = sum(m.weight.numel() * m.weight.element_size() for m in mods.values())
    assert h.memory_overhead() == weights + h.cache_info().bytes + info.bytes  # W0 on the device


def test_a_zero_device_cache_still_switches_right(tmp_path, rng, monkeypatch):
    monkeypatch.setenv("MASKSTORE_BACKEND", "triton")
    model = tiny_llama(seed=4, layers=1)
    path = _bundle(tmp_path, model, rng)
    base = {n: m.weight.detach().clone() for n, m in maskable_modules(model).items()}
    h = maskstore.attach(model, path, device_cache_bytes=0, cache_bytes=0, check_weights=False)
    for p in ("a", "b", "a", None):
        h.use(p)
    assert h.device_cache_info().entries <= 1
    assert all(_same(m.weight, base[n]) for n, m in h.modules.items())


def test_pristine_keeps_pruned_positions_only_on_a_device_backend(tmp_path, rng, monkeypatch):
    monkeypatch.setenv("MASKSTORE_BACKEND", "torch")
    model = tiny_llama(seed=5, layers=1)
    path = _bundle(tmp_path, model, rng)
    base = {n: m.weight.detach().clone() for n, m in maskable_modules(model).items()}
    h = maskstore.attach(model, path, pristine="cpu", check_weights=False)
    h.use("a")
    weights = sum(w.numel() * w.element_size() for w in base.values())
    assert h.memory_overhead() < 0.6 * weights + h.cache_info().bytes + h.device_cache_info().bytes
    h.use(None)
    assert all(_same(m.weight, base[n]) for n, m in h.modules.items())


@pytest.mark.parametrize("value", [-1, True, 1.5, "1GB"])
def test_device_cache_bytes_is_a_non_negative_integer(tmp_path, rng, value):
    model = tiny_llama(seed=6, layers=1)
    path = _bundle(tmp_path, model, rng)
    with pytest.raises(MaskstoreError, match="device_cache_bytes"):
        maskstore.attach(model, path, device_cache_bytes=value)
    maskstore.attach(model, path).detach()  # nothing was claimed by the refused attach


def test_an_unknown_backend_is_refused_at_attach(tmp_path, rng, monkeypatch):
    model = tiny_llama(seed=6, layers=1)
    path = _bundle(tmp_path, model, rng)
    monkeypatch.setenv("MASKSTORE_BACKEND", "cuda")
    with pytest.raises(MaskstoreError, match="not a backend: use one of numba, torch, triton"):
        maskstore.attach(model, path)
    monkeypatch.delenv("MASKSTORE_BACKEND")
    assert maskstore.attach(model, path).backend == "numba"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_rows_match_each_persona_on_every_backend(tmp_path, rng, backend, dtype):
    """Mixed blocks gate as they read (no weight copies) on every backend; each row matches
    its persona switched in place, and on numba and Triton a row's outputs do not depend on
    its batch-mates, bit for bit."""
    model = tiny_llama(seed=7, layers=1).to(dtype)
    mods = maskable_modules(model)
    path = _bundle(tmp_path, model, rng)
    h = maskstore.attach(model, path, check_weights=False)
    rows = ["a", None, "b", "a", "b"]
    name, mod = list(mods.items())[-1]  # a down projection: in not a multiple of 8
    x = torch.randn(5, 3, mod.in_features, generator=torch.Generator().manual_seed(3)).to(dtype)
    ids = torch.randint(0, 256, (5, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), h.mixed(rows):
        assert h.fused_mixing
        assert not any(h._mix.gated[n] for n in mods)  # no gated weight copies
        assert (h._mix.device is not None) == (backend != "numba")
        y = mod(x)
        logits = model(ids).logits.float()
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for i, p in enumerate(rows):
        if backend != "torch":
            with torch.no_grad(), h.mixed([p]):
                assert torch.equal(mod(x[i : i + 1])[0], y[i]), (p, i)
        with torch.no_grad(), h.persona(p):
            alone = mod(x[i : i + 1])[0].float()
            want = model(ids[i : i + 1]).logits.float()[0]
        assert torch.allclose(alone, y[i].float(), atol=tol, rtol=tol), (p, i)
        assert torch.allclose(logits[i], want, atol=tol * 4, rtol=tol * 4), (p, i)
