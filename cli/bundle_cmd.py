"""Commands over bundles: info, verify, overlap, diff, the set operations, import-pt, pack."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from maskstore.compare import algebra
from maskstore.errors import MaskstoreError
from maskstore.store.opener import open_bundle

from ._common import (
    console,
    emit_json,
    err_console,
    fmt_bytes,
    heat,
    one_out,
    persona_refs,
    personas_of,
    progress,
    safe,
)
from .app import BundleArg, JsonOpt, WritableBundleArg, app, choice


@app.command()
def info(
    bundle: BundleArg,
    card: Annotated[
        bool, typer.Option("--card", help="a short human-readable card of each persona")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Personas, modules, sizes on disk, bits per weight and digests."""
    b = open_bundle(bundle)
    if card:
        _card(b, bundle, json_out)
        return
    doc = {
        "path": str(bundle),
        "digest": b.digest,
        "format_version": b.meta["format_version"],
        "architecture": b.fingerprint["architecture"],
        "modules": len(b.modules),
        "weights": sum(m.numel for m in b.modules.values()),
        "personas": [],
    }
    is_recipe = getattr(b, "is_recipe", lambda _p: False)
    for p in b.personas:
        meta = b.persona(p)
        numel = sum(b.modules[m].numel for m in meta["modules"])
        kept = sum(e["kept"] for e in meta["modules"].values())
        size = b.nbytes_on_disk(p, "masks")
        doc["personas"].append(
            {
                "persona": p,
                "method": meta["method"],
                "sparsity": meta["sparsity"],
                "realised_sparsity": 1 - kept / numel if numel else None,
                "modules": len(meta["modules"]),
                "weights": numel,
                "mask_bytes": size,
                "stats_bytes": b.nbytes_on_disk(p, "stats"),
                "bits_per_weight": 8 * size / numel if numel else None,
                "has_stats": b.has_stats(p),
                "recipe": bool(is_recipe(p)),
                "op": meta["provenance"]["op"],
                "digest": meta["digest"],
            }
        )
    if json_out:
        emit_json(doc)
        return
    console.print(
        f"[bold]{safe(bundle)}[/]  {safe(doc['architecture'])}, {doc['modules']} modules, "
        f"{doc['weights']:,} weights\ndigest {doc['digest']}"
    )
    from rich import box
    from rich.table import Column

    t = Table(
        Column("persona", overflow="fold", min_width=10),  # names wrap, never "extrov…"
        Column("method", overflow="fold", min_width=6),
        *(
            Column(h, no_wrap=True, min_width=len(h), justify="right")
            for h in ("sparsity", "modules", "on disk", "bits/w", "stats")
        ),
        Column("digest", no_wrap=True, min_width=12),
        box=box.SIMPLE_HEAD,
    )
    for p in doc["personas"]:
        recipe = is_recipe(p["persona"])
        t.add_row(
            safe(p["persona"]),
            safe(p["method"]),
            f"{p['realised_sparsity']:.3f}",
            str(p["modules"]),
            "recipe" if recipe else fmt_bytes(p["mask_bytes"]),
            "recipe" if recipe else f"{p['bits_per_weight']:.3f}",
            fmt_bytes(p["stats_bytes"]) if p["has_stats"] else "-",
            p["digest"][:12],
        )
    console.print(t)


def _card(b, bundle: Path, json_out: bool) -> None:
    """What each persona is, what it was made from, and how to use it."""
    src = b.model_source or {}
    model = src.get("model") or f"unrecorded ({b.fingerprint['architecture']})"
    with_model = f" --model {model}" if src.get("model") and ":" not in model else ""
    cards = []
    for p in b.personas:
        meta = b.persona(p)
        cal = meta.get("calibration") or {}
        params = ", ".join(f"{k}={v}" for k, v in sorted(meta["params"].items()))
        numel = sum(b.modules[m].numel for m in meta["modules"])
        kept = sum(e.get("kept", 0) for e in meta["modules"].values())
        realised = round(1 - kept / numel, 6) if numel else None
        cards.append(
            {
                "persona": p,
                "method": meta["method"],
                "params": params,
                "sparsity": meta["sparsity"],
                "realised_sparsity": realised,
                "data": (
                    f"{cal.get('samples', '?')} samples, {cal.get('tokens', '?')} tokens, digest "
                    f"{cal.get('digest', '?')} ({cal.get('source', '')})"
                    if cal
                    else f"none recorded ({meta['provenance']['op']})"
                ),
                "model": model,
                "revision": src.get("revision"),
                "dtype": src.get("dtype"),
                "weights_xxh3": b.fingerprint.get("weights_xxh3"),
                "digest": meta["digest"],
                "load": f"maskstore run {bundle} --persona {p}{with_model} --prompt ...; "
                f"maskstore.attach(model, {str(bundle)!r}).use({p!r})",
            }
        )
    if json_out:
        emit_json({"cards": cards})
        return
    for c in cards:
        console.print(f"[bold]{safe(c['persona'])}[/]  ({safe(bundle)})")
        for k in ("method", "params", "sparsity", "realised_sparsity", "data", "model",
                  "revision", "dtype",
                  "weights_xxh3", "digest", "load"):  # fmt: skip
            console.print(f"  {k:>12}: {safe(c[k])}", highlight=False, soft_wrap=True)


