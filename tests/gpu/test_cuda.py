"""The device paths on a CUDA GPU (skipped without one; scripts/gpu_check.sh runs them)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _helpers import run_with_joiners
from _tiny import tiny_llama

import maskstore
from maskstore.build import BuildConfig, build, scoring
from maskstore.store.opener import open_bundle

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batches(seed, lo, hi):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(lo, hi, (3, 24), generator=g)} for _ in range(4)]


def _bits(t):
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pristine", [None, "cpu"])
def test_switching_on_cuda_restores_bit_for_bit(tmp_path, dtype, pristine):
    model = tiny_llama(seed=1)
    build(model, {"a": _batches(0, 0, 128), "b": _batches(1, 128, 256)}, tmp_path / "b.zarr")
    model = model.to("cuda", dtype)
    base = {n: m.weight.detach().clone() for n, m in maskstore.maskable_modules(model).items()}
    h = maskstore.attach(model, tmp_path / "b.zarr", pristine=pristine)
    bundle = open_bundle(tmp_path / "b.zarr")
    for p, g in (("a", 0.0), ("b", 0.0), ("a", 0.3), (None, 0.0), ("b", 0.5)):
        h.use(p, g)
        for n, m in h.modules.items():
            assert m.weight.device.type == "cuda"
            if p is None:
                want = base[n]
            else:
                keep = torch.from_numpy(bundle.read_mask(p, n)).to("cuda")
                want = torch.mul(base[n], torch.where(keep, 1.0, g).to(dtype))
            assert torch.equal(_bits(m.weight), _bits(want)), (p, n)
    h.use(None)
    assert all(torch.equal(_bits(m.weight), _bits(base[n])) for n, m in h.modules.items())


def test_scoring_on_cuda_gives_the_cpu_bits(rng):
    w = torch.from_numpy(rng.normal(size=(512, 768))).float()
    f = rng.random(768)
    f[rng.random(768) < 0.4] = 0.0  # ties at zero, broken by the second score
    tf = rng.random(768) + 0.1
    for sparsity in (0.3, 0.5):
        cpu = scoring.select_fused(w, f, sparsity, tie_factor=tf)
        gpu = scoring.select_fused(w.cuda(), f, sparsity, tie_factor=tf)
        assert torch.equal(cpu, gpu.cpu())
        assert torch.equal(
            scoring.select_fused(w, f, sparsity, mode="layer"),
            scoring.select_fused(w.cuda(), f, sparsity, mode="layer").cpu(),
        )


def test_masks_are_packed_on_the_device(rng):
    """A build's mask on the GPU is packed there (1/8 of its bytes cross to the host): the
    same bytes as packing it on the CPU, odd widths included."""
    from maskstore.store.bits import pack

    for cols in (1, 45, 768, 4099):
        m = torch.from_numpy(rng.random((33, cols)) < 0.4)
        assert (pack(m.cuda()) == pack(m)).all(), cols


def test_cuda_statistics_match_cpu(tmp_path):
    """float64 statistics from CUDA activations: equal to the CPU's to 1e-5 of their scale (the
    float32 forward passes round differently there: cuBLAS and the attention kernels; 2e-7
    was seen on an H200), and the masks built from them identical."""
    cal = {"a": _batches(0, 0, 128), "b": _batches(1, 128, 256)}
    cfg = BuildConfig(method="contrastive-wanda", phi="softplus")
    build(tiny_llama(seed=2), cal, tmp_path / "cpu.zarr", pairs=[("a", "b")], config=cfg)
    gpu_model = tiny_llama(seed=2).cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    build(gpu_model, cal, tmp_path / "gpu.zarr", pairs=[("a", "b")], config=cfg)
    c, g = open_bundle(tmp_path / "cpu.zarr"), open_bundle(tmp_path / "gpu.zarr")
    for p in ("a", "b"):
        for m in c.modules:
            x, y = c.read_stats(p, m).to_array()[0], g.read_stats(p, m).to_array()[0]
            worst = float(np.abs(x - y).max() / np.abs(x).max())  # relative to the row's scale
            print(f"{p} {m}: largest difference {worst:.2e} of the largest statistic")
            assert worst < 1e-5, (p, m, worst)
            assert (c.read_mask(p, m) == g.read_mask(p, m)).all(), (p, m)


@pytest.mark.parametrize("batching", ["persona", "mixed"])
def test_the_serving_engine_on_cuda(tmp_path, batching):
    """The engine on a CUDA model: ``auto`` picks one persona a batch (mixed batches there make
    weight copies), and in both modes every request, those that join running batches
    included, gets the tokens it gets alone."""
    from _tiny import byte_tokenizer

    from maskstore.runtime import MaskHandle
    from maskstore.serve import Catalog, Engine

    model = tiny_llama(seed=3)
    build(model, {p: _batches(i, 32 * i, 32 * i + 64) for i, p in enumerate("abc")},
          tmp_path / "b.zarr")  # fmt: skip
    handle = MaskHandle(model.to("cuda"), Catalog([("b", open_bundle(tmp_path / "b.zarr"))]))
    tok = byte_tokenizer()
    auto = Engine(handle, tok)
    auto.close()
    assert not handle.fused_mixing and auto.batching == "persona"
    engine = Engine(handle, tok, batching=batching, window_s=0.1)

    first = [("a", "hello", 24), ("a" if batching == "persona" else "b", "hi there", 24)]
    later = [("a", "x y", 6), ("a", "more text", 4)]
    if batching == "mixed":
        later += [("c", "q", 5), (None, "zz", 5)]
    try:
        for p in "abc":
            engine.load(p)
        alone = [run_with_joiners(engine, tok, [job], [], 1, 120)[0] for job in first + later]
        assert run_with_joiners(engine, tok, first, later, 1, 120) == alone
        assert engine.metrics.get("maskstore_joined_rows_total") > 0
    finally:
        engine.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernels_on_cuda_at_real_sizes(dtype):
    """The Triton switch gives torch.mul's bits at a 7B MLP shape, and the masked segmented
    product matches a per-persona F.linear, rows independent of their batch-mates."""
    pytest.importorskip("triton")
    from maskstore.runtime.kernels import triton_ops

    g = torch.Generator(device="cuda").manual_seed(0)
    rows, cols = 11008, 4096
    base = torch.randn(rows, cols, device="cuda", generator=g).to(dtype)
    keep = [torch.rand(rows, cols, device="cuda", generator=g) < 0.8 for _ in range(3)]
    packed = [_pack(k) for k in keep]
    w = base.clone()
    for i, gamma in ((0, 0.0), (1, 0.0), (1, 0.25), (2, 0.25)):
        gm = float(torch.tensor(gamma).to(dtype).float())
        prev = None if i == 0 and gamma == 0.0 else packed[i - 1 if gamma == 0.0 else i]
        triton_ops.gate(w, base, prev, packed[i], gm, same_gamma=prev is None or gamma == 0.0)
        assert torch.equal(
            _bits(w), _bits(torch.mul(base, torch.where(keep[i], 1.0, gm).to(dtype)))
        )
    triton_ops.gate(w, base, packed[2], None, 0.0)
    assert torch.equal(_bits(w), _bits(base))
    stack = torch.stack(packed)
    x = torch.randn(40, cols, device="cuda", generator=g).to(dtype)
    start, slots = [0, 16, 17, 30, 40], [0, -1, 2, 1]
    y = triton_ops.sgmv(x, base, stack, 0.0, start, slots)
    for s, p in enumerate(slots):
        a, b = start[s], start[s + 1]
        wt = base if p < 0 else torch.mul(base, keep[p].to(dtype))
        want = torch.nn.functional.linear(x[a:b].float(), wt.float())
        tol = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
        assert torch.allclose(y[a:b].float(), want, atol=tol * want.abs().max().item(), rtol=0)
        alone = triton_ops.sgmv(x[a : a + 1], base, stack, 0.0, [0, 1], [p])
        assert torch.equal(alone[0], y[a])


def _pack(keep):
    rows, cols = keep.shape
    bits = torch.nn.functional.pad(keep, (0, (-cols) % 8)).view(rows, -1, 8).to(torch.uint8)
    weights = (1 << torch.arange(8, device=keep.device, dtype=torch.uint8)).view(1, 1, 8)
    return (bits * weights).sum(dim=2, dtype=torch.uint8)
