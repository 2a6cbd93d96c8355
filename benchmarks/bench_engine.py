"""The serving engine without HTTP, on any device: 16 concurrent requests spread over 1, 4 and
16 personas, tokens/s for both batching modes, ratios against 1 persona with one persona a
batch, all measured in this one run.

The model is the embedded SmolLM2-135M's shape and tokenizer, from ``--model-dir`` (its
``config.json`` and tokenizer files; the weights there are not needed) with random-init
weights, so that it runs where the embedded model cannot be converted (a GPU machine with no
network). Personas are random masks at sparsity 0.2.

Run: python benchmarks/bench_engine.py [--device cuda] [--model-dir DIR] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REQUESTS = 16
TOKENS = 16
PROMPT = "Tell me about your plans for the weekend."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--model-dir", default=None, help="config.json + tokenizer (default: embedded)")
    args = ap.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from maskstore import create_bundle
    from maskstore.modules import maskable_modules, model_fingerprint
    from maskstore.runtime import MaskHandle
    from maskstore.serve import Catalog, Engine, Request
    from maskstore.store.opener import open_bundle

    if args.model_dir is None:
        from maskstore.models import embedded_model_dir

        args.model_dir = str(embedded_model_dir())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = model.to(args.device, getattr(torch, args.dtype))
    mods = maskable_modules(model)
    tmp = Path(tempfile.mkdtemp(prefix="maskstore-bench-engine-"))
    try:
        rng = np.random.default_rng(0)
        with create_bundle(tmp / "b.zarr", model_fingerprint(model, mods)) as b:
            for i in range(16):
                with b.persona_writer(f"p{i}", method="random") as w:
                    for n, m in mods.items():
                        w.write_mask(n, rng.random((m.out_features, m.in_features)) >= 0.2)
        handle = MaskHandle(model, Catalog([("b", open_bundle(tmp / "b.zarr"))]),
                            check_weights=False)  # fmt: skip
        ids = tok(PROMPT)["input_ids"]
        rates = {}
        for mode in ("persona", "mixed"):
            engine = Engine(handle, tok, batching=mode)
            try:
                for k in (1, 4, 16):
                    for p in range(k):
                        engine.load(f"p{p}")
                    _burst(engine, Request, ids, [f"p{i % k}" for i in range(REQUESTS)])  # warm
                    rates[mode, k] = _burst(engine, Request, ids,
                                            [f"p{i % k}" for i in range(REQUESTS)])  # fmt: skip
            finally:
                engine.close()
        one = rates["persona", 1]
        print(f"engine on {args.device} ({torch.cuda.get_device_name(0) if args.device == 'cuda' else 'CPU'}), "
              f"{args.dtype}, SmolLM2-135M shape, random weights; {REQUESTS} requests x {TOKENS} "
              f"tokens (ratios against 1 persona, one persona a batch; fused mixed kernel: "
              f"{handle.fused_mixing})")  # fmt: skip
        print("| requests over | one persona a batch | mixed batches |")
        print("| --- | --- | --- |")
        for k in (1, 4, 16):
            cells = [
                f"{rates[m, k]:.0f} tok/s ({rates[m, k] / one:.2f}x)" for m in ("persona", "mixed")
            ]
            print(f"| {k} persona{'s' if k > 1 else ''} | {cells[0]} | {cells[1]} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _burst(engine, request_type, ids: list[int], personas: list[str]) -> float:
    """Submit one request per persona at once; tokens/s until the last one ends."""
    done = threading.Event()
    left = [len(personas)]
    made = [0]
    lock = threading.Lock()

    errors: list[str] = []

    def sink(ev) -> None:  # on the engine's thread: record, never raise
        if ev.kind == "error":
            errors.append(ev.text)
            done.set()
        if ev.kind == "done":
            with lock:
                made[0] += ev.completion_tokens
                left[0] -= 1
                if not left[0]:
                    done.set()

    t = time.perf_counter()
    for p in personas:
        # min_tokens is not a field: a random model rarely emits EOS within 16 tokens
        engine.submit(request_type(p, list(ids), TOKENS, sink, temperature=0.0))
    if not done.wait(600) or errors:
        raise SystemExit(f"the burst failed: {errors[0] if errors else 'over 10 minutes'}")
    return made[0] / (time.perf_counter() - t)


if __name__ == "__main__":
    main()
