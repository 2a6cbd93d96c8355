"""Does a persona work? Multiple-choice alignment and hidden-state similarity (arXiv 2602.07164).

* :func:`mc_choices`: for each item, the summed log-likelihood of each answer's tokens given the
  question (answer tokens only), and the model's choice.
* :func:`layer_cosine`: per layer, the mean cosine similarity of hidden states under two
  personas on the same inputs (section 3.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .calibration import read_csv_rows
from .errors import MaskstoreError
from .runtime import MaskHandle


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
    if not rows or not need <= set(rows[0]):
        have = ",".join(rows[0]) if rows else "none"
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


def _context(tok, question: str, system: str | None, chat: bool) -> str:
    if chat and getattr(tok, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question}
        ]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return (f"{system}\n" if system else "") + f"Question: {question}\nAnswer:"


@torch.inference_mode()
def answer_logliks(
    model,
    tok,
    items: list[MCItem],
    system: str | None = None,
    chat: bool = True,
    batch_size: int = 16,
) -> torch.Tensor:
    """``(len(items), 2)`` summed log-probabilities of answers A and B (answer tokens only)."""
    device = next(model.parameters()).device
    seqs: list[tuple[list[int], int]] = []  # (ids, number of answer tokens)
    for it in items:
        ctx = tok(_context(tok, it.question, system, chat), add_special_tokens=False)["input_ids"]
        for ans in (it.a, it.b):
            a_ids = tok(" " + ans if not chat else ans, add_special_tokens=False)["input_ids"]
            seqs.append((ctx + a_ids, len(a_ids)))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = torch.empty(len(seqs), dtype=torch.float64)
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
    return out.view(-1, 2)


def accuracy(ll: torch.Tensor, keys: list[str]) -> float:
    """Share of items where the higher-likelihood answer is the key."""
    choice = ["A" if a >= b else "B" for a, b in ll.tolist()]
    return sum(c == k for c, k in zip(choice, keys, strict=True)) / max(len(keys), 1)


@torch.inference_mode()
def layer_cosine(
    handle: MaskHandle, tok, texts: list[str], a: str, b: str, batch_size: int = 8
) -> list[float]:
    """Per layer (embeddings first), the mean over non-padding tokens of the cosine similarity of
    hidden states under persona ``a`` and persona ``b`` on the same texts."""
    model = handle.model
    device = next(model.parameters()).device
    if not texts:
        raise MaskstoreError("no texts to compare")
    sums: torch.Tensor | None = None
    count = 0
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
    finally:
        handle.use(*prev)
    return (sums / count).tolist()
