"""maskstore against its peers, side by side in one run, on the embedded SmolLM2-135M (float32):

* **building** (one persona, 16 samples, sparsity 0.5): ``maskstore build`` against
  llm-compressor's ``oneshot`` with ``WandaPruningModifier`` / ``SparseGPTModifier``, wall time
  and peak RSS of fresh processes. llm-compressor pins an older transformers, so it runs in its
  own interpreter: ``--llmcompressor-python PATH`` (e.g. a venv made with
  ``--system-site-packages`` and ``pip install llmcompressor``); skipped without it.
* **personas against LoRA adapters** (PEFT, r=8 on the same 7 Linears a layer; skipped when
  ``peft`` is absent): loading (``from_pretrained`` + ``attach`` + ``use`` against
  ``from_pretrained`` + ``PeftModel.from_pretrained``), a cold switch that reads from disk
  (against ``hotswap_adapter``), a cached switch (against ``set_adapter``) and against a
  merge/unmerge cycle, the memory a second persona adds, decoding speed, and whether the base
  weights come back exactly.

Every figure is the median over fresh processes (or repeats), maskstore and peer alternating,
reported as a ratio maskstore / peer.

Run: python benchmarks/bench_peers.py [--llmcompressor-python PATH] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _util import cli_build

from maskstore.build import calibration as cal
from maskstore.models import embedded_model_dir

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def child(code: str, python: str = sys.executable) -> dict:
    """Run ``code`` in a fresh interpreter; its last JSON line, plus its peak RSS in MiB."""
    wrapped = (
        code + "\nimport json as _j\n"
        "_h = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
        "print(_j.dumps({'peak_mib': int(_h) / 1024}))\n"
    )
    r = subprocess.run([python, "-c", wrapped], capture_output=True, text=True, env=ENV)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    out = {}
    for line in lines:
        out.update(line)
    return out


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


# ---- building


MASKSTORE_BUILD = """
import sys, time, json
t0 = time.perf_counter()
from maskstore.cli.main import main
sys.argv = ["maskstore", "build", "--model", {folder!r}, "--persona", "p={texts}",
            "--method", {method!r}, "--samples", "16", "--sparsity", "0.5", "--out", {out!r}]
try:
    main()
except SystemExit as e:
    if e.code:
        raise
wall = time.perf_counter() - t0
from maskstore import open_bundle
print(json.dumps({{"wall": wall, "pruned": len(open_bundle({out!r}).modules)}}))
"""

LLMC_BUILD = """
import sys, time, json
t0 = time.perf_counter()
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import WandaPruningModifier
from llmcompressor.modifiers.obcq import SparseGPTModifier
texts = [l.strip() for l in open({texts!r}) if l.strip()]
tok = AutoTokenizer.from_pretrained({folder!r})
ds = Dataset.from_dict({{"text": texts}}).map(
    lambda e: tok(e["text"], truncation=True, max_length=512), remove_columns=["text"])
