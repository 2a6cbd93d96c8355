"""All-pairs overlap of 4 personas over 2e8 weights: maskstore vs the research code's way vs a bare
np.bitwise_count over the same packed bytes already in memory. Also peak memory at 1x and 2x size.

Run: python benchmarks/bench_overlap.py [--weights 2e8]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from _util import child_peak_rss, timeit

from maskstore import create_bundle, open_bundle
from maskstore.compare import algebra

NAMES = ["p0", "p1", "p2", "p3"]


def fingerprint(total: float, width: int = 2048) -> dict:
    per = width * width
    n = int(np.ceil(total / per))
    leaves = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
    return {
        "architecture": "Bench",
        "modules": {f"model.layers.{i // 4}.{leaves[i % 4]}": [width, width] for i in range(n)},
    }


def make(tmp: Path, fp: dict, pt: bool) -> Path:
    """A bundle of 4 related personas (and, with ``pt``, the research layout of .pt bool files)."""
    rng = np.random.default_rng(0)
    path = tmp / "bundle"
    with create_bundle(path, fp) as b:
        writers = [b.persona_writer(n, method="bench") for n in NAMES]
        for m, (o, i) in fp["modules"].items():
            base = rng.random((o, i)) < 0.5
            for n, w in zip(NAMES, writers, strict=True):
                flip = rng.random((o, i)) < 0.1
                mask = base ^ flip
                w.write_mask(m, mask)
                if pt:
                    torch.save(torch.from_numpy(mask), tmp / f"M_{n}_{m}.pt")
        for w in writers:
            w.commit()
    return path


def research_way(tmp: Path, fp: dict) -> np.ndarray:
    """torch.load one bool tensor per module per persona, then logical ops and sums."""
    inter = np.zeros((4, 4), dtype=np.int64)
    for m in fp["modules"]:
        ts = [torch.load(tmp / f"M_{n}_{m}.pt", weights_only=True) for n in NAMES]
        for i in range(4):
            for j in range(i, 4):
                inter[i, j] += int(torch.logical_and(ts[i], ts[j]).sum())
    return inter


def bare_popcount(packed: list[list[np.ndarray]]) -> np.ndarray:
    """The floor: pairwise AND + np.bitwise_count over packed words already in memory."""
    inter = np.zeros((4, 4), dtype=np.int64)
    for mods in packed:
        for i in range(4):
            for j in range(i, 4):
                inter[i, j] += int(
                    np.bitwise_count(np.bitwise_and(mods[i], mods[j])).sum(dtype=np.uint64)
                )
    return inter


def maskstore_way(path: Path) -> np.ndarray:
    b = open_bundle(path)
    counts = algebra.count_all([algebra.Ref(b, n) for n in NAMES])
    return sum(c.inter for c in counts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=float, default=2e8)
    args = ap.parse_args()
    fp = fingerprint(args.weights)
    numel = sum(o * i for o, i in fp["modules"].values())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = make(tmp, fp, pt=True)
        b = open_bundle(path)
        packed = [
            [b.read_packed(n, m).reshape(-1).view(np.uint64) for n in NAMES] for m in fp["modules"]
        ]
        ours = maskstore_way(path)
        assert np.array_equal(np.triu(ours), research_way(tmp, fp)), (
            "maskstore disagrees with torch"
        )
        assert np.array_equal(np.triu(ours), bare_popcount(packed))
        t_ms = timeit(lambda: maskstore_way(path))
        t_pt = timeit(lambda: research_way(tmp, fp), repeat=1)
        t_bare = timeit(lambda: bare_popcount(packed))
        pt_bytes = sum(f.stat().st_size for f in tmp.glob("M_*.pt"))
        ms_bytes = b.nbytes_on_disk(kind="masks")
    print(f"all pairs of 4 personas, {numel:,} weights each ({numel * 4:,} mask bits read)")
    print(f"{'way':<36} {'seconds':>8} {'weights/s':>12} {'vs research':>12}")
    for name, t in (
        ("research code (torch.load + logical ops)", t_pt),
        ("maskstore overlap (disk, streaming)", t_ms),
        ("bare np.bitwise_count (in memory)", t_bare),
    ):
        print(f"{name:<36} {t:>8.3f} {numel / t:>12.3e} {t_pt / t:>11.1f}x")
    print(f"maskstore speed / bare popcount speed: {t_bare / t_ms:.2f}")
    print(f"on disk: research .pt {pt_bytes / 2**20:.0f} MiB, maskstore {ms_bytes / 2**20:.0f} MiB")

    # peak memory of a streaming overlap at 1x and 2x the model size (fresh processes)
    rss0, _ = child_peak_rss("import maskstore.compare.algebra")
    print(f"peak RSS of a process that only imports maskstore: {rss0:.0f} MiB")
    for scale in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            fps = fingerprint(args.weights * scale / 2)
            p = make(Path(tmp), fps, pt=False)
            rss, _ = child_peak_rss(
                "import sys; sys.path.insert(0, 'benchmarks')\n"
                "from bench_overlap import maskstore_way\n"
                f"maskstore_way(__import__('pathlib').Path({str(p)!r}))"
            )
            n = sum(o * i for o, i in fps["modules"].values())
            print(f"peak RSS of overlap over {n:,} weights x 4 personas: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
