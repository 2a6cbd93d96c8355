"""The scoring pipeline: statistics from a model, masks from statistics, written to a bundle.

Two stages, so that one calibration pass serves many masks ("score once, threshold many"):

1. :func:`collect_stats` runs the model over token batches once per persona;
2. :func:`write_personas` scores one module at a time (never a whole model's scores at once),
   selects each persona's mask, and streams masks and statistics into the bundle.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import scoring
from .collect import Batch, StatsCollector
from .errors import MaskstoreError
from .format import DEFAULT_CHUNK_BYTES, Bundle, check_persona_name, create_bundle
from .modules import maskable_modules, model_fingerprint
from .stats import ChannelStats

Progress = Callable[[int], None] | None


@dataclass
class BuildConfig:
    """How masks are scored and selected; every field is recorded in the persona's metadata."""

    method: str = "wanda"
    sparsity: float = 0.5
    selection: str = "row"  # row | nm | layer
    n: int = 2  # N of N:M
    m: int = 4  # M of N:M
    phi: str = "relu"  # contrastive-wanda: relu | softplus
    eps: float = 1e-6
    tau: float = 1.0
    damp: float = 0.01  # sparsegpt: lambda = damp * mean(diag(H))
    blocksize: int = 128  # sparsegpt column block

    def check(self) -> None:
        if self.method not in scoring.METHODS:
            raise MaskstoreError(
                f"unknown method {self.method!r}: use one of {', '.join(scoring.METHODS)}"
            )
        if not 0.0 <= self.sparsity < 1.0:
            raise MaskstoreError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.selection not in scoring.SELECTIONS:
            raise MaskstoreError(f"unknown selection {self.selection!r}: use row, nm or layer")
        if self.phi not in ("relu", "softplus"):
            raise MaskstoreError(f"unknown phi {self.phi!r}: use relu or softplus")
        if self.eps <= 0 or self.tau <= 0 or self.damp <= 0:
            raise MaskstoreError("eps, tau and damp must be positive")

    @property
    def contrastive(self) -> bool:
        return self.method in scoring.CONTRASTIVE

    @property
    def hinv_row(self) -> str:
        return f"hinv_diag_damp{self.damp:g}"

    def params(self) -> dict:
        keep = {"selection"}
        if self.selection == "nm":
            keep |= {"n", "m"}
        if self.method == "contrastive-wanda":
            keep |= {"phi", "eps", "tau"} if self.phi == "softplus" else {"phi", "eps"}
        if self.method == "sparsegpt":
            keep |= {"damp", "blocksize"}
        return {k: v for k, v in asdict(self).items() if k in keep}


@dataclass
class PersonaStats:
    """A persona's statistics per module, plus what describes its calibration data."""

    name: str
    stats: dict[str, ChannelStats]
    calibration: dict | None = None
    extra_params: dict = field(default_factory=dict)


def collect_stats(
    model: nn.Module,
    modules: Mapping[str, nn.Linear],
    batches: Iterable[Batch],
    config: BuildConfig | None = None,
    progress: Progress = None,
) -> dict[str, ChannelStats]:
    """One calibration pass: :class:`ChannelStats` per module (plus SparseGPT's ``[H^-1]_jj``
    when ``config.method == "sparsegpt"``; the Gram matrices are dropped after use)."""
    gram = config is not None and config.method == "sparsegpt"
    coll = StatsCollector(modules, gram=gram)
    stats = coll.run(model, batches, progress)
    if gram:
        done: dict[str, object] = {}
        for name, st in stats.items():
            group = coll.group_of[name]
            if group not in done:
                done[group] = scoring.hinv_diag(coll.grams[group], st.tokens, config.damp)
            st.extra[config.hinv_row] = done[group]
    if any(st.tokens == 0 for st in stats.values()):
        raise MaskstoreError(
            "the calibration data reached no masked module: are the samples empty?"
        )
    return stats


def check_pairs(names: list[str], pairs: list[tuple[str, str]], config: BuildConfig) -> None:
    seen: set[str] = set()
    for a, b in pairs:
        if a == b:
            raise MaskstoreError(f"--pair {a}:{b} names one persona twice: pair two opposites")
        for p in (a, b):
            if p not in names:
                raise MaskstoreError(f"--pair names {p!r}, which has no calibration data")
            if p in seen:
                raise MaskstoreError(
                    f"persona {p!r} is in two pairs: each persona has one opposite"
                )
            seen.add(p)
    if config.contrastive:
        lone = [n for n in names if n not in seen]
        if lone:
            raise MaskstoreError(
                f"{config.method} needs every persona in a --pair; {lone[0]!r} has none"
            )
    elif pairs:
        raise MaskstoreError(
            f"--pair is for contrastive methods; {config.method} scores each persona alone"
        )