model = AutoModelForCausalLM.from_pretrained({folder!r}, dtype="float32")
cls = {{"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}}[{method!r}]
# "re:.*lm_head": llm-compressor matches ignore entries against full module names, and the
# head is "lm_head" only at the top level; a regex is the form its modifiers document
oneshot(model=model, dataset=ds,
        recipe=[cls(sparsity=0.5, targets=["Linear"], ignore=["re:.*lm_head"])],
        num_calibration_samples=len(texts), max_seq_length=512)
wall = time.perf_counter() - t0
import torch
pruned = sum(1 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and float((m.weight == 0).float().mean()) > 0.4)
print(json.dumps({{"wall": wall, "pruned": pruned}}))
"""


def building(folder: Path, llmc: str | None, runs: int, tmp: Path) -> None:
    texts = tmp / "texts.txt"
    chosen = cal.choose(cal.read_samples(DATA / "introvert.txt"), 16, 0)
    texts.write_text("\n".join(s if isinstance(s, str) else s.text for s in chosen) + "\n")
    print("building one persona, 16 samples, sparsity 0.5 (median of fresh processes):")
    for method in ("wanda", "sparsegpt"):
        ours, theirs = [], []
        for i in range(runs):
            out = str(tmp / f"{method}-{i}.zarr")
            ours.append(child(MASKSTORE_BUILD.format(folder=str(folder), texts=texts,
                                                     method=method, out=out)))  # fmt: skip
            if llmc:
                theirs.append(child(LLMC_BUILD.format(folder=str(folder), texts=str(texts),
                                                      method=method), python=llmc))  # fmt: skip
        line = (
            f"  {method:<9} maskstore {med(ours, 'wall'):5.1f} s, {med(ours, 'peak_mib'):5.0f} MiB"
            f" ({ours[0]['pruned']} Linears pruned)"
        )
        if theirs:
            # the same work on both sides, or the ratios mean nothing
            assert {r["pruned"] for r in theirs} == {ours[0]["pruned"]}, (ours, theirs)
            line += (
                f"; llm-compressor {med(theirs, 'wall'):5.1f} s, {med(theirs, 'peak_mib'):5.0f} MiB"
                f" -> time {med(ours, 'wall') / med(theirs, 'wall'):.2f}x, "
                f"memory {med(ours, 'peak_mib') / med(theirs, 'peak_mib'):.2f}x"
            )
        else:
            line += " (llm-compressor: pass --llmcompressor-python to compare)"
        print(line)


# ---- personas against LoRA adapters

COMMON = """
import gc, json, statistics, time, torch
torch.manual_seed(0)
def med(fn, n=10):
    out = []
    for _ in range(n):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return statistics.median(out)
"""

OURS = (
    COMMON
    + """
t0 = time.perf_counter()
import maskstore
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({folder!r}, dtype=torch.float32).eval()
h = maskstore.attach(model, {bundle!r})
h.use("a")
load = time.perf_counter() - t0
mods = maskstore.maskable_modules(model)
base = {{n: h.base_weight(n).clone() for n in mods}}
t = time.perf_counter(); h.use("b"); cold = time.perf_counter() - t
cached = med(lambda: (h.use("a"), h.use("b")), 5) / 2
for _ in range(19):
    h.use("a"); h.use("b"); h.use(None)
differ = sum(int((m.weight != base[n]).sum()) for n, m in mods.items())
print(json.dumps({{"load": load, "cold": cold, "cached": cached,
                  "held_per_persona": h.memory_overhead() / 2, "differ": differ}}))
"""
)

PEFT = (
    COMMON
    + """
t0 = time.perf_counter()
from peft import PeftModel
from peft.utils.hotswap import hotswap_adapter
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({folder!r}, dtype=torch.float32).eval()
pm = PeftModel.from_pretrained(model, {lora_a!r}, adapter_name="a")
load = time.perf_counter() - t0
base = {{n: p.detach().clone() for n, p in pm.named_parameters() if "lora" not in n}}
pm.load_adapter({lora_b!r}, adapter_name="b")
adapter_bytes = sum(p.numel() * p.element_size() for n, p in pm.named_parameters()
                    if ".lora_A.b." in n or ".lora_B.b." in n)
cached = med(lambda: (pm.set_adapter("a"), pm.set_adapter("b")), 5) / 2
pm.delete_adapter("b")
pm.set_adapter("a")
t = time.perf_counter()
hotswap_adapter(pm, {lora_b!r}, adapter_name="a", torch_device="cpu")
cold = time.perf_counter() - t
def cycle():
    pm.merge_adapter(); pm.unmerge_adapter()
merge = med(cycle, 5)
for _ in range(19):
    cycle()
differ = sum(int((p != base[n]).sum()) for n, p in pm.named_parameters() if n in base)
print(json.dumps({{"load": load, "cold": cold, "cached": cached, "merge": merge,
                  "adapter_bytes": adapter_bytes,
                  "differ": differ}}))
"""
)

DECODE = (
    COMMON
    + """
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({folder!r})
model = AutoModelForCausalLM.from_pretrained({folder!r}, dtype=torch.float32).eval()
enc = tok("Tell me about your weekend plans.", return_tensors="pt")
def rate(m):
    def go():
        with torch.inference_mode():
            m.generate(**enc, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                       pad_token_id=tok.eos_token_id)
    go()
    return 32 / med(go, 3)
if {which!r} == "ours":
    import maskstore
    h = maskstore.attach(model, {bundle!r})
    base = rate(model); h.use("a"); on = rate(model); h.use(None); base2 = rate(model)
else:
    from peft import PeftModel
    pm = PeftModel.from_pretrained(model, {lora_a!r})
    with pm.disable_adapter():
        base = rate(pm)
    on = rate(pm)
    with pm.disable_adapter():
        base2 = rate(pm)
print(json.dumps({{"ratio": on / ((base + base2) / 2), "on": on}}))
"""
)


def make_lora(folder: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def adapters(folder: Path, runs: int, tmp: Path) -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        print("PEFT comparison skipped: pip install peft")
        return
    bundle = tmp / "personas.zarr"
    cli_build("--model", str(folder), "--persona", f"a={DATA / 'introvert.txt'}",
              "--persona", f"b={DATA / 'extrovert.txt'}", "--method", "wanda",
              "--samples", "16", "--sparsity", "0.5", "--out", str(bundle))  # fmt: skip
    lora_a, lora_b = make_lora(folder, tmp / "lora_a", 1), make_lora(folder, tmp / "lora_b", 2)
    kw = {"folder": str(folder), "bundle": str(bundle), "lora_a": str(lora_a),
          "lora_b": str(lora_b)}  # fmt: skip
    ours, theirs = [], []
    for _ in range(runs):
        ours.append(child(OURS.format(**kw)))
        theirs.append(child(PEFT.format(**kw)))
    dec_ours = child(DECODE.format(which="ours", **kw))
    dec_peft = child(DECODE.format(which="peft", **kw))

    def row(label: str, a: float, b: float, unit: str = "ms", scale: float = 1000) -> None:
        print(f"  {label:<46} {a * scale:8.1f} {unit:<3} {b * scale:8.1f} {unit:<3} {a / b:6.2f}x")

    print(f"personas (wanda, sparsity 0.5) against LoRA adapters (r=8, {len(TARGETS)} Linears "
          f"a layer); median of {runs} fresh processes each:")  # fmt: skip
    print(f"  {'':<46} {'maskstore':>12} {'PEFT':>12} {'ratio':>7}")
    row("load: from_pretrained + attach + use", med(ours, "load"), med(theirs, "load"))
    row("cold switch, read from disk (vs hotswap)", med(ours, "cold"), med(theirs, "cold"))
    row("cached switch (vs set_adapter)", med(ours, "cached"), med(theirs, "cached"))
    row("cached switch (vs merge + unmerge)", med(ours, "cached"), med(theirs, "merge"))
    mib = 1 / 2**20
    row("held per persona (packed mask / adapter)", med(ours, "held_per_persona"),
        theirs[0]["adapter_bytes"], "MiB", mib)  # fmt: skip
    print(f"  decoding with the persona on, tokens/s vs base: maskstore {dec_ours['ratio']:.3f}x,"
          f" PEFT unmerged LoRA {dec_peft['ratio']:.3f}x")  # fmt: skip
    print(f"  weights differing from base after 19 cycles: maskstore {ours[0]['differ']:,}, "
          f"PEFT merge/unmerge {theirs[0]['differ']:,}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llmcompressor-python", default=os.environ.get("LLMCOMPRESSOR_PYTHON"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", choices=["build", "adapters"])
    args = ap.parse_args()
    folder = embedded_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "adapters":
            building(folder, args.llmcompressor_python, args.runs, Path(tmp))
        if args.only != "build":
            adapters(folder, args.runs, Path(tmp))


if __name__ == "__main__":
    main()
