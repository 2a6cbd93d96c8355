"""Calibration data: read samples from text, JSONL or CSV, sample them, tokenize into batches."""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MaskstoreError
from ..files import read_text
from ..store.hashing import canonical_json, xxh3

_TEXT_KEYS = ("text", "content", "statement", "prompt")
MAX_BATCH_TOKENS = 1 << 26  # of one calibration batch (batch x tokens)


@dataclass
class Sample:
    """One calibration sample: ``prompt`` (user turn, may be empty) and ``text`` (the response)."""

    text: str
    prompt: str = ""

    def as_json(self) -> list[str]:
        return [self.prompt, self.text]


def read_csv_rows(path: str | Path, what: str = "calibration file") -> list[dict[str, str]]:
    """Rows of a CSV file as dicts, read with the ``csv`` module over the file's own newlines,
    so quoted fields keep theirs (``"wealthy?\nAnswer"`` stays two lines)."""
    text = read_text(path, what)
    try:
        return list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise MaskstoreError(f"cannot read {what} {path}: {e}") from None


def read_samples(path: str | Path) -> list[Sample]:
    """Samples of one persona: ``.txt`` (a line each), ``.jsonl`` (``text`` field or a string) or
    ``.csv`` (a ``text`` column, else the first column)."""
    path = Path(path)
    suffix = path.suffix.lower()
    raw = "" if suffix == ".csv" else read_text(path, "calibration file")
    out: list[Sample] = []
    if suffix == ".jsonl":
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise MaskstoreError(f"{path}:{i}: not valid JSON") from None
            if isinstance(obj, str):
                out.append(Sample(obj))
            elif isinstance(obj, dict) and any(k in obj for k in _TEXT_KEYS):
                key = next(k for k in _TEXT_KEYS if k in obj)
                out.append(Sample(str(obj[key])))
            else:
                raise MaskstoreError(
                    f"{path}:{i}: expected a string or an object with a 'text' field"
                )
    elif suffix == ".csv":
        rows = read_csv_rows(path)
        if rows and rows[0]:
            col = "text" if "text" in rows[0] else next(iter(rows[0]))
            out = [Sample(r[col]) for r in rows if (r.get(col) or "").strip()]
    else:
        out = [Sample(line.strip()) for line in raw.splitlines() if line.strip()]
    if not out:
        raise MaskstoreError(f"calibration file {path} holds no samples")
    return out


def read_pair_csv(path: str | Path) -> tuple[list[Sample], list[Sample]]:
    """The persona-eval layout ``question,matching,not_matching``: the persona that gives the
    matching answer and its opposite, as (question, answer) samples."""
    path = Path(path)
    rows = read_csv_rows(path)
    need = {"question", "matching", "not_matching"}
    if not rows:
        raise MaskstoreError(
            f"{path} holds no rows: one a question, columns question,matching,not_matching"
        )
    have = set(rows[0])
    if not need <= have:
        raise MaskstoreError(
            f"{path}: a pair CSV needs columns question,matching,not_matching; "
            f"found {','.join(sorted(have)) or 'none'}"
        )
    pos = [Sample(r["matching"], r["question"]) for r in rows if r["question"] and r["matching"]]
    neg = [
        Sample(r["not_matching"], r["question"])
        for r in rows
        if r["question"] and r["not_matching"]
    ]
    if not pos or not neg:
        raise MaskstoreError(f"{path} holds no complete rows")
    return pos, neg


def choose(samples: list[Sample], n: int | None, seed: int = 0) -> list[Sample]:
    """``n`` samples drawn without replacement with ``seed`` (all of them, in order, if n is None)."""
    out = Chosen()
    out.seed = seed
    if n is None or n >= len(samples):
        out.extend(samples)
        return out
    if n <= 0:
        raise MaskstoreError(f"`samples` must be positive, got {n}")
    idx = sorted(random.Random(seed).sample(range(len(samples)), n))
    out.extend(samples[i] for i in idx)
    return out


def samples_digest(samples: list[Sample]) -> str:
    """xxh3-128 of the canonical JSON list of ``[prompt, text]`` pairs (for reference; a
    persona's calibration digest is :class:`Recorder`'s, over the tokens)."""
    return xxh3(canonical_json([s.as_json() for s in samples]))


API_SOURCE = "token batches"


def describe(max_tokens: int, seed: int, chat_template: bool) -> str:
    """How the command line made its batches (the ``source`` of its calibration record)."""
    return f"max_tokens={max_tokens} seed={seed} chat_template={chat_template}"


