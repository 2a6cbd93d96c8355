"""``maskstore build``: persona masks from a model and calibration files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from maskstore.errors import MaskstoreError
from maskstore.store.names import check_persona_name
from maskstore.store.opener import open_bundle

from ._common import console, emit_json, fmt_bytes, progress, safe
from .app import DeviceOpt, app, choice

# the names of maskstore.build.methods.METHODS, listed here so that --help needs no torch (a test
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
    from maskstore.build import calibration as cal

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


_BuildPersonaOpt = Annotated[
    list[str] | None,
    typer.Option(help="NAME=FILE (.txt/.jsonl/.csv), POS:NEG=PAIRS.csv, or NAME with --from-stats"),
]
_BuildMethodOpt = Annotated[
    choice(*METHODS),
    typer.Option(metavar="METHOD", help=f"scoring method: {', '.join(METHODS)}"),
]
_BuildSparsityOpt = Annotated[
    float | None,
    typer.Option(help="share of each row pruned, in [0, 1) (default 0.3 contrastive, else 0.5)"),
]
_BuildModelOpt = Annotated[
    Path | None,
    typer.Option(
        help="HF model folder, or Hub id from the local cache (default: embedded SmolLM2-135M)"
    ),
]
_BuildRevisionOpt = Annotated[
    str | None, typer.Option(help="with a Hub id: branch, tag or commit (default main)")
]
_BuildFromStatsOpt = Annotated[
    Path | None, typer.Option(help="reuse statistics stored in this bundle")
]
_BuildChatTemplateOpt = Annotated[
    bool, typer.Option(help="render samples with the tokenizer's chat template")
]
_BuildSelectionOpt = Annotated[
    choice("row", "nm", "layer"),
    typer.Option(
        help="top share of each row, N:M groups, or of each layer",
    ),
]
_BuildPhiOpt = Annotated[
    choice("relu", "softplus"),
    typer.Option(help="contrastive-wanda's phi"),
]
_BuildEpsOpt = Annotated[
    float, typer.Option(help="contrastive methods: added to the variance inside the sqrt")
]
_BuildNormOpt = Annotated[
    choice("tokens", "sample-mean"),
    typer.Option(
        help="Wanda factor: tokens (sqrt of sum over tokens, the Wanda paper) or "
        "sample-mean (mean of per-sample norms, the reference code)",
    ),
]
_BuildTiesOpt = Annotated[
    choice("wanda", "index"),
    typer.Option(
        help="exact score ties: wanda (own Wanda score, then index) or index",
    ),
]
_BuildOnlyOpt = Annotated[
    choice("attn", "mlp") | None,
    typer.Option(help="mask only attention or MLP modules"),
]
_BuildIncludeLmHeadOpt = Annotated[
    bool, typer.Option(help="also mask lm_head (as the reference's mask.py does)")
]
_BuildUntieOpt = Annotated[
    bool, typer.Option(help="give a tied lm_head its own weight copy so it can be masked")
]
_BuildOffloadOpt = Annotated[
    bool,
    typer.Option(help="load one decoder block at a time from the safetensors files"),
]
_BuildMaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        help="e.g. 8GiB: offload when the weights are larger; hidden states past a quarter spill to disk"
    ),
]
_BuildDtypeOpt = Annotated[
    choice("float32", "bfloat16", "float16"),
    typer.Option(help="model dtype while building"),
]
_BuildCodecOpt = Annotated[
    choice("zstd", "blosc", "gzip", "none"),
    typer.Option(help="compression of mask chunks"),
]
_BuildIntoOpt = Annotated[
    Path | None,
    typer.Option(help="add the personas to this existing bundle of the same model"),
]


@app.command()
def build(
    persona: _BuildPersonaOpt = None,
    out: Annotated[Path, typer.Option(help="bundle to create")] = Path("personas.zarr"),
    method: _BuildMethodOpt = "wanda",
    sparsity: _BuildSparsityOpt = None,
    pair: Annotated[list[str] | None, typer.Option(help="opposing personas POS:NEG")] = None,
    model: _BuildModelOpt = None,
    revision: _BuildRevisionOpt = None,
    from_stats: _BuildFromStatsOpt = None,
    samples: Annotated[int | None, typer.Option(help="samples per persona (default: all)")] = None,
    max_tokens: Annotated[int, typer.Option(help="max tokens per sample")] = 512,
    seed: Annotated[int, typer.Option(help="seed for sampling")] = 0,
    batch_size: Annotated[int, typer.Option(help="samples per forward pass")] = 8,
    chat_template: _BuildChatTemplateOpt = False,
    selection: _BuildSelectionOpt = "row",
    nm: Annotated[str, typer.Option(help="N:M for --selection nm")] = "2:4",
    phi: _BuildPhiOpt = "relu",
    eps: _BuildEpsOpt = 1e-6,
    tau: Annotated[float, typer.Option(help="softplus temperature")] = 2.0,
    damp: Annotated[float, typer.Option(help="sparsegpt dampening (share of mean diag H)")] = 0.01,
    norm: _BuildNormOpt = "tokens",
    ties: _BuildTiesOpt = "wanda",
    block: Annotated[int, typer.Option(help="column-norm: columns per block")] = 128,
    only: _BuildOnlyOpt = None,
    modules: Annotated[str | None, typer.Option(help="regex over module names to mask")] = None,
    include_lm_head: _BuildIncludeLmHeadOpt = False,
    untie: _BuildUntieOpt = False,
    device: DeviceOpt = "cpu",
    offload: _BuildOffloadOpt = False,
    max_memory: _BuildMaxMemoryOpt = None,
    dtype: _BuildDtypeOpt = "float32",
    codec: _BuildCodecOpt = "zstd",
    chunk_mib: Annotated[float, typer.Option(help="packed MiB per chunk")] = 2.0,
    force: Annotated[bool, typer.Option(help="replace an existing --out bundle")] = False,
    into: _BuildIntoOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Build persona masks from a model and calibration data (or from stored statistics)."""
    from maskstore.build import (
        BuildConfig,
        distributed,
    )
    from maskstore.build.offload import parse_bytes

    _check_counts(max_tokens, batch_size, samples, chunk_mib)
    try:
        n_, m_ = (int(x) for x in nm.split(":"))
    except ValueError:
        raise MaskstoreError(f"--nm {nm!r}: write it as N:M, e.g. 2:4") from None
    config = BuildConfig(method=method, sparsity=sparsity, selection=selection, n=n_, m=m_,
                         phi=phi, eps=eps, tau=tau, damp=damp, norm=norm, ties=ties,
                         block=block)  # fmt: skip
    config.check()
    out = _output(out, into, force)
    data, names, pairs, source = _inputs(persona, pair, from_stats, config)
    from maskstore.build.pipeline import BuildJob, run_build

    rank, _ = distributed.world()
    if rank != 0:
        console.quiet = True
    job = BuildJob(
        out=out, config=config, data=data, from_stats=source, names=names, pairs=pairs,
        model=None if model is None else str(model), revision=revision, dtype=dtype,
        device=device, only=only, modules=modules, include_lm_head=include_lm_head,
        untie=untie, samples=samples, seed=seed, max_tokens=max_tokens, batch_size=batch_size,
        chat_template=chat_template, offload=offload,
        max_memory=parse_bytes(max_memory) if max_memory is not None else None,
        chunk_bytes=max(1, int(chunk_mib * (1 << 20))), codec=codec, force=force,
        into=into is not None,
    )  # fmt: skip
    res = _with_bars(run_build, job, quiet=json_out or rank != 0)
    if res is None:  # a torchrun rank other than 0: it calibrated and selected its share
        return
    _summary(res, out, method, config.sparsity, json_out)


