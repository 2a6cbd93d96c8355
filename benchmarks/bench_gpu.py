"""Personas at the paper's scale on a GPU: a random-init Llama of 7B shape (bfloat16), each
figure next to its floor measured in the same run.

| figure | floor (same run) |
| --- | --- |
| attach (weights hash) | one device-to-device copy of the masked weights (``copy``) |
| first use (masks from disk) | reading and decompressing the persona's chunks (``read``) |
| cached switch, delta switch, back to base | ``copy`` |
| decode tokens/s with a persona on | the base model's, same run |
| mixed product per step, S personas | ``F.linear`` of one persona (``bench_mixed`` shape) |

Run: python benchmarks/bench_gpu.py [--layers N] [--device cuda] [--json PATH]
(``--layers 4`` for a slice; ``--device cpu --hidden 256 --layers 1`` smoke-tests it anywhere
with MASKSTORE_BACKEND=torch). Writes its bundle under the system temp dir.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int = 5) -> float:
    out = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    from transformers import LlamaConfig, LlamaForCausalLM

    import maskstore
    from maskstore import create_bundle
    from maskstore.modules import maskable_modules, model_fingerprint
    from maskstore.runtime.kernels import get as kernel

    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=max(1, args.hidden // 128),
                      num_key_value_heads=max(1, args.hidden // 128))  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    mods = maskable_modules(model)
    numel = sum(m.weight.numel() for m in mods.values())
    wbytes = numel * 2
    fig: dict[str, float] = {"masked_weights": numel, "modules": len(mods)}
    print(f"{len(mods)} Linears, {numel / 1e9:.2f}B masked weights, {wbytes / 2**30:.1f} GiB")

    # personas: the top (1 - sparsity) |W| share of each row, with a per-persona jitter, on the
    # device; only packed bits cross to the host
    folder = Path(tempfile.mkdtemp(prefix="maskstore-bench-gpu-"))
    t = time.perf_counter()
    with create_bundle(folder / "b.zarr", model_fingerprint(model, mods, hash_weights=True)) as b:
        # "a2" is "a" with 5% of its bits flipped: a delta switch between them
        for seed, p in enumerate(("a", "b", "a2")):
            g = torch.Generator(device=device).manual_seed(seed)
            with b.persona_writer(p, method="bench") as w:
                for n, m in mods.items():
                    s = m.weight.detach().float().abs()
                    gs = torch.Generator(device=device).manual_seed(0 if p == "a2" else seed)
                    s.mul_(1 + 0.3 * torch.rand(s.shape, generator=gs, device=device))
                    k = int(s.shape[1] * args.sparsity)
                    keep = s > s.kthvalue(max(k, 1), dim=1, keepdim=True).values
                    if p == "a2":
                        keep ^= torch.rand(s.shape, generator=g, device=device) < 0.05
                    w.write_mask(n, _pack(keep).cpu().numpy(), packed=True)
    fig["write_bundle_s"] = time.perf_counter() - t
    path = folder / "b.zarr"

    src = [m.weight.detach() for m in mods.values()]
    dst = [torch.empty_like(x) for x in src]

    def copy_all() -> None:
        for d, s_ in zip(dst, src, strict=True):
            d.copy_(s_)

    fig["copy_s"] = timed(copy_all, device)
    dst.clear()

    t = time.perf_counter()
    h = maskstore.attach(model, path)
    fig["attach_s"] = time.perf_counter() - t
    bundle = maskstore.open(path)
    fig["read_s"] = timed(lambda: [bundle.read_packed("a", n) for n in mods], device, repeat=3)
    print(f"backend {h.backend}; copy {fig['copy_s'] * 1e3:.1f} ms, read {fig['read_s']:.2f} s")

    sync(device)
    t = time.perf_counter()
    h.use("a")  # first use: masks from disk, pristine copies made
    sync(device)
    fig["first_use_s"] = time.perf_counter() - t
    h.use("b")
    h.use("a")
    fig["cached_switch_s"] = timed(lambda: (h.use("b"), h.use("a")), device) / 2
    fig["back_to_base_s"] = (
        timed(lambda: (h.use(None), sync(device), h.use("a")), device) - (fig["cached_switch_s"])
    )
    h.use("a2")
    h.use("a")
    fig["delta_switch_s"] = timed(lambda: (h.use("a2"), h.use("a")), device) / 2
    for r in ("cached_switch_s", "delta_switch_s", "back_to_base_s", "first_use_s", "attach_s"):
        floor = fig["read_s"] if r == "first_use_s" else fig["copy_s"]
        print(f"{r[:-2]:>15}: {fig[r] * 1e3:9.1f} ms = {fig[r] / floor:6.2f}x its floor")

    ids = torch.randint(0, cfg.vocab_size, (1, 16), device=device)
    gen = dict(max_new_tokens=32, do_sample=False, min_new_tokens=32)
    with torch.no_grad():
        h.use(None)
        base_t = timed(lambda: model.generate(ids, **gen), device, repeat=3)
        h.use("a")
        persona_t = timed(lambda: model.generate(ids, **gen), device, repeat=3)
    fig["decode_ratio"] = base_t / persona_t
    print(f"decode with a persona: {fig['decode_ratio']:.3f}x the base model's tokens/s")

    # the masked segmented product against F.linear, one MLP up-projection's shape, decode rows
    name, mod = next((n, m) for n, m in mods.items() if "up_proj" in n)
    wt = mod.weight.detach()
    ops = kernel(h.backend if h.backend != "numba" else "torch")
    for personas in (1, 4, 16):
        stack = torch.stack([torch.from_numpy(_pack_np(wt, s)).to(device) for s in range(personas)])
        x = torch.randn(16, wt.shape[1], device=device, dtype=wt.dtype)
        per = 16 // personas
        start = [i * per for i in range(personas)] + [16]
        slots = list(range(personas))
        lin = timed(lambda x=x: torch.nn.functional.linear(x, wt), device, repeat=20)
        sg = timed(lambda x=x, st=stack, a=start, sl=slots: ops.sgmv(x, wt, st, 0.0, a, sl),
                   device, repeat=20)  # fmt: skip
        fig[f"sgmv_{personas}_ratio"] = sg / lin
        print(f"sgmv over {personas:2d} personas: {sg / lin:.2f}x F.linear "
              f"(target <= {1.3 * (1 + personas / 16) if personas > 1 else 1.5:.2f}x)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=1))


def _pack(keep: torch.Tensor) -> torch.Tensor:
    """Pack a bool (out, in) on its device, least significant bit first (the bundle's layout)."""
    rows, cols = keep.shape
    pad = (-cols) % 8
    if pad:
        keep = torch.nn.functional.pad(keep, (0, pad))
    bits = keep.view(rows, -1, 8).to(torch.uint8)
    weights = (1 << torch.arange(8, device=keep.device, dtype=torch.uint8)).view(1, 1, 8)
    return (bits * weights).sum(dim=2, dtype=torch.uint8)


def _pack_np(w: torch.Tensor, seed: int) -> np.ndarray:
    g = torch.Generator(device=w.device).manual_seed(seed)
    return _pack(torch.rand(w.shape, generator=g, device=w.device) < 0.8).cpu().numpy()


if __name__ == "__main__":
    main()
