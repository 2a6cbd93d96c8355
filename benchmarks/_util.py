"""Shared helpers: timing (median of repeats) and peak memory of a child process."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable


def timeit(fn: Callable[[], object], repeat: int = 3) -> float:
    """Median wall seconds of ``repeat`` calls."""
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def child_peak_rss(code: str) -> tuple[float, dict]:
    """Run ``code`` in a fresh interpreter; return (peak RSS in MiB, the JSON it printed last)."""
    wrapped = (
        code
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent
        + "\nimport json as _j\n_h = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
        "print(_j.dumps({'rss': int(_h)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapped], check=True, capture_output=True, text=True
    ).stdout
    lines = [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")]
    return lines[-1]["rss"] / 1024, (lines[-2] if len(lines) > 1 else {})


def cli_build(*args: str) -> None:
    """Run ``maskstore build ARGS`` in a fresh interpreter (quietly; raises on failure)."""
    subprocess.run(
        [sys.executable, "-m", "maskstore.cli", "build", *args], check=True, capture_output=True
    )


def self_peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# SmolLM2-135M-Instruct's masked Linears in one decoder layer: (out_features, in_features)
SMOLLM2_LAYER = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}


def smollm2_fingerprint(layers: int = 30, architecture: str = "LlamaForCausalLM") -> dict:
    """A model fingerprint with SmolLM2-135M's shapes (30 layers: 210 modules, 106M weights)."""
    modules = {
        f"model.layers.{i}.{leaf}": list(shape)
        for i in range(layers)
        for leaf, shape in SMOLLM2_LAYER.items()
    }
    return {"architecture": architecture, "modules": modules}
