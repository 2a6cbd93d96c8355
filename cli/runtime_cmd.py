"""``maskstore run``, ``eval`` and ``similarity``: personas in a live model."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from maskstore.errors import MaskstoreError
from maskstore.store.opener import open_bundle

if TYPE_CHECKING:
    from maskstore.runtime import MaskHandle

from ._common import (
    check_output,
    console,
    emit_json,
    err_console,
    persona_refs,
    personas_of,
    safe,
    write_output,
)
from .app import BundleArg, DeviceOpt, JsonOpt, ModelOpt, app, choice

RevisionOpt = Annotated[
    str | None, typer.Option(help="with a Hub id: branch, tag or commit (default: recorded)")
]
LoadDtypeOpt = Annotated[
    choice("float32", "bfloat16", "float16"),
    typer.Option("--dtype", help="dtype to load the model in"),
]


UntieOpt = Annotated[
    bool, typer.Option(help="give a masked lm_head tied to the embeddings its own weight copy")
]
CheckOpt = Annotated[
    bool,
    typer.Option(help="compare the model's weights with the hash the bundle recorded"),
]


def _attach(
    bundle: str | Path,
    model: str | None,
    device: str = "cpu",
    untie: bool = False,
    check_weights: bool = True,
    quiet: bool = False,
    revision: str | None = None,
    dtype: str = "float32",
) -> tuple[MaskHandle, object]:
    from maskstore.models import load_model, recorded_model
    from maskstore.runtime import attach

    b = open_bundle(bundle)
    name, revision = recorded_model(b.model_source, model, revision)
    with console.status("loading model"):
        mdl, tok = load_model(name, dtype=dtype, device=device, revision=revision)
    if not quiet:  # which model: said on stderr (never under --json)
        err_console.print(
            f"model: {safe(name or 'embedded SmolLM2-135M-Instruct')}", highlight=False
        )
    return attach(mdl, b, untie=untie, check_weights=None if check_weights else False), tok


@contextmanager
def _gathered(bundle: str | Path, specs: list[str]) -> Iterator[tuple[Path, dict[str, str]]]:
    """The bundle to attach and each persona argument's name in it: with ``OTHER_BUNDLE#NAME``
    arguments, every named persona is copied into a temporary bundle of the same model (masks
    only). Every name is checked before the model loads."""
    refs = persona_refs(bundle, specs)
    if not any("#" in s for s in specs):
        yield bundle, {s: s for s in specs}
        return
    from maskstore.compare import algebra

    with tempfile.TemporaryDirectory(prefix="maskstore-") as tmp:
        out = Path(tmp) / "gathered.zarr"
        names = algebra.gather(refs, out)
        yield out, dict(zip(specs, names, strict=True))


def _writable(path: Path | None, flag: str) -> None:
    """Fail before any compute when an output file cannot be written where asked."""
    check_output(path, flag)


@app.command()
def run(
    bundle: BundleArg,
    prompt: Annotated[str, typer.Option(help="the user prompt")],
    persona: Annotated[
        list[str] | None,
        typer.Option(
            help="persona to use (default: base model); with --compare, several (repeat, or A,B)"
        ),  # fmt: skip
    ] = None,
    compare: Annotated[
        bool,
        typer.Option(
            help="base model and --persona (A,B,...; default: every built one) side by side"
        ),
    ] = False,
    all_personas: Annotated[
        bool, typer.Option("--all", help="with --compare, also personas made by set operations")
    ] = False,
    gamma: Annotated[float, typer.Option(help="soft gate: G = M + gamma (1 - M)")] = 0.0,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate per persona")] = 60,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat-template/--no-chat-template",
            "--chat/--no-chat",
            help="wrap the prompt in the chat template",
        ),
    ] = True,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    load_dtype: LoadDtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    untie: UntieOpt = False,
    check_weights: CheckOpt = True,
    json_out: JsonOpt = False,
) -> None:
    """Generate (greedy) with a persona on, or compare the base model with every persona."""
    if not 0.0 <= gamma <= 1.0:
        raise MaskstoreError(f"--gamma must be in [0, 1], got {gamma}")
    from maskstore.compare.evaluate import check_generation, compared_personas
    from maskstore.compare.evaluate import compare as compare_all

    check_generation(prompt, max_new_tokens)
    b = open_bundle(bundle)
    chosen = personas_of(persona)
    if compare:  # the base model and the named persona(s), else every persona built or imported
        names: list[str | None] = [None, *(chosen or compared_personas(b, all_personas))]
    elif chosen and len(chosen) > 1:
        raise MaskstoreError("run takes one --persona (or several with --compare)")
    else:
        names = [chosen[0] if chosen else None]
    from ._common import progress

    with _gathered(bundle, [n for n in names if n is not None]) as (path, local):
        handle, tok = _attach(path, model, device, untie, check_weights, quiet=json_out,
                              revision=revision, dtype=load_dtype)  # fmt: skip
        with progress(disable=json_out) as bar:
            task = bar.add_task("generating", total=len(names))
            answers = compare_all(handle, tok, prompt, [local[n] if n else None for n in names],
                                  gamma, max_new_tokens, chat,
                                  progress=lambda done, _t: bar.update(task, completed=done))  # fmt: skip
        outputs = {(n or "base"): text for n, (_, text) in zip(names, answers, strict=True)}
    if json_out:
        emit_json({"prompt": prompt, "gamma": gamma, "outputs": outputs})
        return
    t = Table(title=safe(prompt), show_lines=True)
    t.add_column("persona", style="bold")
    t.add_column("output")
    for k, v in outputs.items():
        t.add_row(safe(k), safe(v))
    console.print(t)


def _beside(name: str, opposite: object, metas: dict[str, dict]) -> str | None:
    """The persona named ``opposite`` in ``name``'s own bundle (``SRC#opposite`` for a
    persona given as ``SRC#name``), if it is scored."""
    if not isinstance(opposite, str):
        return None
    src = name.rsplit("#", 1)[0] + "#" if "#" in name else ""
    return src + opposite if src + opposite in metas else None


