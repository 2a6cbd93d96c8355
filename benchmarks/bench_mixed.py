"""Mixed-persona batches on the embedded SmolLM2-135M.

1. One batch of 4 rows, each with its own persona, against the same 4 rows generated one
   persona at a time (switching between them).
2. The fused kernel alone: one decode step's masked Linears (the model's own weights, 16 rows
   spread over 1, 4 and 16 random personas) against the same products by torch on the base
   weight (one persona's BLAS, the floor) and through gated weight copies, one per persona (what
   mixed batches did before the kernel), float32 and bfloat16.

Run: python benchmarks/bench_mixed.py   (builds the two-persona bundle of bench_switch if needed)
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_switch import BUNDLE, ensure_bundle

import maskstore
from maskstore.compare import algebra
from maskstore.models import load_model

NEW = 32


def main() -> None:
    ensure_bundle()
    tmp = Path(tempfile.mkdtemp(prefix="maskstore-mixed-"))
    try:
        path = tmp / "b.zarr"
        shutil.copytree(BUNDLE, path)
        b = maskstore.open(path, writable=True)
        algebra.apply_op(b, "union", ["introvert", "extrovert"], "either")
        algebra.apply_op(b, "intersect", ["introvert", "extrovert"], "both")
        personas = ["introvert", "extrovert", "either", "both"]
        model, tok = load_model(None)
        h = maskstore.attach(model, path)
        enc = tok(["Tell me about your weekend plans."] * 4, return_tensors="pt")
        kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                  pad_token_id=tok.pad_token_id)  # fmt: skip

        def mixed() -> torch.Tensor:
            with torch.inference_mode(), h.mixed(personas):
                return model.generate(**enc, **kw)

        def sequential() -> list[torch.Tensor]:
            outs = []
            with torch.inference_mode():
                for i, p in enumerate(personas):
                    h.use(p)
                    outs.append(model.generate(**{k: v[i : i + 1] for k, v in enc.items()}, **kw))
            h.use(None)
            return outs

        mixed(), sequential()  # warm up
        times = {"mixed": [], "sequential": []}
        for _ in range(3):
            for name, fn in (("mixed", mixed), ("sequential", sequential)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        same = all(torch.equal(m, s[0]) for m, s in zip(mixed(), sequential(), strict=True))
        rate = {k: 4 * NEW / sorted(v)[1] for k, v in times.items()}
        print(
            f"4 personas x {NEW} new tokens: one mixed batch {rate['mixed']:.1f} tok/s, one "
            f"persona at a time {rate['sequential']:.1f} tok/s -> {rate['mixed'] / rate['sequential']:.2f}x; "
            f"same tokens: {same}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kernel()


def kernel(rows: int = 16) -> None:
    import numpy as np

    from maskstore.modules import maskable_modules
    from maskstore.runtime import _mixed

    model, _ = load_model(None)
    weights = [m.weight.detach() for m in maskable_modules(model).values()]
    rng = np.random.default_rng(0)
    _mixed.warm()
    for dtype in (torch.float32, torch.bfloat16):
        for personas in (1, 4, 16):
            t = {"blas": 0.0, "copies": 0.0, "fused": 0.0}
            for w in weights:
                for name, s in _one_module(w.to(dtype), rows, personas, rng).items():
                    t[name] += s
            print(f"{str(dtype).split('.')[-1]}, {rows} rows over {personas} persona(s), one step "
                  f"of the {len(weights)} masked Linears: fused {t['fused'] * 1e3:.1f} ms = "
                  f"{t['fused'] / t['blas']:.2f}x one weight's BLAS ({t['blas'] * 1e3:.1f} ms); "
                  f"gated copies {t['copies'] / t['blas']:.2f}x")  # fmt: skip


def _one_module(w: torch.Tensor, rows: int, personas: int, rng, reps: int = 5) -> dict:
    """Seconds per product of 16 rows with ``w``: BLAS on the base weight, gated copies per
    persona, the fused kernel."""
    import numpy as np

    from maskstore.runtime import _mixed

    of = np.arange(rows) % personas
    order = np.argsort(of, kind="stable").astype(np.int64)
    start = np.searchsorted(of[order], np.arange(personas + 1)).astype(np.int64)
    sel = np.arange(personas, dtype=np.int64)
    idx = [torch.from_numpy(np.nonzero(of == p)[0]) for p in range(personas)]
    x = torch.randn(rows, w.shape[1])
    xd = x.to(w.dtype)
    packed = [np.packbits(rng.random(w.shape) >= 0.2, axis=1, bitorder="little")
              for _ in range(personas)]  # fmt: skip
    masks = _mixed.mask_list(packed)
    copies = [w * torch.from_numpy(np.unpackbits(b, axis=1, bitorder="little")).to(w.dtype)
              for b in packed]  # fmt: skip
    raw = w.numpy() if w.dtype == torch.float32 else w.view(torch.uint16).numpy()

    def per_copy() -> torch.Tensor:
        out = xd.new_empty((rows, w.shape[0]))
        for p in range(personas):
            out[idx[p]] = torch.nn.functional.linear(xd[idx[p]], copies[p])
        return out

    fns = {"blas": lambda: torch.nn.functional.linear(xd, w), "copies": per_copy,
           "fused": lambda: _mixed.linear(x.numpy(), raw, masks, 0.0, sel, order, start)}  # fmt: skip
    out = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out[name] = (time.perf_counter() - t0) / reps
    return out


if __name__ == "__main__":
    main()
