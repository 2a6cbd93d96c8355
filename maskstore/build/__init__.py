"""The scoring pipeline: statistics from a model, masks from statistics, written to a bundle.

Two stages, so that one calibration pass serves many masks ("score once, threshold many"):

1. :func:`collect_stats` runs the model over token batches once per persona (or
   :func:`stats_from_bundle` reads statistics a bundle stored);
2. :func:`write_bundle` scores one module at a time (never a whole model's scores at once),
   selects each persona's mask with the method's registry entry (:mod:`maskstore.build.methods`), and
   streams masks and statistics into a new bundle.

:func:`build` and :func:`build_from_stats` are the two stages together; the CLI, recipes and the
tests all call these.
"""

from __future__ import annotations

import os
import re
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import MaskstoreError
from ..modules import maskable_modules, model_fingerprint, vocab_size
from ..progress import Progress, Stage, counter
from ..store.format import DEFAULT_CHUNK_BYTES, Bundle
from ..store.hashing import metadata_digest
from ..store.names import check_persona_name
from ..store.stats import ChannelStats
from ..store.writer import WritableBundle, create_bundle
from . import methods, scoring
from .calibration import API_SOURCE, Recorder
from .collect import Batch, StatsCollector
from .offload import collect_by_block, decoder_layers

ZERO_SCORE_WARN = 0.05  # warn when more of a persona's kept weights than this scored exactly 0


class TieWarning(UserWarning):
    """Many kept weights were chosen by the tie rule alone (their score was exactly 0)."""


SPARSITY_WARN = 0.01  # warn when a persona's realised sparsity is further than this from target


class SparsityWarning(UserWarning):
    """A persona's realised sparsity differs from the target by more than 1%."""


