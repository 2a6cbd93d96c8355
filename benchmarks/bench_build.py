"""The scoring pipeline on the embedded SmolLM2-135M-Instruct:

* masks from statistics for the whole model: maskstore's vectorised selection vs a Python loop
  of per-row ``torch.topk`` (the research code's way), same scores, side by side;
* the statistics pass vs bare forward passes over the same batches;
* peak memory and the full build time of two personas of 64 samples each;
* SparseGPT's peak memory against Wanda's (same model, 16 samples): Gram matrices one decoder
  block at a time (``maskstore build``) and, as before, all at once (a whole-model pass).

Run: python benchmarks/bench_build.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
from _util import child_peak_rss, timeit

from maskstore.build import calibration as cal
from maskstore.build import collect_stats, scoring
from maskstore.models import load_model
from maskstore.modules import maskable_modules

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def research_masks(mods, stats, sparsity: float) -> list[torch.Tensor]:
    """Per-row torch.topk in a Python loop (as the published code does)."""
    masks = []
    for name, mod in mods.items():
        s = scoring.wanda_scores(mod.weight, stats[name])
        k = scoring.keep_count(mod.in_features, sparsity)
        mask = torch.zeros_like(s, dtype=torch.bool)
        for i in range(s.shape[0]):
            mask[i, torch.topk(s[i], k).indices] = True
        masks.append(mask)
    return masks


def maskstore_masks(mods, stats, sparsity: float) -> list[torch.Tensor]:
    """What ``maskstore build --method wanda`` runs per module (scores fused into selection)."""
    return [
        scoring.select_fused(mod.weight, scoring.wanda_factor(stats[name]), sparsity)
        for name, mod in mods.items()
    ]


def maskstore_masks_from_scores(mods, stats, sparsity: float) -> list[torch.Tensor]:
    """Scores materialised by torch, then the compiled selection (contrastive Sparse's path)."""
    return [
        scoring.select(scoring.wanda_scores(mod.weight, stats[name]), sparsity)
        for name, mod in mods.items()
    ]


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load_model(None)
    mods = maskable_modules(model)
    numel = sum(m.weight.numel() for m in mods.values())
    samples = cal.read_samples(DATA / "introvert.txt")[:64]
    batches = list(cal.batches(tok, samples, max_tokens=512, batch_size=8))
    tokens = int(sum(b["attention_mask"].sum() for b in batches))

    def forward_only():
        with torch.inference_mode():
            for b in batches:
                model(**b, use_cache=False)

    forward_only()  # warm up
    t_fwd = timeit(forward_only)
    t_stats = timeit(lambda: collect_stats(model, mods, batches))
    print(
        f"statistics pass over {len(samples)} samples ({tokens:,} tokens): {t_stats:.2f}s; "
        f"bare forward passes {t_fwd:.2f}s; ratio {t_stats / t_fwd:.2f}"
    )

    stats = collect_stats(model, mods, batches)
    ref = research_masks(mods, stats, 0.5)
    for fn in (maskstore_masks, maskstore_masks_from_scores):  # same bits, module by module
        assert all(torch.equal(a, b) for a, b in zip(ref, fn(mods, stats, 0.5), strict=True))
    del ref
    t_ms = timeit(lambda: maskstore_masks(mods, stats, 0.5))
    t_sc = timeit(lambda: maskstore_masks_from_scores(mods, stats, 0.5))
    t_rs = timeit(lambda: research_masks(mods, stats, 0.5), repeat=1)
    rows = sum(m.out_features for m in mods.values())
    print(f"masks from statistics, {len(mods)} modules, {rows:,} rows, {numel:,} weights:")
    print(
        f"  per-row torch.topk loop {t_rs:.2f}s, maskstore {t_ms:.3f}s: {t_rs / t_ms:.1f}x faster"
    )
    print(f"  maskstore from materialised scores {t_sc:.3f}s: {t_rs / t_sc:.1f}x faster")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "b.zarr"
        t = time.perf_counter()
        rss, _ = child_peak_rss(
            "import sys; from maskstore.cli.main import main\n"
            f"sys.argv = ['maskstore', 'build', '--persona', 'introvert={DATA / 'introvert.txt'}',"
            f" '--persona', 'extrovert={DATA / 'extrovert.txt'}', '--pair', 'introvert:extrovert',"
            f" '--method', 'contrastive-wanda', '--samples', '64', '--out', '{out}']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
        )
        wall = time.perf_counter() - t
        model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        rss_model, _ = child_peak_rss("from maskstore.models import load_model\nload_model(None)")
    print(
        f"full build, 2 personas x 64 samples (contrastive-wanda, CLI, model load included): {wall:.1f}s"
    )
    print(
        f"peak RSS of that build {rss:.0f} MiB; of a process that only loads the model {rss_model:.0f} MiB "
        f"(parameters {model_mib:.0f} MiB)"
    )
    biggest = max(mods.values(), key=lambda m: m.weight.numel())
    act = 8 * 512 * max(m.in_features for m in mods.values()) * 4 / 2**20
    print(
        f"  one module's float64 scores: {biggest.weight.numel() * 8 / 2**20:.1f} MiB; "
        f"one batch of activations at the widest input: {act:.1f} MiB"
    )


def _build_rss(method: str, out: Path, samples: int = 16) -> float:
    return child_peak_rss(
        "import sys; from maskstore.cli.main import main\n"
        f"sys.argv = ['maskstore', 'build', '--persona', 'introvert={DATA / 'introvert.txt'}',"
        f" '--method', '{method}', '--samples', '{samples}', '--out', '{out}']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
    )[0]


def sparsegpt_memory() -> None:
    """Peak RSS of SparseGPT and Wanda builds of the embedded model (one persona, 16 samples),
    and of SparseGPT's statistics made by one whole-model pass holding every Gram matrix."""
    with tempfile.TemporaryDirectory() as tmp:
        wanda = _build_rss("wanda", Path(tmp) / "w.zarr")
        sgpt = _build_rss("sparsegpt", Path(tmp) / "s.zarr")
        whole = child_peak_rss(
            "from maskstore import calibration as cal\n"
            "from maskstore.build import BuildConfig, collect_stats\n"
            "from maskstore.models import load_model\n"
            "from maskstore.modules import maskable_modules\n"
            "model, tok = load_model(None)\n"
            f"s = cal.choose(cal.read_samples('{DATA / 'introvert.txt'}'), 16, 0)\n"
            "b = list(cal.batches(tok, s, 512, 8, True))\n"
            "collect_stats(model, maskable_modules(model), b, BuildConfig(method='sparsegpt'))\n"
        )[0]
    print(
        f"peak RSS, one persona x 16 samples: wanda build {wanda:.0f} MiB; sparsegpt build "
        f"{sgpt:.0f} MiB ({sgpt / wanda:.2f}x wanda); sparsegpt statistics by one whole-model "
        f"pass (every Gram matrix held) {whole:.0f} MiB ({whole / wanda:.2f}x)"
    )


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["sparsegpt-memory"]:
        sparsegpt_memory()
        raise SystemExit
    sparsegpt_memory()
    main()