def check_batch(b: object, vocab: int | None = None) -> None:
    """Refuse, in one line, a calibration batch the model cannot take.

    A batch is an integer tensor of token ids ``(batch, tokens)``, or a mapping whose
    ``input_ids`` is one and whose ``attention_mask``, if given, has the same shape; with
    ``vocab``, every id lies in ``[0, vocab)``.

    Raises:
        MaskstoreError: naming what is wrong and how to make a batch.
    """
    how = "make batches with maskstore.build.calibration.batches(tokenizer, samples)"
    ids = (
        b if isinstance(b, torch.Tensor) else b.get("input_ids") if isinstance(b, Mapping) else None
    )
    if not isinstance(ids, torch.Tensor):
        raise MaskstoreError(
            f"a calibration batch is a tensor of token ids or a dict with 'input_ids', not "
            f"{type(b).__name__}: {how}"
        )
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise MaskstoreError(f"token ids must be integers, got {ids.dtype}: {how}")
    if ids.ndim != 2:
        raise MaskstoreError(f"token ids must be (batch, tokens), got shape {tuple(ids.shape)}")
    if ids.numel() > MAX_BATCH_TOKENS:  # before any pass over it (an expanded view is cheap)
        raise MaskstoreError(
            f"a calibration batch of {ids.shape[0]} x {ids.shape[1]} tokens is past the "
            f"{MAX_BATCH_TOKENS:,} a batch may hold: use smaller batches"
        )
    mask = b.get("attention_mask") if isinstance(b, Mapping) else None
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise MaskstoreError(f"attention_mask {shape} does not match input_ids {tuple(ids.shape)}")
    if vocab is not None and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise MaskstoreError(
                f"token id {lo if lo < 0 else hi} lies outside the model's {vocab} embeddings: "
                "tokenize with the model's own tokenizer"
            )


class Recorder:
    """The one definition of a persona's calibration record: passes token batches through
    while hashing them (xxh3-128 over each batch's ``input_ids`` as int64 and
    ``attention_mask`` as int8, in order) and counting samples and tokens. The API build and
    the command line both use it, so the same batches give the same persona digest."""

    def __init__(self, batches, source: str = API_SOURCE, vocab: int | None = None) -> None:
        import xxhash

        self.batches, self.samples, self.tokens, self.source = batches, 0, 0, source
        self.vocab = vocab  # when known, token ids are checked against it
        self._h = xxhash.xxh3_128()

    def __iter__(self):
        for b in self.batches:
            self.add(b)
            yield b

    def add(self, b) -> None:
        """Account for one batch (a tensor of ids or a dict with ``attention_mask``), checked
        first (:func:`check_batch`)."""
        check_batch(b, self.vocab)
        ids = b if isinstance(b, torch.Tensor) else b["input_ids"]
        mask = None if isinstance(b, torch.Tensor) else b.get("attention_mask")
        self._h.update(ids.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
        if mask is not None:
            self._h.update(mask.detach().cpu().to(torch.int8).contiguous().numpy().tobytes())
        self.samples += int(ids.shape[0])
        self.tokens += int(ids.numel() if mask is None else mask.sum())

    def record(self) -> dict:
        return {"digest": self._h.hexdigest(), "samples": self.samples, "tokens": self.tokens,
                "source": self.source}  # fmt: skip


def render(tokenizer, sample: Sample, chat_template: bool) -> str:
    """The string fed to the tokenizer: a chat transcript, or ``prompt + " " + text``."""
    if chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise MaskstoreError("`chat_template` given but the tokenizer has no chat template")
        msgs = ([{"role": "user", "content": sample.prompt}] if sample.prompt else []) + [
            {"role": "assistant", "content": sample.text}
        ]
        return tokenizer.apply_chat_template(msgs, tokenize=False)
    return f"{sample.prompt} {sample.text}".strip()


class Batches(list):
    """Token batches that know how they were made: ``source`` is what :func:`build` records
    (the command line's :func:`describe`), so batches made by :func:`batches` with its
    defaults give the persona digests ``maskstore build`` gives for the same samples."""

    source: str = API_SOURCE


class Chosen(list):
    """Samples :func:`choose` drew, with the ``seed`` it drew them with."""

    seed: int = 0


def batches(
    tokenizer,
    samples: list[Sample],
    max_tokens: int = 512,
    batch_size: int = 8,
    chat_template: bool = False,
) -> Batches:
    """Right-padded token batches ``{"input_ids", "attention_mask"}`` of ``batch_size``
    samples, with their ``source`` (see :class:`Batches`; the seed is ``choose``'s, else 0
    as the command line records it when it keeps every sample)."""
    if batch_size < 1 or max_tokens < 1:
        raise MaskstoreError(
            f"`batch_size` and `max_tokens` must be at least 1, got {batch_size} and {max_tokens}"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = Batches()
    out.source = describe(max_tokens, getattr(samples, "seed", 0), chat_template)
    for i in range(0, len(samples), batch_size):
        texts = [render(tokenizer, s, chat_template) for s in samples[i : i + batch_size]]
        enc = tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_tokens,
            padding_side="right",
        )
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out