@dataclass(kw_only=True)
class BuildConfig:
    """How masks are scored and selected; the fields that matter are recorded in each persona's
    metadata (``params``), and :meth:`from_params` reads them back.

    Where the paper is silent, the defaults are the reference code's (github Ruimeng-Ye/Persona):
    ``eps`` inside the square root, ``tau = 2``, contrastive sparsity 0.3, and the keep count
    ``int(in * (1 - sparsity))`` (at least 1 for contrastive methods). Exact score ties go to the
    persona's own plain Wanda score, then to the lowest index (the reference leaves them to
    ``torch.topk``'s unspecified order).
    """

    method: str = "wanda"
    sparsity: float | None = None  # None: 0.3 for contrastive methods, else 0.5
    selection: str = "row"  # row | nm | layer
    n: int = 2  # N of N:M
    m: int = 4  # M of N:M
    phi: str = "relu"  # contrastive-wanda: relu | softplus
    eps: float = 1e-6
    tau: float = 2.0  # contrastive-wanda softplus temperature
    damp: float = 0.01  # sparsegpt: lambda = damp * mean(diag(H))
    norm: str = "tokens"  # Wanda factor: tokens (sqrt sum_t x^2) | sample-mean (mean_s ||x_s||)
    keep: str = "int"  # keep count: int(in * (1 - s)) | floor (bundles built before)
    eps_at: str = "sqrt"  # contrastive-wanda: sqrt(v + eps) | outside (sqrt(v) + eps, before)
    ties: str = "wanda"  # exact ties: own Wanda score then index | index (before)
    block: int = 128  # column-norm: columns per block

    def __post_init__(self) -> None:
        if self.sparsity is None:
            self.sparsity = 0.3 if self.method in methods.METHODS and self.contrastive else 0.5

    def check(self) -> None:
        methods.get(self.method)
        if not 0.0 <= self.sparsity < 1.0:
            raise MaskstoreError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.selection not in scoring.SELECTIONS:
            raise MaskstoreError(f"unknown selection {self.selection!r}: use row, nm or layer")
        if self.phi not in ("relu", "softplus"):
            raise MaskstoreError(f"unknown phi {self.phi!r}: use relu or softplus")
        if self.norm not in scoring.NORMS:
            raise MaskstoreError(f"unknown norm {self.norm!r}: use tokens or sample-mean")
        if self.keep not in scoring.KEEP_RULES:
            raise MaskstoreError(f"unknown keep rule {self.keep!r}: use int or floor")
        if self.eps_at not in ("sqrt", "outside"):
            raise MaskstoreError(f"unknown eps placement {self.eps_at!r}: use sqrt or outside")
        if self.ties not in ("wanda", "index"):
            raise MaskstoreError(f"unknown tie rule {self.ties!r}: use wanda or index")
        if self.eps <= 0 or self.tau <= 0 or self.damp <= 0:
            raise MaskstoreError("eps, tau and damp must be positive")
        if self.block < 1:
            raise MaskstoreError(f"block must be at least 1, got {self.block}")

    @property
    def spec(self) -> methods.Method:
        """The method's registry entry."""
        return methods.get(self.method)

    @property
    def contrastive(self) -> bool:
        return self.spec.contrastive

    def params(self) -> dict:
        """The fields recorded in persona metadata: the selection's and the method's."""
        keep = {"selection", *self.spec.params(self)}
        if self.selection == "nm":
            keep |= {"n", "m"}
        return {k: v for k, v in asdict(self).items() if k in keep}

    # what a persona recorded before a field existed means the rule of that time
    LEGACY: ClassVar[dict[str, Any]] = {
        "keep": "floor",
        "ties": "index",
        "eps_at": "outside",
        "norm": "tokens",
    }

    @classmethod
    def from_params(
        cls, method: str, sparsity: float | None, params: Mapping[str, Any]
    ) -> BuildConfig:
        """The config a persona was built with, from its recorded ``method``, ``sparsity`` and
        ``params`` (pair keys are ignored; fields it predates take their rule of that time)."""
        names = {f.name for f in fields(cls)} - {"method", "sparsity"}
        given = {k: v for k, v in params.items() if k in names}
        config = cls(
            method=method,
            sparsity=0.0 if sparsity is None else sparsity,
            **(cls.LEGACY | given),
        )
        config.check()
        return config


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
    progress: Progress | None = None,
) -> dict[str, ChannelStats]:
    """One calibration pass: :class:`ChannelStats` per module, plus what the method derives from
    Gram matrices (SparseGPT's ``[H^-1]_jj``; the Gram matrices are dropped after use)."""
    coll = collector(modules, config)
    coll.run(model, batches, progress)
    return finish_stats(coll, config)


def collector(
    modules: Mapping[str, nn.Linear], config: BuildConfig | None, record: bool = False
) -> StatsCollector:
    """A statistics collector for ``modules`` that keeps what the method needs (``record``:
    each batch's sums apart, for ranks that gather them)."""
    finish = config.spec.finish if config is not None else None
    return StatsCollector(modules, gram=finish is not None, record=record)


def finish_stats(coll: StatsCollector, config: BuildConfig | None) -> dict[str, ChannelStats]:
    """A collector's statistics after the pass: what the method derives from Gram matrices is
    added, and empty or non-finite statistics are refused."""
    stats = coll.stats
    if config is not None and config.spec.finish is not None:
        finish_grams(coll, config, list(stats))
    if any(st.tokens == 0 for st in stats.values()):
        raise MaskstoreError(
            "the calibration data reached no masked module: are the samples empty?"
        )
    check_finite(stats)
    return stats


def finish_grams(coll: StatsCollector, config: BuildConfig, names: Iterable[str]) -> None:
    """What the method derives from the Gram matrices of modules ``names`` (SparseGPT's
    ``[H^-1]_jj``), added to their statistics; each Gram matrix is released once used, so a
    block-by-block pass holds one block's at a time."""
    finish = config.spec.finish
    for name in names:
        group = coll.group_of.get(name)
        if group is None:
            continue  # never reached: refused as empty statistics later
        if group not in coll.finished:
            gram = coll.grams.pop(group)
            coll.finished[group] = finish(gram, coll.gram_tokens.pop(group), config)
            del gram
        row, value = coll.finished[group]
        coll.stats[name].extra[row] = value


