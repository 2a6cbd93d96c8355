"""``maskstore build``: persona masks from a model and calibration files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from maskstore.errors import MaskstoreError
from maskstore.names import check_persona_name
from maskstore.opener import open_bundle

from ._common import console, emit_json, fmt_bytes, progress, safe
from .app import DeviceOpt, app, choice

# the names of maskstore.methods.METHODS, listed here so that --help needs no torch (a test
# checks the two agree)
METHODS = (
    "wanda",
    "sparsegpt",
    "contrastive-wanda",
    "contrastive-sparse",
    "contrastive-sparse-ref",
    "column-norm",
)


def _parse_personas(specs: list[str]) -> tuple[dict[str, list], list[tuple[str, str]], list[str]]:
    """``NAME=FILE`` (one persona) or ``POS:NEG=FILE.csv`` (a question,matching,not_matching pair).
    A bare ``NAME`` selects a persona of ``--from-stats``."""
    from maskstore import calibration as cal

    data: dict[str, list] = {}
    pairs: list[tuple[str, str]] = []
    names: list[str] = []
    for spec in specs:
        if "=" not in spec:
            names.append(check_persona_name(spec))
            continue
        name, file = spec.split("=", 1)
        if ":" in name:
            a, b = name.split(":", 1)
            check_persona_name(a), check_persona_name(b)
            if a == b:
                raise MaskstoreError(
                    f"--persona {name}=... names one persona twice: pair two opposites"
                )
            data[a], data[b] = cal.read_pair_csv(file)
            pairs.append((a, b))
        else:
            data[check_persona_name(name)] = cal.read_samples(file)
    return data, pairs, names


def _parse_pairs(pairs: list[str]) -> list[tuple[str, str]]:
    out = []
    for p in pairs:
        if p.count(":") != 1:
            raise MaskstoreError(f"--pair {p!r}: write it as POSITIVE:NEGATIVE")
        a, b = p.split(":")
        if a == b:
            raise MaskstoreError(f"--pair {p} names one persona twice: pair two opposites")
        out.append((a, b))
    return out


@app.command()
def build(
    persona: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=FILE (.txt/.jsonl/.csv), POS:NEG=PAIRS.csv, or NAME with --from-stats"
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="bundle to create")] = Path("personas.zarr"),
    method: Annotated[
        choice(*METHODS),
        typer.Option(help="scoring method (README: methods)"),
    ] = "wanda",
    sparsity: Annotated[
        float | None,
        typer.Option(
            help="share of each row pruned, in [0, 1) (default 0.3 contrastive, else 0.5)"
        ),
    ] = None,
    pair: Annotated[list[str] | None, typer.Option(help="opposing personas POS:NEG")] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            help="HF model folder, or Hub id from the local cache (default: embedded SmolLM2-135M)"
        ),
    ] = None,
    revision: Annotated[
        str | None, typer.Option(help="with a Hub id: branch, tag or commit (default main)")
    ] = None,
    from_stats: Annotated[
        Path | None, typer.Option(help="reuse statistics stored in this bundle")
    ] = None,
    samples: Annotated[int | None, typer.Option(help="samples per persona (default: all)")] = None,
    max_tokens: Annotated[int, typer.Option(help="max tokens per sample")] = 512,
    seed: Annotated[int, typer.Option(help="seed for sampling")] = 0,
    batch_size: Annotated[int, typer.Option(help="samples per forward pass")] = 8,
    chat_template: Annotated[
        bool, typer.Option(help="render samples with the tokenizer's chat template")
    ] = False,
    selection: Annotated[
        choice("row", "nm", "layer"),
        typer.Option(
            help="top share of each row, N:M groups, or of each layer",
        ),
    ] = "row",
    nm: Annotated[str, typer.Option(help="N:M for --selection nm")] = "2:4",
    phi: Annotated[
        choice("relu", "softplus"),
        typer.Option(help="contrastive-wanda's phi"),
    ] = "relu",
    eps: Annotated[
        float, typer.Option(help="contrastive methods: added to the variance inside the sqrt")
    ] = 1e-6,
    tau: Annotated[float, typer.Option(help="softplus temperature")] = 2.0,
    damp: Annotated[float, typer.Option(help="sparsegpt dampening (share of mean diag H)")] = 0.01,
    norm: Annotated[
        choice("tokens", "sample-mean"),
        typer.Option(
            help="Wanda factor: tokens (sqrt of sum over tokens, the Wanda paper) or "
            "sample-mean (mean of per-sample norms, the reference code)",
        ),
    ] = "tokens",
    ties: Annotated[
        choice("wanda", "index"),
        typer.Option(
            help="exact score ties: wanda (own Wanda score, then index) or index",
        ),
    ] = "wanda",
    block: Annotated[int, typer.Option(help="column-norm: columns per block")] = 128,
    only: Annotated[
        choice("attn", "mlp") | None,
        typer.Option(help="mask only attention or MLP modules"),
    ] = None,
    modules: Annotated[str | None, typer.Option(help="regex over module names to mask")] = None,
    include_lm_head: Annotated[
        bool, typer.Option(help="also mask lm_head (as the reference's mask.py does)")
    ] = False,
    untie: Annotated[
        bool, typer.Option(help="give a tied lm_head its own weight copy so it can be masked")
    ] = False,
    device: DeviceOpt = "cpu",
    offload: Annotated[
        bool,
        typer.Option(help="load one decoder block at a time from the safetensors files"),
    ] = False,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="e.g. 8GiB: offload when the weights are larger; hidden states past a quarter spill to disk"
        ),
    ] = None,
    dtype: Annotated[
        choice("float32", "bfloat16", "float16"),
        typer.Option(help="model dtype while building"),
    ] = "float32",
    codec: Annotated[
        choice("zstd", "blosc", "gzip", "none"),
        typer.Option(help="compression of mask chunks"),
    ] = "zstd",
    chunk_mib: Annotated[float, typer.Option(help="packed MiB per chunk")] = 2.0,
    force: Annotated[bool, typer.Option(help="replace an existing --out bundle")] = False,
    into: Annotated[
        Path | None,
        typer.Option(help="add the personas to this existing bundle of the same model"),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Build persona masks from a model and calibration data (or from stored statistics)."""
    from maskstore import calibration as cal
    from maskstore import distributed
    from maskstore.build import (
        BuildConfig,
        PersonaStats,
        check_pairs,
        collector,
        finish_stats,
        masks_for_module,
        model_source,
        stats_from_bundle,
        write_bundle,
    )
    from maskstore.models import (
        DEFAULT_MODEL,
        load_model,
        load_tokenizer,
        model_folder,
        torch_dtype,
    )
    from maskstore.modules import check_untied, maskable_modules
    from maskstore.offload import LayerwiseModel, checkpoint_bytes, parse_bytes

    t0 = time.perf_counter()
    for flag, value in (("--max-tokens", max_tokens), ("--batch-size", batch_size)):
        if value < 1:
            raise MaskstoreError(f"{flag} must be at least 1, got {value}")
    if samples is not None and samples < 1:
        raise MaskstoreError(f"--samples must be at least 1, got {samples}")
    if not chunk_mib > 0:
        raise MaskstoreError(f"--chunk-mib must be positive, got {chunk_mib}")
    try:
        n_, m_ = (int(x) for x in nm.split(":"))
    except ValueError:
        raise MaskstoreError(f"--nm {nm!r}: write it as N:M, e.g. 2:4") from None
    config = BuildConfig(method=method, sparsity=sparsity, selection=selection, n=n_, m=m_,
                         phi=phi, eps=eps, tau=tau, damp=damp, norm=norm, ties=ties,
                         block=block)  # fmt: skip
    config.check()
    if into is not None:
        if force:
            raise MaskstoreError("--into adds to a bundle; --force replaces one: give one")
        open_bundle(into, writable=True)  # a bundle folder that exists, checked before work
        out = into
    elif out.is_symlink():
        raise MaskstoreError(f"{out} is a symlink: choose another --out")
    elif out.exists() and not force:
        raise MaskstoreError(f"{out} already exists: choose another --out or pass --force")
    elif out.exists() and not (out / "zarr.json").is_file():
        raise MaskstoreError(f"{out} exists and is not a bundle: refusing to replace it")
    data, csv_pairs, names = _parse_personas(persona or [])
    # a pair CSV pairs its two personas for the contrastive methods; others score them alone
    pairs = (csv_pairs if config.contrastive else []) + _parse_pairs(pair or [])
    source = None
    if from_stats is not None:
        if data:
            raise MaskstoreError(
                "--from-stats reuses stored statistics: give --persona NAME without =FILE"
            )
        source = open_bundle(from_stats)
        names = names or source.personas
        for n in names:
            source.persona(n)  # unknown names fail here, listing the known ones
    elif names:
        raise MaskstoreError(f"--persona {names[0]} needs =FILE (or use --from-stats)")
    elif not data:
        raise MaskstoreError("give at least one --persona NAME=FILE")
    check_pairs(names if source else list(data), pairs, config)
    times: dict[str, float] = {}

    rank, size = distributed.world()
    if size > 1:
        distributed.init(device)
        if rank != 0:
            console.quiet = True
    budget = parse_bytes(max_memory) if max_memory is not None else None
    folder = model_folder(None if model is None else str(model), revision)
    layerwise = None
    if offload or (budget is not None and checkpoint_bytes(folder) > budget):
        from maskstore.models import check_device

        check_device(device)
        with console.status("reading the model's structure"):
            layerwise = LayerwiseModel(
                folder, torch_dtype(dtype), device, budget=(budget or 4 << 30) // 4
            )
            mdl, tok = layerwise.model, load_tokenizer(folder)
    else:
        with console.status("loading model"):
            mdl, tok = load_model(folder, dtype=dtype, device=device)
    times["load_model"] = time.perf_counter() - t0
    mods = maskable_modules(mdl, only=only, pattern=modules, include_lm_head=include_lm_head)
    check_untied(mdl, mods, untie)

    t1 = time.perf_counter()
    if source is not None:
        stats = stats_from_bundle(source, names, mods)
    else:
        chosen = {n: cal.choose(smp, samples, seed) for n, smp in data.items()}
        made = {n: list(cal.batches(tok, c, max_tokens, batch_size, chat_template))
                for n, c in chosen.items()}  # fmt: skip
        records = {}  # every rank records every batch: the same digest as one process
        for n, bs in made.items():
            records[n] = cal.Recorder(bs, cal.describe(max_tokens, seed, chat_template))
            for _ in records[n]:
                pass
        # each rank takes every size-th batch; one process takes them all
        batches = {n: distributed.shard(bs, rank, size) for n, bs in made.items()}
        collectors = {n: collector(mods, config, record=size > 1) for n in data}
        with progress(disable=rank != 0 or json_out) as bar:
            if layerwise is not None:
                task = bar.add_task("calibrating, block by block", total=len(layerwise.layers))
                layerwise.collect(collectors, batches, progress=lambda k: bar.advance(task, k))
            else:
                for n, bs in batches.items():
                    task = bar.add_task(
                        f"calibrating {n}", total=sum(len(b["input_ids"]) for _, b in bs)
                    )
                    collectors[n].run(
                        mdl,
                        [b for _, b in bs],
                        progress=lambda k, t=task: bar.advance(t, k),
                        indices=[i for i, _ in bs],
                    )
        if size > 1:
            distributed.gather_stats(collectors)
        stats = []
        for n in chosen:
            st = finish_stats(collectors[n], config)
            stats.append(PersonaStats(n, st, records[n].record()))
    times["calibration"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    weight_of = None if layerwise is None else layerwise.weight
    masks_of = None
    if size > 1:  # modules split across ranks for selection; rank 0 writes

        def select(name: str):
            zero = {p.name: 0 for p in stats}
            w = mods[name].weight if weight_of is None else weight_of(name)
            return masks_for_module(w, stats, pairs, name, config, zero), zero

        gathered = distributed.gather_masks(list(mods), select, rank, size)
        if rank != 0:
            distributed.finish()
            return
        masks_of = gathered.__getitem__
    with progress(disable=json_out) as bar:
        task = bar.add_task("scoring and writing", total=len(mods))
        metas = write_bundle(
            out,
            mdl,
            mods,
            stats,
            pairs=pairs,
            config=config,
            force=force,
            progress=lambda k: bar.advance(task, k),
            chunk_bytes=max(1, int(chunk_mib * (1 << 20))),
            codec=codec,
            weight_of=weight_of,
            masks_of=masks_of,
            into=into is not None,
            source={
                "model": str(model) if model is not None else f"embedded:{DEFAULT_MODEL}",
                "revision": revision or model_source(mdl).get("revision")
                if layerwise is None
                else revision,
                "dtype": dtype,
            },
        )
    if size > 1:
        distributed.finish()
    times["scoring_write"] = time.perf_counter() - t2
    times["total"] = time.perf_counter() - t0

    b = open_bundle(out)
    numel = sum(b.modules[m].numel for m in mods)
    rows = []
    for n, meta in metas.items():
        kept = sum(e["kept"] for e in meta["modules"].values())
        size = b.nbytes_on_disk(n, "masks")
        rows.append(
            {
                "persona": n,
                "method": method,
                "sparsity": config.sparsity,
                "realised_sparsity": 1 - kept / numel,
                "modules": len(meta["modules"]),
                "weights": numel,
                "mask_bytes": size,
                "stats_bytes": b.nbytes_on_disk(n, "stats"),
                "bits_per_weight": 8 * size / numel,
                "digest": meta["digest"],
            }
        )
    if json_out:
        emit_json({"out": str(out), "digest": b.digest, "personas": rows, "seconds": times})
        return
    t = Table(title=f"{safe(out)}  ({len(mods)} modules, {numel:,} weights each)")
    for c in ("persona", "method", "target", "realised", "masks", "bits/weight", "stats"):
        t.add_column(c, justify="left" if c in ("persona", "method") else "right")
    for r in rows:
        t.add_row(
            safe(r["persona"]),
            safe(r["method"]),
            f"{r['sparsity']:.3f}",
            f"{r['realised_sparsity']:.4f}",
            fmt_bytes(r["mask_bytes"]),
            f"{r['bits_per_weight']:.3f}",
            fmt_bytes(r["stats_bytes"]),
        )
    console.print(t)
    console.print("  ".join(f"{k.replace('_', ' ')}: {v:.1f}s" for k, v in times.items()))