def _is_repository(path: str) -> bool:
    """A repository (or a remote that push wrote) rather than a bundle."""
    if "://" in path and not path.startswith("file://"):
        from maskstore.store.stores import open_store

        store = open_store(path)
        return store.get("maskstore-repo.json", limit=4096) is not None or (
            bool(store.list("versions/")) and store.get("zarr.json", limit=1 << 20) is None
        )
    p = Path(path.removeprefix("file://"))
    return (p / "maskstore-repo.json").is_file() or (
        (p / "versions").is_dir() and not (p / "zarr.json").exists()
    )


@app.command()
def verify(
    bundle: BundleArg,
    signatures: Annotated[
        bool, typer.Option("--signatures", help="also list who signed each tag and branch")
    ] = False,
    allowed_signers: Annotated[
        Path | None,
        typer.Option("--allowed-signers", help="ssh allowed-signers file to check signers against"),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Recompute every digest of a bundle (or of every reachable object of a repository); exit 1
    naming each damaged chunk."""
    if _is_repository(bundle):
        from maskstore.repo import open_repo

        repo = open_repo(bundle)
        with progress(disable=json_out) as bar:
            task = bar.add_task("verifying objects", total=None)
            problems = repo.verify(lambda i, n: bar.update(task, completed=i, total=n))
        leftovers = repo.leftovers()
        what = "every reachable object verifies"
        if signatures:
            sigs = repo.signatures(allowed_signers)
            trusted = allowed_signers or repo.config.get("trust", {}).get("allowed_signers")
            # with an allowed-signers file, every ref must carry a signature it accepts
            untrusted = [s for s in sigs if (s["signed"] and not s.get("ok"))
                         or (not s["signed"] and trusted)]  # fmt: skip
            for s in untrusted:
                why = s.get("reason") if s["signed"] else "unsigned"
                problems.append(f"{s['kind']} {s['name']}: {why} (signer {s.get('signer', '-')})")
            if json_out:
                emit_json({"path": str(bundle), "ok": not problems, "problems": problems,
                           "leftovers": leftovers, "signatures": sigs})  # fmt: skip
                raise typer.Exit(1 if problems else 0)
            t = Table("ref", "version", "signed by", "check")
            for s in sigs:
                who = s.get("signer", "-") if s["signed"] else "[dim]unsigned[/]"
                check = ("[green]" if s.get("ok") else "[red]") + safe(s.get("reason", "")) + "[/]"
                t.add_row(
                    safe(f"{s['kind']} {s['name']}"),
                    s["version"][:12],
                    safe(who) if s["signed"] else who,
                    check if s["signed"] else "-",
                )
            console.print(t)
    elif signatures:
        raise MaskstoreError("--signatures is for repositories: a bundle has no signed refs")
    else:
        b = open_bundle(bundle)
        with progress(disable=json_out) as bar:
            task = bar.add_task("verifying", total=len(b.personas))
            problems = b.verify(progress=lambda d, t: bar.update(task, completed=d, total=t))
        leftovers = b.leftovers()
        what = f"every digest matches ({len(b.personas)} personas)"
    if json_out:
        emit_json(
            {"path": str(bundle), "ok": not problems, "problems": problems, "leftovers": leftovers}
        )
    else:
        for line in problems:
            err_console.print(f"[red]damaged:[/] {safe(line)}", highlight=False)
        for line in leftovers:
            err_console.print(f"[yellow]leftover:[/] {safe(line)} (maskstore gc removes it)")
        if not problems:
            console.print(f"[green]ok[/] {safe(str(bundle))}: {what}")
    if problems:
        raise typer.Exit(1)


def _count(refs: list[algebra.Ref], quiet: bool = False) -> list[algebra.ModuleCounts]:
    modules = algebra.check_compatible(refs)
    with progress(disable=quiet) as bar:
        task = bar.add_task("comparing", total=len(modules))
        return algebra.count_all(
            refs, modules, progress=lambda d, t: bar.update(task, completed=d, total=t)
        )


@app.command()
def overlap(
    bundle: BundleArg,
    personas: Annotated[list[str] | None, typer.Argument(help="NAME or OTHER_BUNDLE#NAME")] = None,
    by: Annotated[
        choice("model", "kind", "layer", "module"),
        typer.Option(help="one table for the model, or per kind, layer or module"),
    ] = "model",
    metric: Annotated[
        choice(*algebra.METRICS), typer.Option(help="what the table shows")
    ] = "jaccard",
    png: Annotated[
        Path | None, typer.Option(help="also draw a pair x layer heatmap to this PNG")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """All-pairs overlap matrix of personas, as a heatmap table (colours fitted to the data)."""
    from ._plots import check_png

    check_png(png)
    if by not in algebra.GROUPINGS:
        raise MaskstoreError(f"unknown --by {by!r}: use one of {', '.join(algebra.GROUPINGS)}")
    if metric not in algebra.METRICS:
        raise MaskstoreError(
            f"unknown --metric {metric!r}: use one of {', '.join(algebra.METRICS)}"
        )
    refs = persona_refs(bundle, personas_of(personas))
    if len(refs) < 2:
        raise MaskstoreError("overlap needs at least two personas")
    counts = _count(refs, json_out)
    pairs = algebra.pairs_report(refs, counts, by=by)
    key = algebra.metric_name(metric)
    if png is not None:
        from ._plots import overlap_heatmap

        per_layer = algebra.pairs_report(refs, counts, by="layer")
        layers = sorted(per_layer[0]["groups"], key=lambda k: int(k) if k.isdigit() else -1)
        overlap_heatmap(
            [f"{p['a']} vs {p['b']}" for p in per_layer],
            layers,
            [[p["groups"][g][key] for g in layers] for p in per_layer],
            key,
            png,
        )
    if json_out:
        emit_json({"by": by, "metric": metric, "personas": [r.label for r in refs], "pairs": pairs})
        return
    if by == "model":  # the persona x persona matrix
        shown = [p[key] for p in pairs]  # the colour scale spans the values on screen
        t = Table(title=key)
        t.add_column("")
        for r in refs:
            t.add_column(safe(r.label), justify="right")
        lookup = {}
        for p in pairs:
            lookup[(p["a"], p["b"])] = lookup[(p["b"], p["a"])] = p[key]
        for r in refs:
            cells = [
                "[dim]-[/]"
                if r.label == c.label
                else heat(lookup[(r.label, c.label)], key, min(shown), max(shown))
                for c in refs
            ]
            t.add_row(safe(r.label), *cells)
    else:  # one table: a row per kind, layer or module, a column per pair
        groups = list(algebra.aggregate(counts, by))
        shown = [p["groups"][g][key] for p in pairs for g in groups]
        t = Table(title=f"{key} by {by}")
        t.add_column(by)
        for p in pairs:
            t.add_column(f"{safe(p['a'])} vs {safe(p['b'])}", justify="right", overflow="fold")
        for g in groups:
            cells = [heat(p["groups"][g][key], key, min(shown), max(shown)) for p in pairs]
            t.add_row(safe(g), *cells)
    console.print(t)
    if png is not None:
        console.print(f"heatmap written to {safe(png)}")


_DiffAOpt = Annotated[
    str,
    typer.Argument(help="persona A (NAME or OTHER_BUNDLE#NAME); with --versions, version B"),
]
_DiffVersionsOpt = Annotated[
    bool, typer.Option("--versions", help="compare two versions of a repository")
]
_DiffRepoOpt = Annotated[
    Path, typer.Option("--repo", envvar="MASKSTORE_REPO", help="repository for --versions")
]
_DiffPngOpt = Annotated[
    Path | None,
    typer.Option(help="also plot the per-layer ratio, attention against MLP, to this PNG"),
]


@app.command()
def diff(
    bundle: Annotated[str, typer.Argument(help="bundle (or REPO@REF); with --versions, version A")],
    a: _DiffAOpt,
    b: Annotated[str | None, typer.Argument(help="persona B")] = None,
    versions: _DiffVersionsOpt = False,
    repo: _DiffRepoOpt = Path(".maskstore"),
    png: _DiffPngOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Differential ratio of two personas: overall, attention, MLP and per layer (Table 2); or,
    with --versions, which personas and modules changed between two versions and by how much."""
    from ._plots import check_png

    check_png(png)
    if versions:
        from maskstore.repo import open_repo

        if b is not None:
            raise MaskstoreError("diff --versions takes two versions: diff --versions V1 V2")
        _version_diff(open_repo(repo).diff(bundle, a), json_out)
        return
    if b is None:
        raise MaskstoreError("diff needs a bundle and two personas: diff BUNDLE A B")

    refs = persona_refs(bundle, [a, b])
    counts = _count(refs, json_out)
    rec = algebra.pairs_report(refs, counts, by="kind")[0]
    layers = algebra.pairs_report(refs, counts, by="layer")[0]["groups"]
    rec["layers"] = layers
    if png is not None:
        from ._plots import diff_by_layer

        series = {}
        for kind in ("attn", "mlp"):
            sub = [c for c in counts if c.kind == kind]
            if sub:
                series[kind] = {
                    layer: algebra.pair_metrics(int(m[0, 0]), int(m[1, 1]), int(m[0, 1]), t)[
                        "diff_ratio"
                    ]
                    for layer, (t, m) in algebra.aggregate(sub, "layer").items()
                }
        diff_by_layer(series, f"{a} vs {b}: differential ratio by layer", png)
    if json_out:
        emit_json(rec)
        return
    t = Table(
        title=f"{safe(a)} vs {safe(b)}: differential ratio (share of positions where the masks differ)"
    )
    t.add_column("part")
    t.add_column("diff ratio", justify="right")
    t.add_column("jaccard", justify="right")
    t.add_column("positions", justify="right")
    t.add_row(
        "[bold]overall[/]",
        heat(rec["diff_ratio"], "diff_ratio"),
        f"{rec['jaccard']:.4f}",
        f"{rec['total']:,}",
    )
    for k in ("attn", "mlp", "other"):
        if k in rec["groups"]:
            g = rec["groups"][k]
            t.add_row(
                k, heat(g["diff_ratio"], "diff_ratio"), f"{g['jaccard']:.4f}", f"{g['total']:,}"
            )
    console.print(t)
    lt = Table(title="per layer")
    lt.add_column("layer", justify="right")
    lt.add_column("diff ratio", justify="right")
    lt.add_column("jaccard", justify="right")
    ratios = [g["diff_ratio"] for g in layers.values()]
    for k, g in layers.items():
        lt.add_row(
            k, heat(g["diff_ratio"], "diff_ratio", min(ratios), max(ratios)), f"{g['jaccard']:.4f}"
        )
    console.print(lt)
    if png is not None:
        console.print(f"figure written to {safe(png)}")


def _version_diff(d: dict, json_out: bool) -> None:
    if json_out:
        emit_json(d)
        return
    console.print(f"{d['a'][:12]} -> {d['b'][:12]}")
    for p in d["added"]:
        console.print(f"  [green]+ {safe(p)}[/]")
    for p in d["removed"]:
        console.print(f"  [red]- {safe(p)}[/]")
    for p in d["unchanged"]:
        console.print(f"  [dim]= {safe(p)}[/]")
    if d["changed"]:
        t = Table("persona", "modules changed", "diff ratio (changed modules)")
        for p, rec in d["changed"].items():
            ratio = rec.get("diff_ratio_changed_modules")
            t.add_row(
                safe(p), str(rec["modules_changed"]), "-" if ratio is None else f"{ratio:.4f}"
            )
        console.print(t)


def _op_command(op: str, doc: str):
    def cmd(
        bundle: WritableBundleArg,
        operands: Annotated[
            list[str], typer.Argument(help="personas: NAME, or OTHER_BUNDLE#NAME of the same model")
        ],
        as_: Annotated[str, typer.Option("--as", help="name of the new persona")],
        force: Annotated[
            bool, typer.Option(help="replace an existing persona of that name")
        ] = False,
        json_out: JsonOpt = False,
        at_least: Annotated[
            int | None, typer.Option(help="vote: keep a weight where K operands keep it")
        ] = None,
    ) -> None:
        b = open_bundle(bundle, writable=True)
        ops = [persona_refs(bundle, [o])[0] if "#" in o else o for o in operands]
        meta = algebra.apply_op(b, op, ops, as_, overwrite=force, at_least=at_least)
        kept = sum(e["kept"] for e in meta["modules"].values())
        numel = sum(b.modules[m].numel for m in meta["modules"])
        if json_out:
            emit_json(
                {
                    "persona": as_,
                    "op": op,
                    "operands": operands,
                    "kept": kept,
                    "total": numel,
                    "digest": meta["digest"],
                }
            )
        else:
            console.print(
                f"wrote persona [bold]{safe(as_)}[/] = {op}({safe(', '.join(operands))}): kept {kept / numel:.4f} of {numel:,} weights"
            )

    cmd.__doc__ = doc
    app.command(op)(cmd)


_op_command("union", "Write A or B (or more) as a new persona.")
_op_command("intersect", "Write A and B (and more) as a new persona.")
_op_command("subtract", "Write A minus B as a new persona.")
_op_command("xor", "Write A xor B as a new persona.")
_op_command("complement", "Write not A as a new persona.")
_op_command("vote", "Write the weights at least K of the personas keep (--at-least K).")


@app.command()
def blend(
    bundle: WritableBundleArg,
    weights: Annotated[list[str], typer.Argument(help="NAME=WEIGHT for each persona (sum 1)")],
    as_: Annotated[str, typer.Option("--as", help="name of the new persona")],
    force: Annotated[bool, typer.Option(help="replace an existing persona of that name")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Store the weighted soft combination G = sum w_p G_p as a persona (run/attach apply it
    by name, like PEFT's add_weighted_adapter)."""
    parsed: dict[str, float] = {}
    for spec in weights:
        name, sep, w = spec.rpartition("=")
        if name in parsed:
            raise MaskstoreError(f"{name!r} is given twice: give each persona one weight")
        try:
            parsed[name] = float(w)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise MaskstoreError(f"blend takes NAME=WEIGHT, got {spec!r} (e.g. introvert=0.7)")
    b = open_bundle(bundle, writable=True)
    meta = algebra.blend(b, parsed, as_, overwrite=force)
    kept = sum(e["kept"] for e in meta["modules"].values())
    numel = sum(b.modules[m].numel for m in meta["modules"])
    if json_out:
        emit_json(
            {
                "persona": as_,
                "op": "blend",
                "operands": list(parsed),
                "weights": parsed,
                "kept": kept,
                "total": numel,
                "digest": meta["digest"],
            }
        )
        return
    mix = " + ".join(f"{w:g}*{safe(n)}" for n, w in parsed.items())
    console.print(
        f"wrote persona [bold]{safe(as_)}[/] = {mix}: some operand keeps {kept / numel:.4f} of "
        f"{numel:,} weights"
    )


@app.command("import-pt")
def import_pt_cmd(
    src: Annotated[Path, typer.Argument(help="folder of M_{persona}_{module}.pt files")],
    out: Annotated[Path, typer.Option("--out", help="bundle to create")],
    model: Annotated[
        Path | None,
        typer.Option(help="model the masks are for: its fingerprint is recorded (and checked)"),
    ] = None,
    like: Annotated[
        Path | None,
        typer.Option(
            "--like", help="a bundle of the same model: its fingerprint is recorded (no model load)"
        ),
    ] = None,
    architecture: Annotated[
        str, typer.Option(help="architecture recorded when neither --model nor --like is given")
    ] = "imported",
    skip_lm_head: Annotated[
        bool, typer.Option(help="leave out M_*_lm_head.pt files (mask.py writes them)")
    ] = False,
    force: Annotated[bool, typer.Option(help="replace an existing bundle")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Convert the research code's pickled bool tensors into a bundle (weights_only loading)."""
    from maskstore.build.importers import import_pt

    fingerprint = None
    if model is not None and like is not None:
        raise MaskstoreError("give --model or --like, not both")
    if like is not None:
        fingerprint = open_bundle(like).fingerprint
    if model is not None:
        from maskstore.models import load_model
        from maskstore.modules import maskable_modules, model_fingerprint

        with console.status("loading model"):
            mdl, _ = load_model(model)
        mods = maskable_modules(mdl, include_lm_head=not skip_lm_head)
        fingerprint = model_fingerprint(mdl, mods, hash_weights=True)
    names, skipped = import_pt(
        src,
        out,
        architecture=architecture,
        force=force,
        fingerprint=fingerprint,
        skip_lm_head=skip_lm_head,
    )
    if json_out:
        emit_json({"out": str(out), "personas": names, "skipped_lm_head": skipped})
        return
    console.print(f"imported {len(names)} persona(s) into {safe(out)}: {safe(', '.join(names))}")
    if skipped:
        console.print(f"skipped {skipped} lm_head file(s) (--skip-lm-head)")


@app.command("export-pt")
def export_pt_cmd(
    bundle: BundleArg,
    out: Annotated[Path, typer.Option("--out", help="folder to create")],
    persona: Annotated[
        list[str] | None, typer.Option(help="persona to export (repeat, or A,B; default: all)")
    ] = None,
    force: Annotated[bool, typer.Option(help="replace an existing folder")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write personas as the research code's M_{persona}_{module}.pt bool tensors."""
    from maskstore.build.importers import export_pt

    n = export_pt(open_bundle(bundle), out, personas_of(persona), force=force)
    if json_out:
        emit_json({"out": str(out), "files": n})
        return
    console.print(f"wrote {n} file(s) to {safe(out)}")


@app.command()
def pack(
    bundle: BundleArg,
    out: Annotated[Path | None, typer.Argument(help="the .zip to write (or --out)")] = None,
    out_opt: Annotated[Path | None, typer.Option("--out", help="the .zip to write")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing file")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Copy a directory bundle into one read-only .zip bundle."""
    out = one_out(out, out_opt)
    from maskstore.store.writer import pack_zip

    if "://" in bundle:
        raise MaskstoreError(f"{safe(bundle)}: pack copies a folder bundle; check it out first")
    pack_zip(Path(bundle), out, force=force)
    if json_out:
        emit_json({"out": str(out), "bytes": out.stat().st_size})
        return
    console.print(f"wrote {safe(out)} ({fmt_bytes(out.stat().st_size)})")


@app.command()
def cp(
    src: Annotated[str, typer.Argument(help="SOURCE#NAME: a persona of any bundle or version")],
    dest: WritableBundleArg,
    as_: Annotated[str | None, typer.Option("--as", help="name of the copy")] = None,
    force: Annotated[bool, typer.Option(help="replace a persona of that name")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Copy a persona (masks, statistics, metadata; same digest) into a bundle of one model."""
    from maskstore.store.edit import copy_persona

    if "#" not in src:
        raise MaskstoreError(f"cp takes SOURCE#NAME, got {src!r} (e.g. out/b.zarr#introvert)")
    path, name = src.rsplit("#", 1)
    meta = copy_persona(open_bundle(path), name, open_bundle(dest, writable=True), as_,
                        overwrite=force)  # fmt: skip
    _edited(dest, meta["name"], meta["digest"], f"copied {name} from {path}", json_out)


@app.command()
def mv(
    bundle: WritableBundleArg,
    old: Annotated[str, typer.Argument(help="the persona's name")],
    new: Annotated[str, typer.Argument(help="its new name")],
    json_out: JsonOpt = False,
) -> None:
    """Rename a persona in place (same digest)."""
    from maskstore.store.edit import rename_persona

    meta = rename_persona(open_bundle(bundle, writable=True), old, new)
    _edited(bundle, new, meta["digest"], f"renamed {old}", json_out)


@app.command()
def rm(
    bundle: WritableBundleArg,
    persona: Annotated[str, typer.Argument(help="the persona to remove")],
    json_out: JsonOpt = False,
) -> None:
    """Remove a persona from a bundle (refused while a blend combines it)."""
    from maskstore.store.edit import remove_persona

    b = open_bundle(bundle, writable=True)
    digest = b.persona(persona)["digest"]
    remove_persona(b, persona)
    _edited(bundle, persona, digest, "removed", json_out)


def _edited(bundle: Path, persona: str, digest: str, what: str, json_out: bool) -> None:
    if json_out:
        emit_json({"bundle": str(bundle), "persona": persona, "digest": digest})
        return
    console.print(f"{safe(persona)} ({digest[:12]}) in {safe(bundle)}: {safe(what)}")