def _keys(
    metas: dict[str, dict], specs: list[str], bundle: str | Path, explicit: bool = False
) -> dict[str, bool]:
    """persona -> True if the MC file's ``matching`` column is its answer, False if the other.

    Every pair recorded in a scored persona's own bundle keys both (the ``+`` persona matches,
    its opposite does not); ``--key P`` / ``P=matching`` / ``P=not_matching`` sets the personas
    it names and no others (one key alone: its recorded opposite takes the other answer).
    ``explicit``: the personas were named, so each must end with a key (checked here, before
    any model loads)."""
    out: dict[str, bool] = {}
    for p, m in metas.items():
        if m["params"].get("role") == "+":
            opp = _beside(p, m["params"].get("opposite"), metas)
            if opp is not None:
                out[p], out[opp] = True, False
    given: dict[str, bool] = {}
    for spec in specs:
        name, _, role = spec.partition("=")
        role = role or "matching"
        if role not in ("matching", "not_matching"):
            raise MaskstoreError(f"--key {spec!r}: write PERSONA=matching or PERSONA=not_matching")
        if name not in metas:
            raise MaskstoreError(
                f"--key {name!r} is not a persona being scored; scored: {', '.join(metas)}"
            )
        given[name] = role == "matching"
    if len(given) == 1:  # one key given: its recorded opposite takes the other answer
        (name, matches), *_ = given.items()
        opp = _beside(name, metas[name]["params"].get("opposite"), metas)
        if opp is not None:
            given[opp] = not matches
    out.update(given)
    if not out:
        raise MaskstoreError(
            f"{bundle} records no pair roles, so the 'matching' column names nobody: "
            "pass --key PERSONA=matching (and --key OTHER=not_matching)"
        )
    missing = [p for p in metas if p not in out]
    if explicit and missing:
        raise MaskstoreError(
            f"no key for {', '.join(missing)} (no recorded pair): pass --key "
            f"{missing[0]}=matching or =not_matching"
        )
    return out


_EvalCmdKeyOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="PERSONA=matching or PERSONA=not_matching (default: the bundle's pair roles)"
    ),
]
_EvalCmdPersonaOpt = Annotated[
    list[str] | None,
    typer.Option(help="persona to score, NAME or OTHER_BUNDLE#NAME (repeat, or A,B; default: all)"),
]
_EvalCmdDescribeOpt = Annotated[
    list[str] | None,
    typer.Option(help="NAME=TEXT: persona system prompt of the prompt rows"),
]
_EvalCmdSystemPromptOpt = Annotated[
    str | None,
    typer.Option(help="system prompt of the base and mask rows (default: none given)"),
]
_EvalCmdTemplateOpt = Annotated[
    str,
    typer.Option(
        help="chat (tokenizer's template), none, llama2 (reference code), or a format "
        "string with {question} and {system}"
    ),
]
_EvalCmdChatOpt = Annotated[
    bool,
    typer.Option(
        "--chat-template/--no-chat-template",
        "--chat/--no-chat",
        help="--no-chat-template means --template none",
    ),
]
_EvalCmdPerItemOpt = Annotated[
    Path | None, typer.Option(help="write one JSON line per item and row to this file")
]


@app.command("eval")
def eval_cmd(
    bundle: BundleArg,
    mc: Annotated[Path, typer.Option(help="CSV with columns question,A,B,matching")],
    key: _EvalCmdKeyOpt = None,
    persona: _EvalCmdPersonaOpt = None,
    describe: _EvalCmdDescribeOpt = None,
    system_prompt: _EvalCmdSystemPromptOpt = None,
    template: _EvalCmdTemplateOpt = "chat",
    chat: _EvalCmdChatOpt = True,
    gamma: Annotated[float, typer.Option(help="soft gate: G = M + gamma (1 - M)")] = 0.0,
    per_item: _EvalCmdPerItemOpt = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    load_dtype: LoadDtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    untie: UntieOpt = False,
    check_weights: CheckOpt = True,
    json_out: JsonOpt = False,
) -> None:
    """Persona alignment on a multiple-choice set: base model, persona prompt, masks, and masks
    plus prompt, with summed and length-normalised accuracy and 95% intervals."""
    import json

    from maskstore.compare import evaluate

    from ._common import progress

    if not 0.0 <= gamma <= 1.0:
        raise MaskstoreError(f"--gamma must be in [0, 1], got {gamma}")
    if not chat and template == "chat":
        template = "none"
    evaluate.check_template(template)
    _writable(per_item, "--per-item")
    items = evaluate.read_mc(mc)
    specs = list(personas_of(persona) or open_bundle(bundle).personas)
    with _gathered(bundle, specs) as (path, local):  # OTHER_BUNDLE#NAME: copied in first
        b = open_bundle(path)
        shown = {v: k for k, v in local.items()}  # local name -> the name as given
        metas = {shown[p]: b.persona(p) for p in b.personas if p in shown}
        matches = _keys(metas, key or [], bundle, explicit=bool(persona))
        descr = {}
        for d in describe or []:
            if "=" not in d:
                raise MaskstoreError(f"--describe {d!r}: write it as NAME=TEXT")
            n, text = d.split("=", 1)
            descr[n] = text
        keys_for = {local[p]: [it.matching if m else it.flipped() for it in items]
                    for p, m in matches.items()}  # fmt: skip
        descr = {local.get(n, n): t for n, t in descr.items()}
        for spec, name in local.items():  # prompt rows name the persona as the user did, never
            descr.setdefault(name, evaluate.describe(spec.rsplit("#", 1)[-1]))  # a gathered label
        handle, tok = _attach(path, model, device, untie, check_weights, quiet=json_out,
                              revision=revision, dtype=load_dtype)  # fmt: skip
        with progress(disable=json_out) as bar:
            task = bar.add_task("evaluating", total=None)
            res = evaluate.protocol(handle, tok, items, keys_for, descr, system_prompt, template,
                                    gamma, lambda d, t: bar.update(task, completed=d, total=t))  # fmt: skip
        handle.detach()
    rows = [r | {"persona": shown.get(r["persona"], r["persona"])} for r in res["rows"]]
    res["system_prompts"] = {
        (f"prompt:{shown.get(k[7:], k[7:])}" if k.startswith("prompt:") else k): v
        for k, v in res["system_prompts"].items()
    }
    keys_for = {shown.get(p, p): v for p, v in keys_for.items()}
    if per_item is not None:
        recs = [r | {"persona": shown.get(r["persona"], r["persona"])} for r in res["records"]]
        write_output(per_item, "".join(json.dumps(r) + "\n" for r in recs).encode(),
                     "--per-item")  # fmt: skip
    _print_eval(res, rows, items, matches, keys_for, metas, template, system_prompt, mc,
                per_item, json_out)  # fmt: skip