def _stat(p: PersonaStats, module: str, config: BuildConfig) -> ChannelStats:
    try:
        st = p.stats[module]
    except KeyError:
        raise MaskstoreError(f"persona {p.name!r} has no statistics for {module}") from None
    if config.method == "sparsegpt" and config.hinv_row not in st.extra:
        raise MaskstoreError(
            f"stored statistics of {p.name!r} lack SparseGPT's H^-1 diagonal for damp={config.damp:g}: "
            "rebuild from the model with --method sparsegpt"
        )
    return st


def masks_for_module(
    weight: torch.Tensor,
    personas: list[PersonaStats],
    pairs: list[tuple[str, str]],
    module: str,
    config: BuildConfig,
) -> dict[str, torch.Tensor]:
    """Bool masks ``(out, in)`` of one module for every persona."""
    sel = dict(sparsity=config.sparsity, mode=config.selection, n=config.n, m=config.m)
    by = {p.name: p for p in personas}
    out: dict[str, torch.Tensor] = {}
    if not config.contrastive:
        for p in personas:
            st = _stat(p, module, config)
            if config.method == "wanda":
                out[p.name] = scoring.select_fused(weight, scoring.wanda_factor(st), **sel)
            else:
                hinv = st.extra[config.hinv_row]
                out[p.name] = scoring.select_fused(weight, hinv, **sel, square=True)
        return out
    for a, b in pairs:
        sa, sb = _stat(by[a], module, config), _stat(by[b], module, config)
        if config.method == "contrastive-wanda":
            f_pos, f_neg = scoring.contrastive_wanda_factors(
                sa, sb, config.phi, config.eps, config.tau
            )
            out[a] = scoring.select_fused(weight, f_pos, **sel)
            out[b] = scoring.select_fused(weight, f_neg, **sel)
        else:
            out[a], out[b] = scoring.contrastive_sparse_masks(
                scoring.wanda_scores(weight, sa), scoring.wanda_scores(weight, sb), **sel
            )
    return out


def write_personas(
    bundle: Bundle,
    modules: Mapping[str, nn.Linear],
    personas: list[PersonaStats],
    pairs: list[tuple[str, str]],
    config: BuildConfig,
    progress: Progress = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    codec: str = "zstd",
) -> dict[str, dict]:
    """Score, select and write every persona, one module at a time.

    Returns:
        persona name -> its committed metadata.
    """
    config.check()
    check_pairs([p.name for p in personas], pairs, config)
    opposite = {a: b for a, b in pairs} | {b: a for a, b in pairs}
    writers = {}
    try:
        for p in personas:
            params = config.params() | p.extra_params
            if p.name in opposite:
                params |= {
                    "opposite": opposite[p.name],
                    "role": "+" if p.name in dict(pairs) else "-",
                }
            writers[p.name] = bundle.persona_writer(
                p.name,
                method=config.method,
                params=params,
                sparsity=config.sparsity,
                calibration=p.calibration,
                provenance={"op": "build", "operands": []},
                chunk_bytes=chunk_bytes,
                codec=codec,
            )
        for name, mod in modules.items():
            masks = masks_for_module(mod.weight, personas, pairs, name, config)
            for p in personas:
                w = writers[p.name]
                w.write_mask(name, masks[p.name])
                w.write_stats(name, p.stats[name])
            if progress:
                progress(1)
        return {name: w.commit() for name, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def build(
    model: nn.Module,
    calibration: Mapping[str, Iterable[Batch]],
    out: str | os.PathLike,
    *,
    pairs: list[tuple[str, str]] = (),
    config: BuildConfig | None = None,
    modules: Mapping[str, nn.Linear] | None = None,
    force: bool = False,
) -> Path:
    """Build a bundle from any ``torch.nn.Module`` and token batches per persona.

    Args:
        model: the model; called as ``model(input_ids=..., attention_mask=...)`` for dict batches,
            or ``model(ids)`` for tensor batches.
        calibration: persona name -> iterable of batches.
        out: the bundle directory to create (atomically).
        pairs: opposing personas ``(p+, p-)`` for the contrastive methods.
        modules: the ``nn.Linear`` modules to mask (default: all but LM head and embeddings).
    Returns:
        The bundle path.
    """
    config = config or BuildConfig()
    config.check()
    for n in calibration:
        check_persona_name(n)
    check_pairs(list(calibration), list(pairs), config)
    modules = dict(modules) if modules is not None else maskable_modules(model)
    personas = [
        PersonaStats(name, collect_stats(model, modules, batches, config))
        for name, batches in calibration.items()
    ]
    fp = model_fingerprint(model, modules, hash_weights=True)
    with create_bundle(out, fp, force=force) as bundle:
        write_personas(bundle, modules, personas, list(pairs), config)
    return Path(out)