def _check_counts(max_tokens: int, batch_size: int, samples: int | None, chunk_mib: float) -> None:
    for flag, value in (("--max-tokens", max_tokens), ("--batch-size", batch_size)):
        if value < 1:
            raise MaskstoreError(f"{flag} must be at least 1, got {value}")
    if samples is not None and samples < 1:
        raise MaskstoreError(f"--samples must be at least 1, got {samples}")
    if not chunk_mib > 0:
        raise MaskstoreError(f"--chunk-mib must be positive, got {chunk_mib}")


def _output(out: Path, into: Path | None, force: bool) -> Path:
    """The bundle to write (``--into``: an existing one to add to), checked before any work."""
    if into is not None:
        if force:
            raise MaskstoreError("--into adds to a bundle; --force replaces one: give one")
        open_bundle(into, writable=True)  # a bundle folder that exists
        return into
    if out.is_symlink():
        raise MaskstoreError(f"{out} is a symlink: choose another --out")
    if out.exists() and not force:
        raise MaskstoreError(f"{out} already exists: choose another --out or pass --force")
    if out.exists() and not (out / "zarr.json").is_file():
        raise MaskstoreError(f"{out} exists and is not a bundle: refusing to replace it")
    return out


def _inputs(persona, pair, from_stats, config):
    """(calibration data, persona names, pairs, stored-statistics bundle) from the options."""
    from maskstore.build import check_pairs

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
    return data, names, pairs, source


def _with_bars(run, job, quiet: bool):
    """``run(job, stage)`` with a progress bar per stage (none when ``quiet``)."""
    with progress(disable=quiet) as bar:

        def stage(name: str, total: int | None):
            task = bar.add_task(name, total=total)
            return lambda done, total: bar.update(task, completed=done, total=total)

        return run(job, stage)


def _summary(res, out: Path, method: str, sparsity: float, json_out: bool) -> None:
    """What was built: per persona its sparsity, mask and statistics sizes, digest; timings."""
    metas, mods, times = res.metas, res.modules, res.seconds
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
                "sparsity": sparsity,
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
