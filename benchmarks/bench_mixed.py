"""Mixed-persona batches on the embedded SmolLM2-135M: one batch of 4 rows, each with its own
persona, against the same 4 rows generated one persona at a time (switching between them).

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


if __name__ == "__main__":
    main()
