"""How fast inspection commands start: ``maskstore info/verify/overlap/diff/log`` against a bare
``python -c pass`` and against importing torch, measured in the same run.

The bundle has the quickstart bundle's shape: SmolLM2-135M-Instruct's 210 masked modules (106M
weights) and two personas at sparsity 0.2 (random masks: the shape, not the content, sets the
cost of starting). ``log`` runs on a repository holding one commit of it.

Run: python benchmarks/bench_startup.py
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _util import smollm2_fingerprint

from maskstore import create_bundle
from maskstore.repo import init_repo


def quickstart_like(path: Path) -> Path:
    rng = np.random.default_rng(0)
    fp = smollm2_fingerprint()
    with create_bundle(path, fp) as b:
        for name in ("introvert", "extrovert"):
            with b.persona_writer(name, method="contrastive-wanda", sparsity=0.2) as w:
                for m, (o, i) in fp["modules"].items():
                    w.write_mask(m, rng.random((o, i)) < 0.8)
    return path


# as users run it: bytecode cached (some sandboxes set PYTHONDONTWRITEBYTECODE)
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def wall(cmd: list[str], repeat: int = 9) -> tuple[float, float]:
    """(median, best) wall seconds of a fresh process running ``cmd`` (after a warm-up run).
    On a shared machine noise only adds time, so the best run is the steadier figure."""
    subprocess.run(cmd, check=True, capture_output=True, env=ENV)
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=ENV)
        out.append(time.perf_counter() - t)
    return statistics.median(out), min(out)


def main() -> None:
    exe = shutil.which("maskstore") or None
    ms = [exe] if exe else [sys.executable, "-m", "maskstore.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = quickstart_like(tmp / "personas.zarr")
        repo = init_repo(tmp / "repo")
        repo.commit(bundle, "quickstart")
        base, _ = wall([sys.executable, "-c", "pass"])
        torch_t, _ = wall([sys.executable, "-c", "import torch"], repeat=3)
        start, _ = wall([sys.executable, "-c", "import maskstore.cli.main"])
        print(
            f"python -c pass: {base * 1000:.0f} ms; python -c 'import torch': {torch_t * 1000:.0f} ms"
        )
        print(f"import maskstore.cli.main (every command pays this): {start * 1000:.0f} ms")
        print(f"{'command':<44} {'median ms':>9} {'best ms':>8} {'- python':>9} {'/ torch':>8}")
        cmds = {
            "maskstore info BUNDLE": ["info", str(bundle)],
            "maskstore info REPO@main": ["info", f"{tmp / 'repo'}@main"],
            "maskstore log --repo REPO": ["log", "--repo", str(tmp / "repo")],
            "maskstore verify BUNDLE (reads 212M bits)": ["verify", str(bundle)],
            "maskstore overlap BUNDLE (reads 212M bits)": ["overlap", str(bundle)],
            "maskstore diff BUNDLE A B (reads 212M bits)": [
                "diff",
                str(bundle),
                "introvert",
                "extrovert",
            ],
        }
        for label, args in cmds.items():
            t, best = wall([*ms, *args, "--json"])
            print(
                f"{label:<44} {t * 1000:>9.0f} {best * 1000:>8.0f} {(t - base) * 1000:>9.0f}"
                f" {t / torch_t:>7.2f}x"
            )


if __name__ == "__main__":
    main()