def gram_blocks(model: nn.Module, modules: Mapping[str, nn.Module], config: BuildConfig | None):
    """The decoder blocks to calibrate one at a time when the method accumulates Gram matrices
    (SparseGPT: so only one block's are ever held), None when it does not or a module lies
    outside the blocks (a head: the whole-model pass watches it)."""
    if config is None or config.spec.finish is None:
        return None
    layers = decoder_layers(model)
    if layers is None:
        return None
    inside = {id(m) for layer in layers for m in layer.modules()}
    return layers if all(id(m) in inside for m in modules.values()) else None


def block_finisher(
    collectors: Mapping[str, StatsCollector],
    modules: Mapping[str, nn.Module],
    config: BuildConfig,
    gather: Callable[[Mapping[str, StatsCollector], list[str]], None] | None = None,
) -> Callable[[nn.Module], None]:
    """``after_block`` for :func:`maskstore.build.offload.collect_by_block`: the block's Gram
    matrices (first ``gather``-ed across ranks) turned into what the method keeps, and freed."""

    def after_block(block: nn.Module) -> None:
        inside = {id(m) for m in block.modules()}
        names = [n for n, m in modules.items() if id(m) in inside]
        if gather is not None:
            gather(collectors, names)
        for c in collectors.values():
            finish_grams(c, config, names)

    return after_block


def check_finite(stats: Mapping[str, ChannelStats]) -> None:
    """Refuse statistics with inf or NaN (the model's own activations overflowed), naming the
    first module."""
    for name, st in stats.items():
        arr, _ = st.to_array()
        if not np.isfinite(arr).all():
            raise MaskstoreError(
                f"calibration statistics of {name} are not finite (the model's activations "
                "overflow there): build in --dtype float32 or bfloat16"
            )


def check_pairs(names: list[str], pairs: list[tuple[str, str]], config: BuildConfig) -> None:
    """Each pair names two different personas with data, each persona is in one pair at most,
    and pairs are given exactly when the method is contrastive."""
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
    missing = config.spec.required(st, config) if config.spec.required else None
    if missing:
        raise MaskstoreError(f"stored statistics of {p.name!r} lack {missing}")
    return st