@app.command()
def similarity(
    bundle: BundleArg,
    a: Annotated[str, typer.Argument(help='persona A ("base" for the unmasked model)')],
    b: Annotated[str, typer.Argument(help="persona B")],
    texts: Annotated[Path, typer.Option(help="text file, one input per line")],
    png: Annotated[
        Path | None, typer.Option(help="also plot to this PNG (needs matplotlib)")
    ] = None,
    limit: Annotated[
        int, typer.Option("--samples", "--limit", help="at most this many lines")
    ] = 64,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    load_dtype: LoadDtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    untie: UntieOpt = False,
    check_weights: CheckOpt = True,
    json_out: JsonOpt = False,
) -> None:
    """Per-layer cosine similarity of hidden states under personas A and B (paper, sec. 3.4)."""
    from maskstore.build.calibration import read_samples

    _writable(png, "--png")
    lines = [s.text for s in read_samples(texts)][:limit]
    from maskstore.compare import evaluate

    from ._common import progress

    with _gathered(bundle, [a, b]) as (path, local):
        handle, tok = _attach(path, model, device, untie, check_weights, quiet=json_out,
                              revision=revision, dtype=load_dtype)  # fmt: skip
        with progress(disable=json_out) as bar:
            task = bar.add_task("comparing hidden states", total=len(lines))
            cos = evaluate.layer_cosine(
                handle,
                tok,
                lines,
                local[a],
                local[b],
                progress=lambda d, t: bar.update(task, completed=d, total=t),
            )
    if png is not None:
        from ._plots import cosine_by_layer

        cosine_by_layer(cos, a, b, png)
    if json_out:
        emit_json({"a": a, "b": b, "texts": len(lines), "layers": cos})
        return
    t = Table(
        title=f"cosine similarity of hidden states, {safe(a)} vs {safe(b)} ({len(lines)} texts)"
    )
    t.add_column("layer", justify="right")
    t.add_column("cosine", justify="right")
    for i, c in enumerate(cos):
        t.add_row("emb" if i == 0 else str(i), f"{c:.4f}")
    console.print(t)
    if png is not None:
        console.print(f"plot written to {safe(png)}")


