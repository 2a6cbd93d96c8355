"""``maskstore serve`` on the embedded SmolLM2-135M, clients over HTTP (the openai package).

Ratios in one run:
- tokens/s of 16 concurrent clients spread over 1, 4 and 16 personas, against 1 persona, for
  both batching modes: one persona a batch (``--batching persona``, switched in place) and
  mixed-persona batches (``--batching mixed``, the fused kernel that gates each weight from
  every persona's packed bits as it reads it), and a naive server that decodes one request at
  a time (``--batching persona --max-batch 1``);
- the first request to an uncached persona against the same request once it is cached;
- the mask cache's bytes per persona against the persona's packed mask bytes, and the server's
  resident memory growth per persona loaded (each by one short request, before the bursts).

Personas are random masks at sparsity 0.2 (the serving cost does not depend on how masks were
scored). Run: python benchmarks/bench_serve.py  (about 6 minutes on 2 cores; ``--batching
auto`` too; BENCH_SERVE_MODES=mixed,auto limits the modes, persona always runs)
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

N_PERSONAS = 16
CLIENTS = 16
TOKENS = 16
PROMPT = "Tell me about your plans for the weekend."


def make_bundle(path: Path) -> int:
    """A bundle of ``N_PERSONAS`` random personas of the embedded model; returns the packed
    mask bytes of one persona."""
    from maskstore import create_bundle
    from maskstore.build import model_source
    from maskstore.models import load_model
    from maskstore.modules import maskable_modules, model_fingerprint

    model, _ = load_model(None)
    mods = maskable_modules(model)
    fp = model_fingerprint(model, mods, hash_weights=True)
    rng = np.random.default_rng(0)
    with create_bundle(path, fp, source=model_source(model)) as b:
        for i in range(N_PERSONAS):
            with b.persona_writer(f"p{i}", method="random") as w:
                for n, m in mods.items():
                    w.write_mask(n, rng.random((m.out_features, m.in_features)) >= 0.2)
    return sum(m.out_features * ((m.in_features + 7) // 8) for m in mods.values())


def start(bundle: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen(
        [sys.executable, "-m", "maskstore.cli", "serve", str(bundle), "--port", "0", "--json",
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    doc = ""
    while not doc.rstrip().endswith("}"):
        line = p.stdout.readline()
        if not line:
            raise SystemExit("the server did not start")
        doc += line
    return p, json.loads(doc)["url"]


def rss_mib(pid: int) -> np.ndarray:
    """(private, file-backed) resident MiB: RssAnon, and RssFile (page-cache pages mapped in,
    shared and reclaimable: the checkpoint that base values are read back from)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return np.array([int(re.search(rf"{k}:\s+(\d+)", text).group(1)) / 1024
                     for k in ("RssAnon", "RssFile")])  # fmt: skip