def masks_for_module(
    weight: torch.Tensor,
    personas: list[PersonaStats],
    pairs: list[tuple[str, str]],
    module: str,
    config: BuildConfig,
    zero_kept: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Bool masks ``(out, in)`` of one module for every persona.

    Args:
        zero_kept: if given, per persona, adds how many kept weights scored exactly 0.
    """
    spec = config.spec
    out: dict[str, torch.Tensor] = {}
    groups = (
        [[p] for p in personas]
        if not spec.contrastive
        else [[by[a], by[b]] for by in [{p.name: p for p in personas}] for a, b in pairs]
    )
    for group in groups:
        stats = [_stat(p, module, config) for p in group]
        masks = spec.masks(weight, stats, config)
        for p, m in zip(group, masks, strict=True):
            out[p.name] = m
        if zero_kept is not None and spec.zero_kept is not None:
            for p, z in zip(group, spec.zero_kept(weight, stats, config, masks), strict=True):
                zero_kept[p.name] += z
    return out


def write_personas(
    bundle: Bundle,
    modules: Mapping[str, nn.Linear],
    personas: list[PersonaStats],
    pairs: list[tuple[str, str]],
    config: BuildConfig,
    progress: Progress | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    codec: str = "zstd",
    weight_of: Callable[[str], torch.Tensor] | None = None,
    masks_of: Callable[[str], tuple[dict[str, torch.Tensor], dict[str, int]]] | None = None,
) -> dict[str, dict]:
    """Score, select and write every persona into an open (writable) bundle, one module at a
    time.

    Args:
        weight_of: ``name -> weight`` when the modules' weights are not in memory (offload).
        masks_of: ``name -> (masks, zero_kept)`` when the masks were selected elsewhere (by
            other ranks); default: selected here.
    Returns:
        persona name -> its committed metadata.
    """
    config.check()
    check_pairs([p.name for p in personas], pairs, config)
    opposite = {a: b for a, b in pairs} | {b: a for a, b in pairs}
    tick = counter(progress, len(modules))
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
        kept = dict.fromkeys(writers, 0)
        zero = dict.fromkeys(writers, 0)
        for name, mod in modules.items():
            if masks_of is not None:
                masks, zeros = masks_of(name)
                for p, z in zeros.items():
                    zero[p] += z
            else:
                weight = mod.weight if weight_of is None else weight_of(name)
                masks = masks_for_module(weight, personas, pairs, name, config, zero)
            for p in personas:
                w = writers[p.name]
                kept[p.name] += int(masks[p.name].sum())
                w.write_mask(name, masks[p.name])
                w.write_stats(name, p.stats[name])
            tick(1)
        metas = {name: w.commit() for name, w in writers.items()}
        numel = sum(m.weight.numel() for m in modules.values())
        for name in writers:
            realised = 1 - kept[name] / max(numel, 1)
            if config.sparsity is not None and abs(realised - config.sparsity) > SPARSITY_WARN:
                warnings.warn(
                    f"persona {name}: realised sparsity {realised:.4f}, not the target "
                    f"{config.sparsity} (the method or ties decide more or fewer weights); "
                    "info --card shows both",
                    SparsityWarning,
                    stacklevel=2,
                )
            share = zero[name] / max(kept[name], 1)
            if share > ZERO_SCORE_WARN:
                warnings.warn(
                    f"persona {name}: {share:.1%} of the kept weights scored exactly 0, so the "
                    f"tie rule ({config.ties}) chose them; phi=softplus or a lower sparsity "
                    "avoids that",
                    TieWarning,
                    stacklevel=2,
                )
        return metas
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def write_bundle(
    out: str | os.PathLike,
    model: nn.Module,
    modules: Mapping[str, nn.Linear],
    personas: list[PersonaStats],
    *,
    pairs: list[tuple[str, str]] = (),
    config: BuildConfig | None = None,
    force: bool = False,
    progress: Progress | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    codec: str = "zstd",
    weight_of: Callable[[str], torch.Tensor] | None = None,
    masks_of: Callable[[str], tuple[dict[str, torch.Tensor], dict[str, int]]] | None = None,
    source: dict | None = None,
    into: bool = False,
) -> dict[str, dict]:
    """Score and write ``personas`` into a new bundle at ``out`` (atomically), or with
    ``into`` add them to the existing bundle ``out`` of the same model (each persona appears
    atomically; names it holds are refused).

    Args:
        weight_of: ``name -> weight`` when the modules' weights are not in memory (offload).
        masks_of: ``name -> (masks, zero_kept)`` selected elsewhere (see :func:`write_personas`).
        source: where the base model came from (``model``, ``revision``, ``dtype``); default:
            the model's ``name_or_path`` and dtype when it has them.
    Returns:
        persona name -> its committed metadata.
    """
    config = config or BuildConfig()
    config.check()
    for p in personas:
        check_persona_name(p.name)
    check_pairs([p.name for p in personas], list(pairs), config)
    fp = model_fingerprint(model, dict(modules), hash_weights=True, weight_of=weight_of)
    if into:
        bundle = WritableBundle(out)
        if metadata_digest(fp) != bundle.fingerprint_digest:
            raise MaskstoreError(
                f"{out} holds personas of another model (or other modules): add personas built "
                "on the model and modules it was built on"
            )
        taken = [p.name for p in personas if p.name in bundle.personas]
        if taken:
            raise MaskstoreError(
                f"{out} already holds {', '.join(taken)}: pick other names (or maskstore rm them)"
            )
        return write_personas(bundle, modules, personas, list(pairs), config, progress,
                              chunk_bytes, codec, weight_of, masks_of)  # fmt: skip
    if source is None:
        source = model_source(model)
    with create_bundle(out, fp, force=force, source=source) as bundle:
        return write_personas(
            bundle,
            modules,
            personas,
            list(pairs),
            config,
            progress,
            chunk_bytes,
            codec,
            weight_of,
            masks_of,
        )


def model_source(model: nn.Module, revision: str | None = None) -> dict:
    """``{"model", "revision", "dtype"}`` as far as the model knows them."""
    out: dict = {}
    name = getattr(getattr(model, "config", None), "name_or_path", None)
    if name:
        out["model"] = str(name)
        snap = re.search(r"/snapshots/([0-9a-f]{40})(/|$)", str(name))
        out["revision"] = revision or (snap.group(1) if snap else None)
    p = next(iter(model.parameters()), None)
    if p is not None:
        out["dtype"] = str(p.dtype).removeprefix("torch.")
    return out


def recompute_recipe(
    meta: dict, module: str, weight: torch.Tensor, stats: Mapping[str, ChannelStats]
) -> np.ndarray:
    """One module's packed mask of a recipe persona, recomputed as it was built: its recorded
    method and parameters over ``weight`` and the stored statistics (``stats``: the persona's
    and, for a contrastive pair, its opposite's). What repositories are given to recompute
    recipes (they never import this torch side)."""
    from ..store.bits import pack

    config = BuildConfig.from_params(meta["method"], meta["sparsity"], meta["params"])
    p, persona = meta["params"], meta["name"]
    names = [persona] + ([p["opposite"]] if "opposite" in p else [])
    pairs = []
    if "opposite" in p:
        pairs = [(persona, p["opposite"])] if p.get("role") == "+" else [(p["opposite"], persona)]
    st = [PersonaStats(n, {module: stats[n]}) for n in names]
    return pack(masks_for_module(weight, st, pairs, module, config)[persona])


def stats_from_bundle(
    source: Bundle, names: list[str] | None, modules: Mapping[str, nn.Linear]
) -> list[PersonaStats]:
    """The statistics a bundle stored for ``names`` (default: all its personas) and ``modules``,
    checked against the modules' shapes."""
    names = list(names or source.personas)
    for mname, mod in modules.items():
        have = source.fingerprint["modules"].get(mname)
        if have is None or list(have) != [mod.out_features, mod.in_features]:
            raise MaskstoreError(
                f"{source.path} does not match the model at {mname}: build from the model"
            )
    out = []
    for n in names:
        if not source.has_stats(n):
            raise MaskstoreError(f"persona {n!r} in {source.path} stores no statistics: rebuild it")
        meta = source.persona(n)
        out.append(
            PersonaStats(n, {m: source.read_stats(n, m) for m in modules}, meta["calibration"])
        )
    return out


def _source(batches: object, given: str | None) -> str:
    """What a persona's calibration record says made its batches: ``given``, else what
    :func:`~maskstore.build.calibration.batches` recorded on them, else the API's default."""
    return given or getattr(batches, "source", None) or API_SOURCE


def build(
    model: nn.Module,
    calibration: Mapping[str, Iterable[Batch]],
    out: str | os.PathLike,
    *,
    pairs: list[tuple[str, str]] = (),
    config: BuildConfig | None = None,
    modules: Mapping[str, nn.Linear] | None = None,
    force: bool = False,
    progress: Stage | None = None,
    calibration_source: str | None = None,
) -> Path:
    """Build a bundle from any ``torch.nn.Module`` and token batches per persona.

    Args:
        model: the model; called as ``model(input_ids=..., attention_mask=...)`` for dict batches,
            or ``model(ids)`` for tensor batches.
        calibration: persona name -> iterable of batches.
        out: the bundle directory to create (atomically).
        pairs: opposing personas ``(p+, p-)`` for the contrastive methods.
        modules: the ``nn.Linear`` modules to mask (default: all but LM head and embeddings).
        progress: ``stage(name, total) -> progress(done, total)`` (:mod:`maskstore.progress`):
            stages ``"calibrating <persona>"`` in samples (SparseGPT on a decoder-only model:
            one ``"calibrating, block by block"`` in blocks), then ``"scoring"`` in modules (off
            by default).
        calibration_source: how the batches were made, recorded with their digest
            (:class:`maskstore.build.calibration.Recorder`); default: what
            :func:`maskstore.build.calibration.batches` recorded on them (the command line's
            :func:`maskstore.build.calibration.describe`), so batches made as it makes them give
            the persona digests it gives.
    Returns:
        The bundle path.
    """
    config = config or BuildConfig()
    config.check()
    if not calibration:
        raise MaskstoreError("`calibration` names no persona: give {name: batches}")
    for n in calibration:
        check_persona_name(n)
    vocab = vocab_size(model)
    check_pairs(list(calibration), list(pairs), config)
    modules = dict(modules) if modules is not None else maskable_modules(model)
    personas = []
    layers = gram_blocks(model, modules, config)
    if layers is not None:  # SparseGPT: one block's Gram matrices at a time
        recs = {n: Recorder(bs, _source(bs, calibration_source), vocab)
                for n, bs in calibration.items()}  # fmt: skip
        batches = {n: list(enumerate(rec)) for n, rec in recs.items()}
        colls = {n: collector(modules, config) for n in calibration}
        step = progress("calibrating, block by block", len(layers)) if progress else None
        collect_by_block(model, layers, colls, batches, step,
                         after_block=block_finisher(colls, modules, config))  # fmt: skip
        for name, rec in recs.items():
            personas.append(PersonaStats(name, finish_stats(colls[name], config), rec.record()))
    for name, batches in calibration.items() if layers is None else ():
        step = progress(f"calibrating {name}", None) if progress else None
        rec = Recorder(batches, _source(batches, calibration_source), vocab)
        st = collect_stats(model, modules, rec, config, step)
        personas.append(PersonaStats(name, st, rec.record()))
    write_bundle(
        out,
        model,
        modules,
        personas,
        pairs=list(pairs),
        config=config,
        force=force,
        progress=progress("scoring", len(modules)) if progress else None,
    )
    return Path(out)


def build_from_stats(
    source: Bundle,
    model: nn.Module,
    out: str | os.PathLike,
    *,
    names: list[str] | None = None,
    pairs: list[tuple[str, str]] = (),
    config: BuildConfig | None = None,
    modules: Mapping[str, nn.Linear] | None = None,
    force: bool = False,
) -> Path:
    """Build a bundle from the statistics another bundle stored: no forward pass.

    Args:
        source: the bundle whose personas stored statistics.
        model: the model the statistics came from (its weights are scored).
        names: the personas to rebuild (default: all).
    Returns:
        The bundle path.
    """
    config = config or BuildConfig()
    config.check()
    modules = dict(modules) if modules is not None else maskable_modules(model)
    personas = stats_from_bundle(source, names, modules)
    write_bundle(out, model, modules, personas, pairs=list(pairs), config=config, force=force)
    return Path(out)


class _CallableModule(types.ModuleType):
    """``maskstore.build`` is this module and, called, :func:`build`: so both
    ``from maskstore import build; build(model, batches, out)`` and
    ``from maskstore.build import BuildConfig`` work."""

    def __call__(self, *args: Any, **kwargs: Any) -> Path:
        return build(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
