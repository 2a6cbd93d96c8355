"""A model that does not fit comfortably: a random-init Llama in TinyLlama-1.1B's shape, bfloat16.

Builds it as safetensors in a temp folder (22 layers, hidden 2048, MLP 5632, 32 heads / 4 KV
heads; the embedded SmolLM2 tokenizer, so a 49152-token vocabulary: 1.13B parameters), then
reports, each as a ratio measured in this one run:

- peak RSS of ``maskstore build --offload`` against the whole-model build (each in a fresh
  process, VmHWM), and both builds' times, plus a 2-rank torchrun build's time;
- the runtime's memory overhead against a full copy of the masked weights;
- a full switch (base <-> persona) and a delta switch (one persona at sparsity 0.2 vs 0.25);
- decoding tokens/s with a persona on against the base model.

Run: python benchmarks/bench_scale.py   (about 10 minutes on 2 CPU cores; 5 GB of temp disk)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _util import child_peak_rss

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def make_model(folder: Path) -> int:
    """Save the random-init model and the embedded tokenizer; return the weights' bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from maskstore.models import embedded_model_dir, load_tokenizer

    tok = load_tokenizer(embedded_model_dir())
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return n


BUILD = """
import json, sys, time
sys.argv = ["maskstore", "build", *{args!r}]
from maskstore.cli.main import main
t = time.perf_counter()
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps({{"seconds": time.perf_counter() - t}}))
"""


DEVICE = "cpu"


def build_args(folder: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(folder), "--dtype", "bfloat16", "--out", str(out), "--force",
        "--device", DEVICE,
        "--persona", f"introvert={DATA / 'introvert.txt'}",
        "--persona", f"extrovert={DATA / 'extrovert.txt'}",
        "--pair", "introvert:extrovert", "--method", "contrastive-wanda", "--phi", "softplus",
        "--sparsity", "0.2", "--samples", "8", "--max-tokens", "64", *extra,
    ]  # fmt: skip


def main() -> None:
    import argparse

    global DEVICE
    ap = argparse.ArgumentParser(description="maskstore at 1.1B parameters")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (builds and runtime)")
    DEVICE = ap.parse_args().device
    tmp = Path(tempfile.mkdtemp(prefix="maskstore-scale-"))
    try:
        folder = tmp / "model"
        t = time.perf_counter()
        weight_bytes = make_model(folder)
        print(f"model: {weight_bytes / 2**30:.2f} GiB of bfloat16 weights, written in "
              f"{time.perf_counter() - t:.0f} s")  # fmt: skip
        env_code = "import os; os.environ['HF_HUB_OFFLINE'] = '1'\n"
        whole_rss, whole = child_peak_rss(
            env_code + BUILD.format(args=build_args(folder, tmp / "w.zarr"))
        )
        off_rss, off = child_peak_rss(
            env_code + BUILD.format(args=build_args(folder, tmp / "o.zarr", "--offload"))
        )
        from maskstore.store.opener import open_bundle

        same = open_bundle(tmp / "w.zarr").digest == open_bundle(tmp / "o.zarr").digest
        print(f"build, whole model: peak RSS {whole_rss:.0f} MiB, {whole['seconds']:.0f} s")
        print(f"build, --offload:   peak RSS {off_rss:.0f} MiB, {off['seconds']:.0f} s -> "
              f"{off_rss / whole_rss:.2f}x the RSS (target <= 0.35x); same digest: {same}")  # fmt: skip
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        t = time.perf_counter()
        subprocess.run(
            [torchrun, "--standalone", "--nproc-per-node=2", "-m", "maskstore.cli", "build",
             *build_args(folder, tmp / "r2.zarr", "--offload")],
            check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
        )  # fmt: skip
        ranks = time.perf_counter() - t
        same2 = open_bundle(tmp / "r2.zarr").digest == open_bundle(tmp / "w.zarr").digest
        print(f"build, 2 ranks (torchrun, offload, 1 thread each): {ranks:.0f} s "
              f"({ranks / off['seconds']:.2f}x the 1-process offload build on these 2 cores); "
              f"same digest: {same2}")  # fmt: skip
        runtime(folder, tmp / "w.zarr", weight_bytes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def runtime(folder: Path, bundle: Path, weight_bytes: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import maskstore
    from maskstore.models import load_model

    model, tok = load_model(folder, dtype="bfloat16", device=DEVICE)
    h = maskstore.attach(model, bundle)
    h.use("introvert"), h.use("extrovert")
    masked = sum(m.weight.numel() * m.weight.element_size() for m in h.modules.values())
    info = h.cache_info()
    print(f"runtime overhead: {h.memory_overhead() / 2**20:.0f} MiB ({info.bytes / 2**20:.0f} "
          f"MiB packed masks) against {masked / 2**20:.0f} MiB of masked weights: "
          f"{h.memory_overhead() / masked:.2f}x")  # fmt: skip
    times = []
    for p in ["introvert", "extrovert"] * 3:
        t = time.perf_counter()
        h.use(p)
        times.append(time.perf_counter() - t)
    print(f"switch introvert <-> extrovert: {statistics.median(times) * 1000:.0f} ms")
    full = []
    for _ in range(3):
        t = time.perf_counter()
        h.use(None)
        h.use("extrovert")
        full.append((time.perf_counter() - t) / 2)
    h.detach()
    from bench_switch import _switch_pair, related_bundle_for

    related = related_bundle_for(model, bundle, "introvert")
    r = maskstore.attach(model, related)
    r.use("s20"), r.use("s25")
    delta = _switch_pair(r, "s20", "s25", repeat=6)
    r.use(None)
    print(f"full switch (base <-> persona): {statistics.median(full) * 1000:.0f} ms; delta "
          f"switch (sparsity 0.2 <-> 0.25): {delta * 1000:.0f} ms -> "
          f"{delta / statistics.median(full):.2f}x")  # fmt: skip
    enc = tok("Tell me about your weekend plans.", return_tensors="pt").to(DEVICE)

    def rate() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                           pad_token_id=tok.pad_token_id)  # fmt: skip
        return 16 / (time.perf_counter() - t)

    r.use(None)
    rate()
    base = statistics.median([rate() for _ in range(2)])
    r.use("s20")
    persona = statistics.median([rate() for _ in range(2)])
    r.use(None)
    print(f"decoding: base {base:.2f} tok/s, persona on {persona:.2f} tok/s "
          f"({persona / base:.2f}x)")  # fmt: skip
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