def cache_bytes(url: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics").read().decode()
    return float(re.search(r"^maskstore_persona_cache_bytes (\S+)$", text, re.M).group(1))


def mixing(url: str) -> dict[int, float]:
    """What ``--batching auto`` measured at start: personas in a step -> a mixed step's speed
    over one in-place step a persona."""
    text = urllib.request.urlopen(f"{url}/metrics").read().decode()
    found = re.findall(r'^maskstore_mixing_speedup\{personas="(\d+)"\} (\S+)$', text, re.M)
    return {int(k): float(v) for k, v in found}


def main() -> None:
    import openai

    tmp = Path(tempfile.mkdtemp(prefix="maskstore-bench-serve-"))
    procs = []
    try:
        bundle = tmp / "b.zarr"
        packed = make_bundle(bundle)
        names = [f"p{i}" for i in range(N_PERSONAS)]
        results = {}
        modes = {"persona": ("--batching", "persona"), "mixed": ("--batching", "mixed"),
                 "auto": ("--batching", "auto"),
                 "naive": ("--batching", "persona", "--max-batch", "1")}  # fmt: skip
        only = [m for m in os.environ.get("BENCH_SERVE_MODES", "").split(",") if m]
        modes = {m: f for m, f in modes.items() if not only or m in only or m == "persona"}
        for mode, flags in modes.items():
            proc, url = start(bundle, *flags)
            procs.append(proc)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                                   timeout=600)  # fmt: skip

            def one(model: str, n: int = TOKENS, client=client) -> int:
                r = client.completions.create(model=model, prompt=PROMPT, max_tokens=n,
                                              temperature=0)  # fmt: skip
                return r.usage.completion_tokens

            def burst(personas: list[str], one=one) -> float:
                jobs = [personas[i % len(personas)] for i in range(CLIENTS)]
                for p in set(jobs):
                    one(p, 1)  # loaded before the clock starts
                t = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(CLIENTS) as ex:
                    made = sum(ex.map(one, jobs))
                return made / (time.perf_counter() - t)

            if mode == "auto":  # its measurement at start runs beside the first requests
                deadline = time.monotonic() + 120
                while len(mixing(url)) < 3 and time.monotonic() < deadline:  # 2, 4, 8
                    time.sleep(0.2)
            first = _timed(lambda one=one: one("p0", 1))
            rss0 = rss_mib(proc.pid)  # after the first persona (which copies the weights)
            cold = _timed(lambda one=one: one("p1", 1))
            warm = min(_timed(lambda one=one: one("p1", 1)) for _ in range(3))
            for p in names[2:]:  # every persona loaded by one short request, one at a time
                one(p, 1)
            rss = rss_mib(proc.pid) - rss0  # before the bursts' batches grow the heap
            rates = {k: burst(names[:k]) for k in (1, 4, 16)}
            results[mode] = (rates, first, cold, warm, rss, cache_bytes(url) / N_PERSONAS)
            if mode == "auto":
                measured = mixing(url)
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        print(f"embedded SmolLM2-135M, {CLIENTS} clients x {TOKENS} tokens, greedy, "
              f"{os.cpu_count()} CPU cores")  # fmt: skip
        one_p = results["persona"][0][1]
        heads = {"naive": "one request at a time"}
        print(
            "| clients over | " + " | ".join(heads.get(m, f"--batching {m}") for m in modes) + " |"
        )
        print("|" + " --- |" * (len(modes) + 1))
        for k in (1, 4, 16):
            cells = [f"{results[m][0][k]:.1f} tok/s ({results[m][0][k] / one_p:.2f}x)"
                     for m in modes]  # fmt: skip
            print(f"| {k} persona{'s' if k > 1 else ''} | {' | '.join(cells)} |")
        if "mixed" in results:
            mixed = results["mixed"][0]
            print(f"(ratios against 1 persona with --batching persona; within --batching mixed, "
                  f"4 personas {mixed[4] / mixed[1]:.2f}x and 16 personas "
                  f"{mixed[16] / mixed[1]:.2f}x its 1 persona)")  # fmt: skip
        if "auto" in results:
            wins = [k for k in measured if all(measured[j] > 1 for j in measured if j >= k)]
            print(
                "--batching auto measured a mixed step against one in-place step a persona: "
                + ", ".join(f"{v:.2f}x at {k} personas" for k, v in sorted(measured.items()))
                + (f"; it mixes from {min(wins)} personas" if wins else "; it never mixes")
            )
        for m, (_rates, first, cold, warm, rss, per) in results.items():
            print(f"--batching {m}: first request to an uncached persona {cold * 1000:.0f} ms "
                  f"against {warm * 1000:.0f} ms cached ({cold / warm:.1f}x), the server's first "
                  f"persona {first * 1000:.0f} ms; mask cache {per / packed:.3f}x the packed "
                  f"mask bytes per persona ({packed / 2**20:.2f} MiB); over the other "
                  f"{N_PERSONAS - 1} personas private memory grew {rss[0]:.0f} MiB "
                  f"({rss[0] / (N_PERSONAS - 1):.1f} MiB each, {rss[0] / (N_PERSONAS - 1) / (packed / 2**20):.2f}x "
                  f"the packed bytes) and mapped checkpoint pages {rss[1]:.0f} MiB")  # fmt: skip
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