@app.command("export-model")
def export_model_cmd(
    bundle: BundleArg,
    persona: Annotated[str, typer.Argument(help="the persona to apply (or OTHER_BUNDLE#NAME)")],
    out: Annotated[Path, typer.Option("--out", help="checkpoint folder to create")],
    gamma: Annotated[float, typer.Option(help="soft gate: G = M + gamma (1 - M)")] = 0.0,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    untie: UntieOpt = False,
    check_weights: CheckOpt = True,
    force: Annotated[bool, typer.Option(help="replace an existing folder")] = False,
    format: Annotated[
        choice("safetensors", "compressed-tensors"),
        typer.Option(
            "--format",
            help="dense safetensors (from_pretrained loads it), or the legacy sparse-bitmask layout of compressed-tensors <= 0.14 (--gamma 0)",
        ),
    ] = "safetensors",
    dtype: Annotated[
        choice("float32", "bfloat16", "float16") | None,
        typer.Option(help="dtype of the written weights (default: the model's)"),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write the model with a persona applied as a standalone Hugging Face checkpoint (its
    provenance in config.json under 'maskstore' and in a model card README.md)."""
    from maskstore.serve.export import export_model

    if not 0.0 <= gamma <= 1.0:
        raise MaskstoreError(f"--gamma must be in [0, 1], got {gamma}")
    if "#" in persona:  # OTHER_BUNDLE#NAME: that bundle's persona
        bundle, persona = persona.rsplit("#", 1)
    if format == "compressed-tensors" and gamma != 0:
        raise MaskstoreError(
            "--format compressed-tensors stores pruned weights as zeros: use --gamma 0"
        )
    from maskstore.store.writer import check_output_folder

    b = open_bundle(bundle)
    b.persona(persona)
    check_output_folder(out, force, protect=(bundle,) if Path(str(bundle)).exists() else ())
    handle, tok = _attach(
        bundle, model, "cpu", untie, check_weights, quiet=json_out, revision=revision
    )
    handle.detach()
    version = getattr(getattr(b, "source", None), "version", None)
    export_model(
        handle.model, tok, b, persona, out, gamma, check_weights=False, untie=untie, force=force,
        format=format, dtype=dtype, version=version if isinstance(version, str) else None,
    )  # fmt: skip
    if json_out:
        emit_json({"out": str(out), "persona": persona, "gamma": gamma, "format": format})
        return
    console.print(f"wrote {safe(out)}: {safe(persona)} applied (gamma {gamma:g})")


def _print_eval(res, rows, items, matches, keys_for, metas, template, system_prompt, mc,
                per_item, json_out) -> None:  # fmt: skip
    """The eval document or table, the prompts used, and the small-sample warning."""
    others = [p for p in metas if p not in keys_for]
    too_few = res["min_p"] >= 0.05
    if json_out:
        emit_json(
            {
                "items": len(items),
                "keys": {p: "matching" if m else "not_matching" for p, m in matches.items()},
                "template": template,
                "system_prompts": res["system_prompts"],
                "min_p": res["min_p"],
                "rows": rows,
                "unkeyed": others,
            }
        )
        return
    # readable at 80 columns: short headers (a legend below), no box, numbers never wrapped or
    # cut; only the persona column folds
    t = Table(title=f"persona alignment on {safe(mc.name)} ({len(items)} items)",
              box=None, pad_edge=False, title_justify="left")  # fmt: skip
    t.add_column("setting", no_wrap=True)
    t.add_column("persona", overflow="fold", min_width=8)
    for c in ("acc", "95% CI", "Δ base", "p", "norm", "95% CI "):
        t.add_column(c, justify="right", no_wrap=True)
    for r in rows:
        lo, hi = r["accuracy_ci95"]
        nlo, nhi = r["accuracy_norm_ci95"]
        base = r["setting"] == "base"
        t.add_row(
            r["setting"],
            safe(r["persona"]),
            f"{r['accuracy']:.3f}",
            f"{lo:.2f}-{hi:.2f}",
            "-" if base else f"{r['delta_vs_base']:+.3f}",
            "-" if base else f"{r['p_vs_base']:.3f}",
            f"{r['accuracy_norm']:.3f}",
            f"{nlo:.2f}-{nhi:.2f}",
        )
    console.print(t)
    console.print("acc: share of items answered as the key (summed log-probability); norm: the "
                  "same, length-normalised; Δ base and p: against the base row (exact McNemar)",
                  highlight=False)  # fmt: skip
    console.print(f"template: {safe(template)}; system prompt of base and mask rows: "
                  f"{safe(repr(system_prompt))}", highlight=False)  # fmt: skip
    for p in keys_for:
        console.print(f"prompt rows of {safe(p)}: {safe(repr(res['system_prompts'][f'prompt:{p}']))}",
                      highlight=False)  # fmt: skip
    weak = [r for r in rows if r.get("items_needed")]
    for r in weak:
        console.print(f"{r['setting']} {safe(r['persona'])}: Δ {r['delta_vs_base']:+.3f} is not "
                      f"significant (p {r['p_vs_base']:.3f}); a difference this size needs about "
                      f"{r['items_needed']} items for p < 0.05", highlight=False)  # fmt: skip
    if too_few:
        console.print(
            f"[yellow]with {len(items)} items no difference can be significant (the smallest "
            f"possible p is {res['min_p']:.3f}); use at least 6, and many more to detect small "
            "effects[/]"
        )
    if others:
        console.print(f"[dim]not scored (no key for them): {safe(', '.join(others))}[/]")
    if per_item is not None:
        console.print(f"per-item results written to {safe(per_item)}")
