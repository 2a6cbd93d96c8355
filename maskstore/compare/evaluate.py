"""Does a persona work? Multiple-choice alignment and hidden-state similarity (arXiv 2602.07164).

* :func:`answer_logliks`: for each item, the log-likelihood of each answer's tokens given the
  rendered question (a chat template, the reference code's Llama-2 markup, or a format string);
  :func:`summarise` gives summed and length-normalised accuracy with 95% Wilson intervals.
* :func:`layer_cosine`: per layer, the mean cosine similarity of hidden states under two
  personas on the same inputs (section 3.4).
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..build.calibration import read_csv_rows
from ..errors import MaskstoreError
from ..progress import Progress, counter
from ..runtime import MaskHandle


@dataclass
class MCItem:
    question: str
    a: str
    b: str
    matching: str  # "A" or "B": the answer of the persona the file is keyed to

    def flipped(self) -> str:
        return "B" if self.matching == "A" else "A"


def read_mc(path: str | Path) -> list[MCItem]:
    """Items from a CSV with columns ``question,A,B,matching`` (matching is A or B)."""
    path = Path(path)
    rows = read_csv_rows(path, "multiple-choice file")
    need = {"question", "A", "B", "matching"}
    if not rows:
        raise MaskstoreError(f"{path} holds no items: one row each, columns question,A,B,matching")
    if not need <= set(rows[0]):
        have = ",".join(rows[0])
        raise MaskstoreError(f"{path}: needs columns question,A,B,matching; found {have}")
    items = []
    for i, r in enumerate(rows, 2):
        vals = [(r.get(k) or "").strip() for k in ("question", "A", "B", "matching")]
        if not all(vals):
            raise MaskstoreError(
                f"{path}:{i}: empty field; every row needs question, A, B, matching"
            )
        m = vals[3].upper()
        if m not in ("A", "B"):
            raise MaskstoreError(f"{path}:{i}: matching must be A or B, got {vals[3]!r}")
        items.append(MCItem(vals[0], vals[1], vals[2], m))
    return items


TEMPLATES = {
    # the paper's reference code (contra.py): Llama-2 chat markup around "{question}\n\nAnswer:"
    "llama2": "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{question}\n\nAnswer: [/INST]",
}


def check_template(template: str) -> None:
    """``chat``, ``none``, a named template (``llama2``), or a format string whose only fields
    are ``{question}`` (required) and ``{system}``."""
    if template in ("chat", "none") or template in TEMPLATES:
        return
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise MaskstoreError(f"`template` {template!r} is not a format string: {e}") from None
    if "question" not in fields or not fields <= {"question", "system"}:
        raise MaskstoreError(
            f"`template` {template!r}: use chat, none, llama2, or a format string with "
            "{question} and optionally {system}"
        )


def render(tok, question: str, system: str | None, template: str = "chat") -> str:
    """The context before an answer.

    Args:
        system: the system prompt; None leaves it out (a chat template may then insert its own
            default, as SmolLM2's does; pass ``""`` for an empty one).
        template: ``chat`` (the tokenizer's chat template, answer as the assistant turn),
            ``none`` (``{system}\n\n{question}\n\nAnswer:``), ``llama2`` (the reference
            code's), or a format string with ``{question}`` and ``{system}``.
    """
    check_template(template)
    if template == "chat":
        if not getattr(tok, "chat_template", None):
            raise MaskstoreError(
                "the tokenizer has no chat template: use `template` none or a format string"
            )
        msgs = ([] if system is None else [{"role": "system", "content": system}]) + [
            {"role": "user", "content": question}
        ]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if template == "none":
        return (f"{system}\n\n" if system else "") + f"{question}\n\nAnswer:"
    return TEMPLATES.get(template, template).format(system=system or "", question=question)


@dataclass
class Scores:
    """Log-likelihoods of answers A and B for each item: ``ll`` summed over the answer's
    tokens, ``tokens`` how many there were (``(n, 2)`` each)."""

    ll: torch.Tensor
    tokens: torch.Tensor

    def choices(self, normalise: bool = False) -> list[str]:
        """The answer each item prefers (by summed, or per-token log-likelihood); a tie is A."""
        v = self.ll / self.tokens.clamp(min=1) if normalise else self.ll
        return ["A" if a >= b else "B" for a, b in v.tolist()]


def _encode(tok, text: str, chat: bool) -> list[int]:
    """Token ids with BOS exactly as the tokenizer adds it (a chat template writes its own)."""
    return tok(text, add_special_tokens=not chat)["input_ids"]


@torch.inference_mode()
def answer_logliks(
    model,
    tok,
    items: list[MCItem],
    system: str | None = None,
    template: str = "chat",
    batch_size: int = 16,
    progress: Progress | None = None,
) -> Scores:
    """Log-likelihood of each item's answers A and B given the rendered question (answer tokens
    only).

    As the reference code does, the context and the context followed by the answer are
    tokenized separately and the answer is what follows the context's tokens: ``" " + answer``
    after a plain template, the answer itself as the assistant turn of a chat template.
    """
    device = next(model.parameters()).device
    chat = template == "chat"
    seqs: list[tuple[list[int], int]] = []  # (ids, number of answer tokens)
    for it in items:
        ctx_text = render(tok, it.question, system, template)
        ctx = _encode(tok, ctx_text, chat)
        for ans in (it.a, it.b):
            full = _encode(tok, ctx_text + (ans if chat else " " + ans), chat)
            n_ans = len(full) - len(ctx)
            if full[: len(ctx)] != ctx or n_ans < 1:  # the answer merged into the context
                a_ids = tok(ans if chat else " " + ans, add_special_tokens=False)["input_ids"]
                full, n_ans = ctx + a_ids, len(a_ids)
            seqs.append((full, n_ans))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    tick = counter(progress, len(seqs))
    out = torch.empty(len(seqs), dtype=torch.float64)
    counts = torch.tensor([n for _, n in seqs], dtype=torch.float64)
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = max(len(s) for s, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for r, (s, _) in enumerate(chunk):
            ids[r, : len(s)] = torch.tensor(s)
            att[r, : len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = ids[:, 1:].to(device)
        tok_lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        for r, (s, n_ans) in enumerate(chunk):
            out[i + r] = tok_lp[r, len(s) - 1 - n_ans : len(s) - 1].sum().double().cpu()
        tick(len(chunk))
    return Scores(out.view(-1, 2), counts.view(-1, 2))


def accuracy(scores: Scores | torch.Tensor, keys: list[str], normalise: bool = False) -> float:
    """Share of items whose preferred answer is the key."""
    if isinstance(scores, torch.Tensor):
        scores = Scores(scores, torch.ones_like(scores))
    choice = scores.choices(normalise)
    return sum(c == k for c, k in zip(choice, keys, strict=True)) / max(len(keys), 1)


def wilson(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def summarise(scores: Scores, keys: list[str]) -> dict:
    """Accuracy by summed and by length-normalised log-likelihood, each with its 95% Wilson
    interval."""
    n = len(keys)
    out: dict = {"items": n}
    for name, norm in (("accuracy", False), ("accuracy_norm", True)):
        correct = sum(c == k for c, k in zip(scores.choices(norm), keys, strict=True))
        lo, hi = wilson(correct, n)
        out[name] = correct / max(n, 1)
        out[f"{name}_ci95"] = [lo, hi]
    return out


def per_item(scores: Scores, keys: list[str], **fields) -> list[dict]:
    """One record per item: the log-likelihoods, token counts, choices and the key."""
    rows = []
    summed, normed = scores.choices(False), scores.choices(True)
    for i, ((la, lb), (ta, tb)) in enumerate(
        zip(scores.ll.tolist(), scores.tokens.tolist(), strict=True)
    ):
        rows.append(
            fields
            | {
                "item": i,
                "key": keys[i],
                "ll_a": la,
                "ll_b": lb,
                "tokens_a": int(ta),
                "tokens_b": int(tb),
                "choice": summed[i],
                "choice_norm": normed[i],
            }
        )
    return rows


@torch.inference_mode()
def layer_cosine(
    handle: MaskHandle,
    tok,
    texts: list[str],
    a: str,
    b: str,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> list[float]:
    """Per layer (embeddings first), the mean over non-padding tokens of the cosine similarity of
    hidden states under persona ``a`` and persona ``b`` on the same texts."""
    model = handle.model
    device = next(model.parameters()).device
    if not texts:
        raise MaskstoreError("no texts to compare")
    sums: torch.Tensor | None = None
    count = 0
    tick = counter(progress, len(texts))
    prev = (handle.active, handle.gamma)
    try:
        for i in range(0, len(texts), batch_size):
            enc = tok(
                texts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=512,
            )
            enc = {k: v.to(device) for k, v in enc.items()}
            states = []
            for p in (a, b):
                handle.use(p)
                hs = model(**enc, output_hidden_states=True).hidden_states
                states.append(torch.stack(hs).float())  # (L+1, B, T, H)
            cos = torch.nn.functional.cosine_similarity(states[0], states[1], dim=-1)  # (L+1, B, T)
            m = enc["attention_mask"].bool()
            s = (cos * m).sum(dim=(1, 2)).double().cpu()
            sums = s if sums is None else sums + s
            count += int(m.sum())
            tick(len(texts[i : i + batch_size]))
    finally:
        handle.use(*prev)
    return (sums / count).tolist()


def _deltas(advance: Callable[[int], None]) -> Progress:
    """A ``progress(done, total)`` that advances ``advance`` by what each call adds."""
    seen = 0

    def progress(done: int, total: int | None) -> None:
        nonlocal seen
        advance(done - seen)
        seen = done

    return progress


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (the binomial
    test of ``min(b, c)`` successes in ``b + c`` trials at 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def _mcnemar_large(b: int, c: int) -> float:
    """:func:`mcnemar_exact` in log space, for counts where exact integers would be slow."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
            for i in range(k + 1)]  # fmt: skip
    top = max(logs)
    return min(1.0, 2 * math.exp(top) * sum(math.exp(v - top) for v in logs))


def items_needed(b: int, c: int, n: int, alpha: float = 0.05, cap: int = 1_000_000) -> int | None:
    """The fewest items at which a difference of the observed size (``b`` and ``c``
    discordant pairs among ``n`` items, scaled in proportion) reaches an exact McNemar
    ``p < alpha``. None when it already does, when there is no difference (``b == c``), or
    past ``cap`` items."""
    if n <= 0 or b == c or mcnemar_exact(b, c) < alpha:
        return None

    def p_at(m: int) -> float:
        bb, cc = round(b * m / n), round(c * m / n)
        return mcnemar_exact(bb, cc) if bb + cc <= 1000 else _mcnemar_large(bb, cc)

    lo, hi = n, 2 * n
    while p_at(hi) >= alpha:
        lo, hi = hi, 2 * hi
        if hi > cap:
            return None
    if hi <= 4096:  # counts rounded to whole pairs make p jagged: scan for the first m
        return next(m for m in range(n, hi + 1) if p_at(m) < alpha)
    while hi - lo > 1:  # large counts: p falls smoothly; the smallest m in (lo, hi]
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if p_at(mid) < alpha else (mid, hi)
    return hi


def min_p_value(n: int) -> float:
    """The smallest two-sided exact McNemar p-value ``n`` items can give (all discordant one
    way): with fewer than 6 items no difference reaches p < 0.05."""
    return mcnemar_exact(n, 0)


def describe(persona: str) -> str:
    """The default persona system prompt of the prompt rows."""
    return f"You are {'an' if persona[:1].lower() in 'aeiou' else 'a'} {persona} person. Answer as one."


def protocol(
    handle,
    tok,
    items: list[MCItem],
    keys_for: dict[str, list[str]],
    descriptions: dict[str, str] | None = None,
    system_prompt: str | None = None,
    template: str = "chat",
    gamma: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """The paper's four-row evaluation for each keyed persona: the base model, the persona's
    system prompt, its mask, and both; accuracy by summed and length-normalised
    log-likelihood with 95% Wilson intervals, each row's difference from the base row and the
    exact McNemar p-value of that difference (paired by item).

    Args:
        handle: a :class:`~maskstore.runtime.MaskHandle` over the personas.
        keys_for: persona -> each item's key ("A"/"B") as that persona answers.
        descriptions: persona -> system prompt of its prompt rows (default :func:`describe`).
        system_prompt: system prompt of the base and mask rows (None: none).
        progress: ``progress(done, total)`` in scored sequences.
    Returns:
        ``{"rows": [...], "records": [per-item dicts], "system_prompts": {...},
        "template": template, "min_p": the smallest p-value len(items) allows}``.
    """
    descr = {p: (descriptions or {}).get(p) or describe(p) for p in keys_for}
    plan = [("base", p, None, system_prompt) for p in keys_for]
    plan += [("prompt", p, None, descr[p]) for p in keys_for]
    plan += [("mask", p, p, system_prompt) for p in keys_for]
    plan += [("mask+prompt", p, p, descr[p]) for p in keys_for]
    total = 2 * len(items) * len({(m, s) for _, _, m, s in plan})
    tick = counter(progress, total)

    rows, records, done = [], [], {}
    correct: dict[tuple[str, str], list[bool]] = {}
    try:
        for setting, persona, mask, system in plan:
            if (mask, system) not in done:  # the base model answers once for every key
                handle.use(mask, gamma)
                done[mask, system] = answer_logliks(handle.model, tok, items, system=system,
                                                    template=template,
                                                    progress=_deltas(tick))  # fmt: skip
            scores, keys = done[mask, system], keys_for[persona]
            right = [c == k for c, k in zip(scores.choices(False), keys, strict=True)]
            correct[setting, persona] = right
            row = {"setting": setting, "persona": persona} | summarise(scores, keys)
            base = correct["base", persona]
            row["delta_vs_base"] = (sum(right) - sum(base)) / max(len(items), 1)
            b = sum(x and not y for x, y in zip(base, right, strict=True))
            c = sum(y and not x for x, y in zip(base, right, strict=True))
            row["p_vs_base"] = mcnemar_exact(b, c)
            row["items_needed"] = items_needed(b, c, len(items))
            rows.append(row)
            records += per_item(scores, keys, setting=setting, persona=persona)
    finally:
        handle.use(None)
    return {
        "rows": rows,
        "records": records,
        "system_prompts": {
            "base": system_prompt,
            "mask": system_prompt,
            **{f"prompt:{p}": d for p, d in descr.items()},
        },
        "template": template,
        "min_p": min_p_value(len(items)),
    }


# ---- side by side generations (``maskstore run --compare``)

DERIVED_OPS = frozenset({"union", "intersect", "subtract", "xor", "complement", "vote", "blend"})


def compared_personas(bundle, all_personas: bool = False) -> list[str]:
    """The personas ``run --compare`` shows by default: those built or imported, or, with
    ``all_personas``, also those made by set operations and blends."""
    return [p for p in bundle.personas
            if all_personas or bundle.persona(p)["provenance"]["op"] not in DERIVED_OPS]  # fmt: skip


def generate(handle: MaskHandle, tok, prompt: str, max_new_tokens: int = 60,
             chat: bool = True) -> str:  # fmt: skip
    """A greedy answer to ``prompt`` by ``handle``'s model as it is now (the active persona),
    through the tokenizer's chat template when ``chat`` and it has one."""
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


def compare(
    handle: MaskHandle,
    tok,
    prompt: str,
    personas: list[str | None],
    gamma: float = 0.0,
    max_new_tokens: int = 60,
    chat: bool = True,
    progress: Progress | None = None,
) -> list[tuple[str | None, str]]:
    """Greedy answers to ``prompt`` with each persona on (None: the base model), as
    ``(persona, answer)`` in order; the model is back at its base weights after.

    Raises:
        MaskstoreError: an empty prompt, ``max_new_tokens`` below 1, a bad gamma or persona.
    """
    check_generation(prompt, max_new_tokens)
    tick = counter(progress, len(personas))
    outputs = []
    try:
        for p in personas:
            handle.use(p, gamma)
            outputs.append((p, generate(handle, tok, prompt, max_new_tokens, chat)))
            tick(1)
    finally:
        handle.use(None)
    return outputs


def check_generation(prompt: str, max_new_tokens: int) -> None:
    """Refuse an empty prompt or fewer than one new token (before any model is loaded)."""
    if max_new_tokens < 1:
        raise MaskstoreError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}")
    if not prompt.strip():
        raise MaskstoreError("`prompt` is empty: give the text to answer")
