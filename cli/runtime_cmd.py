"""``maskstore run``, ``eval`` and ``similarity``: personas in a live model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from maskstore.errors import MaskstoreError
from maskstore.opener import open_bundle

if TYPE_CHECKING:
    from maskstore.runtime import MaskHandle

from ._common import console, emit_json, safe
from .app import JsonOpt, app

ModelOpt = Annotated[
    Path | None, typer.Option(help="local HF model folder (default: embedded SmolLM2-135M)")
]


def _attach(bundle: Path, model: Path | None, device: str = "cpu") -> tuple[MaskHandle, object]:
    from maskstore.models import load_model
    from maskstore.runtime import attach

    b = open_bundle(bundle)
    with console.status("loading model"):
        mdl, tok = load_model(model, device=device)
    return attach(mdl, b), tok


def _generate(handle: MaskHandle, tok, prompt: str, max_new_tokens: int, chat: bool) -> str:
    import torch

    model = handle.model
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    enc = tok(text, return_tensors="pt", add_special_tokens=not chat).to(
        next(model.parameters()).device
    )
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@app.command()
def run(
    bundle: Path,
    prompt: Annotated[str, typer.Option(help="the user prompt")],
    persona: Annotated[
        str | None, typer.Option(help="persona to use (default: base model)")
    ] = None,
    compare: Annotated[
        bool, typer.Option(help="base model and every persona side by side")
    ] = False,
    gamma: Annotated[float, typer.Option(help="soft gate: G = M + gamma (1 - M)")] = 0.0,
    max_new_tokens: Annotated[int, typer.Option()] = 60,
    chat: Annotated[bool, typer.Option(help="wrap the prompt in the chat template")] = True,
    model: ModelOpt = None,
    device: Annotated[str, typer.Option()] = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Generate (greedy) with a persona on, or compare the base model with every persona."""
    if not 0.0 <= gamma <= 1.0:
        raise MaskstoreError(f"--gamma must be in [0, 1], got {gamma}")
    b = open_bundle(bundle)
    names: list[str | None] = [None, *b.personas] if compare else [persona]
    for n in names:
        if n is not None:
            b.persona(n)  # unknown names fail before the model loads
    if max_new_tokens < 1:
        raise MaskstoreError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not prompt.strip():
        raise MaskstoreError("--prompt is empty: give the text to answer")
    handle, tok = _attach(bundle, model, device)
    outputs = {}
    for n in names:
        handle.use(n, gamma)
        outputs[n or "base"] = _generate(handle, tok, prompt, max_new_tokens, chat)
    handle.use(None)
    if json_out:
        emit_json({"prompt": prompt, "gamma": gamma, "outputs": outputs})
        return
    t = Table(title=safe(prompt), show_lines=True)
    t.add_column("persona", style="bold")
    t.add_column("output")
    for k, v in outputs.items():
        t.add_row(safe(k), safe(v))
    console.print(t)


@app.command("eval")
def eval_cmd(
    bundle: Path,
    mc: Annotated[Path, typer.Option(help="CSV with columns question,A,B,matching")],
    key: Annotated[
        str | None,
        typer.Option(help="persona the 'matching' column describes (default: first '+')"),
    ] = None,
    describe: Annotated[
        list[str] | None, typer.Option(help="NAME=TEXT system prompt of the prompt-only baseline")
    ] = None,
    chat: Annotated[bool, typer.Option(help="use the chat template")] = True,
    gamma: Annotated[float, typer.Option()] = 0.0,
    model: ModelOpt = None,
    device: Annotated[str, typer.Option()] = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Persona alignment on a multiple-choice set: masks vs base model vs prompt-only baseline."""
    from maskstore import evaluate

    items = evaluate.read_mc(mc)
    b = open_bundle(bundle)
    metas = {p: b.persona(p) for p in b.personas}
    if key is None:
        key = next((p for p, m in metas.items() if m["params"].get("role") == "+"), None) or (
            b.personas[0] if b.personas else None
        )
    if key not in metas:
        raise MaskstoreError(
            f"--key {key!r} is not a persona of {bundle}; known: {', '.join(metas)}"
        )
    opposite = metas[key]["params"].get("opposite")
    descr = {
        p: f"You are {'an' if p[:1].lower() in 'aeiou' else 'a'} {p} person. Answer as one."
        for p in metas
    }
    for d in describe or []:
        if "=" not in d:
            raise MaskstoreError(f"--describe {d!r}: write it as NAME=TEXT")
        n, text = d.split("=", 1)
        descr[n] = text
    keys_for = {key: [it.matching for it in items]}
    if opposite in metas:
        keys_for[opposite] = [it.flipped() for it in items]
    handle, tok = _attach(bundle, model, device)
    rows = []
    handle.use(None)
    ll = evaluate.answer_logliks(handle.model, tok, items, chat=chat)
    rows.append(
        {"setting": "base model", "persona": key, "accuracy": evaluate.accuracy(ll, keys_for[key])}
    )
    for p, keys in keys_for.items():
        ll = evaluate.answer_logliks(handle.model, tok, items, system=descr[p], chat=chat)
        rows.append(
            {"setting": "prompt only", "persona": p, "accuracy": evaluate.accuracy(ll, keys)}
        )
    for p, keys in keys_for.items():
        handle.use(p, gamma)
        ll = evaluate.answer_logliks(handle.model, tok, items, chat=chat)
        rows.append({"setting": "mask", "persona": p, "accuracy": evaluate.accuracy(ll, keys)})
    handle.use(None)
    others = [p for p in metas if p not in keys_for]
    if json_out:
        emit_json({"items": len(items), "key": key, "rows": rows, "unkeyed": others})
        return
    t = Table(title=f"persona alignment on {safe(mc.name)} ({len(items)} items; key: {safe(key)})")
    for c in ("setting", "persona", "accuracy"):
        t.add_column(c, justify="right" if c == "accuracy" else "left")
    for r in rows:
        t.add_row(r["setting"], safe(r["persona"]), f"{r['accuracy']:.3f}")
    console.print(t)
    if others:
        console.print(f"[dim]not scored (no key for them): {safe(', '.join(others))}[/]")


@app.command()
def similarity(
    bundle: Path,
    a: str,
    b: str,
    texts: Annotated[Path, typer.Option(help="text file, one input per line")],
    png: Annotated[
        Path | None, typer.Option(help="also plot to this PNG (needs matplotlib)")
    ] = None,
    limit: Annotated[int, typer.Option(help="at most this many lines")] = 64,
    model: ModelOpt = None,
    device: Annotated[str, typer.Option()] = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Per-layer cosine similarity of hidden states under personas A and B (paper, sec. 3.4)."""
    from maskstore.calibration import read_samples

    lines = [s.text for s in read_samples(texts)][:limit]
    bnd = open_bundle(bundle)
    bnd.persona(a), bnd.persona(b)
    from maskstore import evaluate

    handle, tok = _attach(bundle, model, device)
    cos = evaluate.layer_cosine(handle, tok, lines, a, b)
    if png is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise MaskstoreError("--png needs matplotlib: pip install 'maskstore[plot]'") from None
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(range(len(cos)), cos, marker="o")
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel("mean cosine similarity")
        ax.set_title(f"hidden states: {a} vs {b}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        plt.close(fig)
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
