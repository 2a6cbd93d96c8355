"""Persona switching on the embedded SmolLM2-135M-Instruct (210 Linear layers, 106M weights):
cold and cached switches against reloading the model from disk (the research code's way),
decoding speed with a persona on, and memory overhead.

Run: python benchmarks/bench_switch.py   (builds a two-persona bundle first if needed)
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from _util import cli_build, timeit

import maskstore
from maskstore.models import embedded_model_dir, load_model

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "out" / "bench-switch.zarr"


def ensure_bundle() -> None:
    if BUNDLE.exists():
        return
    data = ROOT / "examples" / "data"
    cli_build(
        "--persona", f"introvert={data / 'introvert.txt'}", "--persona", f"extrovert={data / 'extrovert.txt'}",
        "--pair", "introvert:extrovert", "--method", "contrastive-wanda", "--phi", "softplus",
        "--sparsity", "0.2", "--out", str(BUNDLE),
    )  # fmt: skip


def main() -> None:
    ensure_bundle()
    model, tok = load_model(None)
    numel = sum(m.weight.numel() for m in maskstore.maskable_modules(model).values())
    h = maskstore.attach(model, BUNDLE)
    t = time.perf_counter()
    h.use("introvert")
    cold_first = time.perf_counter() - t  # includes making the pristine copies
    t = time.perf_counter()
    h.use("extrovert")
    cold_second = time.perf_counter() - t  # masks read from disk, pristine copies exist
    warm = []
    for p in ["introvert", "extrovert"] * 5:
        t = time.perf_counter()
        h.use(p)
        warm.append(time.perf_counter() - t)
    cached = statistics.median(warm)
    t_base = timeit(lambda: h.use(None))

    # The research code's switch: reload the model, then load one pickled bool tensor per module
    # (8 bits a weight) and apply it.
    folder = embedded_model_dir()
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        b = maskstore.open(BUNDLE)
        for m in b.persona_modules("extrovert"):
            torch.save(
                b.read_mask("extrovert", m, as_torch=True), Path(tmp) / f"M_extrovert_{m}.pt"
            )

        def research_switch() -> None:
            fresh = AutoModelForCausalLM.from_pretrained(folder)
            named = dict(fresh.named_modules())
            with torch.no_grad():
                for m in b.persona_modules("extrovert"):
                    mask = torch.load(Path(tmp) / f"M_extrovert_{m}.pt", weights_only=True)
                    named[m].weight.mul_(mask)

        reload = timeit(research_switch, repeat=3)

    enc = tok("Tell me about your weekend plans.", return_tensors="pt")

    def decode() -> None:
        with torch.inference_mode():
            model.generate(
                **enc,
                max_new_tokens=48,
                min_new_tokens=48,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )

    h.use(None)
    decode()
    rates = {}
    for label, persona in (
        ("base", None),
        ("introvert", "introvert"),
        ("base again", None),
        ("introvert again", "introvert"),
    ):
        h.use(persona)
        rates[label] = 48 / timeit(decode, repeat=3)
    base_rate = (rates["base"] + rates["base again"]) / 2
    mask_rate = (rates["introvert"] + rates["introvert again"]) / 2

    print(f"switch of all 210 masked modules ({numel:,} weights):")
    print(f"  first use (reads masks, makes pristine copies): {cold_first * 1000:.0f} ms")
    print(f"  second persona, cold (masks read from disk):   {cold_second * 1000:.0f} ms")
    print(f"  cached switch (median of 10):                  {cached * 1000:.0f} ms")
    print(f"  back to base model:                            {t_base * 1000:.0f} ms")
    print(
        f"  research way (reload model + 210 .pt masks):   {reload * 1000:.0f} ms "
        f"-> cached switch is {reload / cached:.1f}x faster"
    )
    print(
        f"decoding 48 tokens: base {base_rate:.1f} tok/s, persona on {mask_rate:.1f} tok/s "
        f"({100 * (mask_rate / base_rate - 1):+.1f}%)"
    )
    info = h.cache_info()
    pristine = h.memory_overhead() - info.bytes
    print(
        f"memory overhead: pristine copies {pristine / 2**20:.0f} MiB + packed cache {info.bytes / 2**20:.1f} MiB "
        f"({info.entries} entries) = {h.memory_overhead() / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
