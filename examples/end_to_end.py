"""From calibration files to a bundle of opposing personas, with the Python API.

Builds introvert/extrovert masks on the embedded SmolLM2-135M-Instruct (or --model PATH), prints
their overlap and differential ratios, and switches the live model between them.

Run: python examples/end_to_end.py [--model PATH] [--out out/api.zarr]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import maskstore
from maskstore.build import BuildConfig, build
from maskstore.build import calibration as cal
from maskstore.compare import algebra
from maskstore.models import load_model

DATA = Path(__file__).resolve().parent / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="local HF model folder (default: embedded)")
    ap.add_argument("--out", default="out/api.zarr")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    calibration = {
        name: cal.batches(tok, cal.read_samples(DATA / f"{name}.txt"), max_tokens=128)
        for name in ("introvert", "extrovert")
    }
    config = BuildConfig(method="contrastive-wanda", sparsity=0.2, phi="softplus")
    path = build(
        model, calibration, args.out, pairs=[("introvert", "extrovert")], config=config, force=True
    )

    bundle = maskstore.open(path)
    refs = [algebra.Ref(bundle, p) for p in ("introvert", "extrovert")]
    counts = algebra.count_all(refs)
    rec = algebra.pairs_report(refs, counts, by="kind")[0]
    print(f"bundle {path}  digest {bundle.digest}")
    print(
        f"introvert vs extrovert: jaccard {rec['jaccard']:.4f}, differential ratio {rec['diff_ratio']:.4f} "
        f"(attention {rec['groups']['attn']['diff_ratio']:.4f}, MLP {rec['groups']['mlp']['diff_ratio']:.4f})"
    )

    handle = maskstore.attach(model, bundle)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "How do you like to spend your weekend?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    for persona in (None, "introvert", "extrovert"):
        handle.use(persona)
        with torch.inference_mode():
            out = model.generate(
                **enc, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id
            )
        text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        print(f"[{persona or 'base'}] {text}")
    handle.detach()


if __name__ == "__main__":
    main()
