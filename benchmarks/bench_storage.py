"""Bits per weight on disk: packed masks at several kept shares against the entropy bound, in a
bundle (zstd, so any zarr reader reads it) and committed to a repository (zstd, or Golomb-coded
where that is smaller).

Run: python benchmarks/bench_storage.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from _util import smollm2_fingerprint

from maskstore import create_bundle, open_bundle
from maskstore.repo import init_repo
from maskstore.store.codecs import entropy


def main() -> None:
    rng = np.random.default_rng(0)
    fp = smollm2_fingerprint(layers=3, architecture="Bench")  # SmolLM2-135M's shapes, 3 layers
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
                if level is None:  # the same masks committed to a repository
                    repo = init_repo(Path(tmp) / f"repo-{p}")
                    snap = repo.snapshot(repo.commit(open_bundle(path), "x"))
                    bits = 8 * snap.bundle.nbytes_on_disk("x", "masks") / numel
                    print(f"{p:>6.2f} {'repo':>9} {bits:>12.4f} {h:>7.4f} {bits / h:>7.3f}")


if __name__ == "__main__":
    main()
