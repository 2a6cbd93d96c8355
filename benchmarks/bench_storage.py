"""Bits per weight on disk: packed masks at several kept shares against the entropy bound.

Run: python benchmarks/bench_storage.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from maskstore import create_bundle, open_bundle
from maskstore.codecs import entropy


def main() -> None:
    rng = np.random.default_rng(0)
    # SmolLM2-135M-like shapes, 2 layers' worth repeated: 10.4M weights
    shapes = {
        "q_proj": (576, 576),
        "k_proj": (192, 576),
        "v_proj": (192, 576),
        "o_proj": (576, 576),
        "gate_proj": (1536, 576),
        "up_proj": (1536, 576),
        "down_proj": (576, 1536),
    }
    fp = {"architecture": "Bench", "modules": {}}
    for layer in range(3):
        for leaf, s in shapes.items():
            kind = "self_attn" if leaf[0] in "qkvo" else "mlp"
            fp["modules"][f"model.layers.{layer}.{kind}.{leaf}"] = list(s)
    numel = sum(o * i for o, i in fp["modules"].values())
    print(f"{numel:,} weights per persona (random Bernoulli masks; research code: 8 bits/weight)")
    print(f"{'kept':>6} {'codec':>9} {'bits/weight':>12} {'H(p)':>7} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for codec, level in (("zstd", None), ("zstd", 3)):
            for p in (0.1, 0.5, 0.9):
                path = Path(tmp) / f"b-{codec}-{level}-{p}"
                with create_bundle(path, fp) as b:
                    with b.persona_writer("x", method="t", codec=codec, level=level) as w:
                        for m, (o, i) in fp["modules"].items():
                            w.write_mask(m, rng.random((o, i)) < p)
                bits = 8 * open_bundle(path).nbytes_on_disk("x", "masks") / numel
                h = entropy(p)
                print(
                    f"{p:>6.2f} {codec + ('-' + str(level) if level else '-auto'):>9} {bits:>12.4f} {h:>7.4f} {bits / h:>7.3f}"
                )


if __name__ == "__main__":
    main()
