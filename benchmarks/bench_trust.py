"""What verification costs on whole reads: the array digest (xxh3) every whole read now checks,
and the blake2b that every read of a stored version checks, against the read itself.

A bundle of the quickstart bundle's shape (SmolLM2-135M's 210 masked modules, 106M weights, two
personas at sparsity 0.2, random masks) is read module by module, as the runtime and checkout do;
the extra hash is timed alone over the same bytes already in memory, in the same run.

Run: python benchmarks/bench_trust.py
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import xxhash
from _util import timeit
from bench_startup import quickstart_like

from maskstore import open_bundle
from maskstore.repo import init_repo


def read_all(b) -> list:
    return [b.read_packed(p, m) for p in b.personas for m in b.modules]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = quickstart_like(Path(tmp) / "personas.zarr")
        b = open_bundle(path)
        arrays = read_all(b)
        nbytes = sum(a.nbytes for a in arrays)
        t_read = timeit(lambda: read_all(open_bundle(path)), repeat=5)
        t_xxh = timeit(lambda: [xxhash.xxh3_128(a.data).digest() for a in arrays], repeat=5)
        repo = init_repo(Path(tmp) / "repo")
        repo.commit(b, "one")
        t_snap = timeit(lambda: read_all(init_repo(Path(tmp) / "repo").snapshot("main").bundle), 5)
        t_b2 = timeit(
            lambda: [hashlib.blake2b(a.data, digest_size=32).digest() for a in arrays], repeat=5
        )
    mib = nbytes / 2**20
    print(f"{len(arrays)} packed masks, {mib:.1f} MiB (two personas of 106M weights)")
    print(f"read every mask from the bundle (chunk xxh3 + array xxh3): {t_read * 1000:.0f} ms")
    print(
        f"  the array digest alone (xxh3-128 over the same bytes in memory): {t_xxh * 1000:.1f} ms"
        f" = {t_xxh / t_read:.1%} of the read ({mib / t_xxh / 1024:.1f} GiB/s)"
    )
    print(f"read every mask from a stored version (also blake2b per chunk): {t_snap * 1000:.0f} ms")
    print(
        f"  blake2b-256 alone over the same bytes: {t_b2 * 1000:.1f} ms = {t_b2 / t_snap:.1%} of"
        f" that read ({mib / t_b2 / 1024:.2f} GiB/s)"
    )


if __name__ == "__main__":
    main()
