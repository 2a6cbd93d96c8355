"""Storage of a family of related personas in a repository with xor deltas, on the embedded
SmolLM2-135M-Instruct: bits per weight per persona against the research code's 8 bits, plain bit
packing (1 bit), the zstd bundle, and the entropy bound (base mask size + H of each xor delta).

Run: python benchmarks/bench_versions.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from _util import cli_build

from maskstore.repo import init_repo
from maskstore.store.bits import popcount
from maskstore.store.codecs import entropy
from maskstore.store.opener import open_bundle

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = tmp / "family.zarr"
        # four related personas: the same method and sparsity on four calibration sets
        cli_build(
            "--persona", f"introvert={DATA / 'introvert.txt'}", "--persona", f"extrovert={DATA / 'extrovert.txt'}",
            "--persona", f"q_intro:q_extro={DATA / 'introvert_extrovert.csv'}",
            "--method", "wanda", "--sparsity", "0.5", "--out", str(bundle),
        )  # fmt: skip
        b = open_bundle(bundle)
        repo = init_repo(tmp / "repo")
        snap = repo.snapshot(repo.commit(b, "family"))
        numel = sum(m.numel for m in b.modules.values())
        print(
            f"{len(b.personas)} related personas (wanda, sparsity 0.5, different calibration sets), "
            f"{numel:,} weights each"
        )
        print(
            f"{'persona':<10} {'stored as':<28} {'research':>9} {'packed':>7} {'bundle':>7} {'repo':>7} {'bound':>7}"
        )
        total_repo = total_bound = 0.0
        for p in b.personas:
            arrays = snap.manifest["personas"][p]["arrays"]
            repo_bytes = snap.bundle.nbytes_on_disk(p, "masks")
            bundle_bytes = b.nbytes_on_disk(p, "masks")
            bound_bits, bases = 0.0, set()
            for m in b.persona_modules(p):
                e = arrays[f"masks/{m}"]
                mine = b.read_packed(p, m)
                if "delta" in e:
                    bases.add(e["delta"]["persona"])
                    x = popcount(np.bitwise_xor(mine, b.read_packed(e["delta"]["persona"], m)))
                    bound_bits += entropy(x / b.modules[m].numel) * b.modules[m].numel
                else:
                    bound_bits += 8 * sum(
                        repo.object_size(h) for h, _ in e["chunks"]
                    )  # base: its size
            how = f"xor vs {', '.join(sorted(bases))}" if bases else "base mask"
            total_repo += repo_bytes * 8
            total_bound += bound_bits
            print(
                f"{p:<10} {how:<28} {8.0:>9.3f} {1.0:>7.3f} {8 * bundle_bytes / numel:>7.3f} "
                f"{8 * repo_bytes / numel:>7.3f} {bound_bits / numel:>7.3f}"
            )
        print(
            f"total: repo {total_repo / 8 / 2**20:.2f} MiB, bound {total_bound / 8 / 2**20:.2f} MiB, "
            f"ratio {total_repo / total_bound:.3f} (columns are bits per weight)"
        )

        # the same family as recipes: statistics, method and digests, no mask bits
        rrepo = init_repo(tmp / "recipes")
        vid = rrepo.commit(b, "recipes", recipes=tuple(b.personas))
        rsnap = rrepo.snapshot(vid)
        for p in b.personas:
            arrays = rsnap.manifest["personas"][p]["arrays"].values()
            hashes = {h for e in arrays for h, _ in e.get("chunks", [])}
            size = sum(rrepo.object_size(h) for h in hashes)
            print(
                f"recipe {p:<10} {size / 2**10:>6.0f} KiB of statistics (unique objects), no mask "
                f"bits; its mask as stored above: {snap.bundle.nbytes_on_disk(p, 'masks') / 2**10:.0f} KiB"
            )
        man = len(rrepo.store.get(f"versions/{vid}"))
        print(f"recipe manifest: {man / 2**10:.0f} KiB for all {len(b.personas)} personas")


if __name__ == "__main__":
    main()
