"""Bit agreement of maskstore's reference variants with the paper's code, on the embedded model.

    python examples/paper/compare_reference.py [--samples 32] [--model DIR]

Calibrates SmolLM2-135M-Instruct (float32) on the pair CSV's two sides, builds each variant with
maskstore, recomputes the reference's masks with ``reference_port.py`` (one sample a forward,
``torch.topk`` per row) on the same token ids, and prints the share of equal bits: over all
places, and over the places the scores decide (where the reference's scores tie across its keep
boundary, ``torch.topk``'s order chose, and no rule can reproduce it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import reference_port as ref

from maskstore.build import BuildConfig, build
from maskstore.build import calibration as cal
from maskstore.models import load_model
from maskstore.modules import maskable_modules
from maskstore.store.opener import open_bundle

DATA = Path(__file__).resolve().parents[1] / "data" / "introvert_extrovert.csv"


def agreement(bundle, persona, want, scores=None):
    same = total = same_dec = total_dec = 0
    for name, m in want.items():
        got = torch.from_numpy(bundle.read_mask(persona, name))
        eq = got == m
        dec = ref.decided(m, scores[name]) if scores is not None else torch.ones_like(eq)
        same, total = same + int(eq.sum()), total + eq.numel()
        same_dec, total_dec = same_dec + int((eq & dec).sum()), total_dec + int(dec.sum())
    return same / total, same_dec / max(total_dec, 1), 1 - total_dec / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tok = load_model(args.model)
    names = list(maskable_modules(model))
    mods = dict(model.named_modules())
    pos, neg = cal.read_pair_csv(DATA)
    sides = {"seek": pos[: args.samples], "reject": neg[: args.samples]}
    seqs = {
        p: [
            tok(cal.render(tok, s, False), return_tensors="pt", truncation=True, max_length=512)[
                "input_ids"
            ][0]
            for s in smp
        ]
        for p, smp in sides.items()
    }
    t0 = time.perf_counter()
    mean, var, mu, tv = {}, {}, {}, {}
    with torch.no_grad():
        for p in sides:
            mean[p], var[p] = ref.sample_norm_stats(model, seqs[p], names)
            mu[p], tv[p] = ref.token_stats(model, seqs[p], names)
    print(f"reference statistics: {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    def ms(config, pair=True):
        out = Path(tempfile.mkdtemp()) / "b.zarr"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build(
                model,
                {p: cal.batches(tok, smp, 512, 8) for p, smp in sides.items()},
                out,
                pairs=[("seek", "reject")] if pair else [],
                config=config,
            )
        return open_bundle(out)

    rows = []
    b = ms(BuildConfig(method="wanda", sparsity=0.5, norm="sample-mean"), pair=False)
    for p in sides:
        want = {n: ref.wanda(mods[n].weight, mean[p][n], 0.5) for n in names}
        rows.append(
            (
                "wanda --norm sample-mean",
                p,
                *agreement(
                    b, p, {n: w[0] for n, w in want.items()}, {n: w[1] for n, w in want.items()}
                ),
            )
        )
    b = ms(
        BuildConfig(method="wanda", sparsity=0.5), pair=False
    )  # the default, the Wanda paper's token norm
    for p in sides:
        want = {n: ref.wanda(mods[n].weight, mean[p][n], 0.5) for n in names}
        rows.append(
            (
                "wanda --norm tokens (default)",
                p,
                *agreement(
                    b, p, {n: w[0] for n, w in want.items()}, {n: w[1] for n, w in want.items()}
                ),
            )
        )
    for phi in ("softplus", "relu"):
        b = ms(BuildConfig(method="contrastive-wanda", phi=phi))
        for i, p in enumerate(sides):
            want, sc = {}, {}
            for n in names:
                out = ref.contrastive_wanda(
                    mods[n].weight,
                    mean["seek"][n],
                    var["seek"][n],
                    mean["reject"][n],
                    var["reject"][n],
                    0.3,
                    phi,
                    2.0,
                )
                want[n], sc[n] = out[i]
            rows.append((f"contrastive-wanda --phi {phi}", p, *agreement(b, p, want, sc)))
    b = ms(BuildConfig(method="contrastive-sparse-ref"))
    for i, p in enumerate(sides):
        want, sc = {}, {}
        for n in names:
            out = ref.contrastive_sparse(
                mods[n].weight, mu["seek"][n], tv["seek"][n], mu["reject"][n], tv["reject"][n]
            )
            want[n], sc[n] = out[i]
        rows.append(("contrastive-sparse-ref", p, *agreement(b, p, want, sc)))
    b = ms(BuildConfig(method="column-norm", sparsity=0.5), pair=False)
    want = {n: ref.column_norm(mods[n].weight, 0.5) for n in names}
    rows.append(("column-norm", "both", *agreement(b, "seek", want)))

    print(f"{'variant':32} {'persona':8} {'all bits':>10} {'decided':>10} {'tie-decided':>12}")
    for v, p, a, d, t in rows:
        print(f"{v:32} {p:8} {a:10.4%} {d:10.4%} {t:12.2%}")


if __name__ == "__main__":
    main()
