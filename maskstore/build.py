"""The scoring pipeline: statistics from a model, masks from statistics, written to a bundle.

Two stages, so that one calibration pass serves many masks ("score once, threshold many"):

1. :func:`collect_stats` runs the model over token batches once per persona (or
   :func:`stats_from_bundle` reads statistics a bundle stored);
2. :func:`write_bundle` scores one module at a time (never a whole model's scores at once),
   selects each persona's mask with the method's registry entry (:mod:`maskstore.methods`), and
   streams masks and statistics into a new bundle.

:func:`build` and :func:`build_from_stats` are the two stages together; the CLI, recipes and the
tests all call these.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import methods, scoring
from .collect import Batch, StatsCollector
from .errors import MaskstoreError
from .format import DEFAULT_CHUNK_BYTES, Bundle
from .modules import maskable_modules, model_fingerprint
from .names import check_persona_name
from .stats import ChannelStats
from .writer import create_bundle

Progress = Callable[[int], None] | None


@dataclass
class BuildConfig:
    """How masks are scored and selected; the fields that matter are recorded in each persona's
    metadata (``params``), and :meth:`from_params` reads them back."""

    method: str = "wanda"
    sparsity: float = 0.5
    selection: str = "row"  # row | nm | layer
    n: int = 2  # N of N:M
    m: int = 4  # M of N:M
    phi: str = "relu"  # contrastive-wanda: relu | softplus
    eps: float = 1e-6
    tau: float = 1.0
    damp: float = 0.01  # sparsegpt: lambda = damp * mean(diag(H))

    def check(self) -> None:
        methods.get(self.method)
        if not 0.0 <= self.sparsity < 1.0:
            raise MaskstoreError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.selection not in scoring.SELECTIONS:
            raise MaskstoreError(f"unknown selection {self.selection!r}: use row, nm or layer")
        if self.phi not in ("relu", "softplus"):
            raise MaskstoreError(f"unknown phi {self.phi!r}: use relu or softplus")
        if self.eps <= 0 or self.tau <= 0 or self.damp <= 0:
            raise MaskstoreError("eps, tau and damp must be positive")

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

    @classmethod
    def from_params(
        cls, method: str, sparsity: float | None, params: Mapping[str, Any]
    ) -> BuildConfig:
        """The config a persona was built with, from its recorded ``method``, ``sparsity`` and
        ``params`` (pair keys and fields of older versions are ignored)."""
        names = {f.name for f in fields(cls)} - {"method", "sparsity"}
        config = cls(
            method=method,
            sparsity=0.0 if sparsity is None else sparsity,
            **{k: v for k, v in params.items() if k in names},
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
    progress: Progress = None,
) -> dict[str, ChannelStats]:
    """One calibration pass: :class:`ChannelStats` per module, plus what the method derives from
    Gram matrices (SparseGPT's ``[H^-1]_jj``; the Gram matrices are dropped after use)."""
    finish = config.spec.finish if config is not None else None
    coll = StatsCollector(modules, gram=finish is not None)
    stats = coll.run(model, batches, progress)
    if finish is not None:
        done: dict[str, tuple[str, Any]] = {}
        for name, st in stats.items():
            group = coll.group_of[name]
            if group not in done:
                done[group] = finish(coll.grams[group], st.tokens, config)
            row, value = done[group]
            st.extra[row] = value
    if any(st.tokens == 0 for st in stats.values()):
        raise MaskstoreError(
            "the calibration data reached no masked module: are the samples empty?"
        )
    return stats


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
) -> dict[str, torch.Tensor]:
    """Bool masks ``(out, in)`` of one module for every persona."""
    spec = config.spec
    out: dict[str, torch.Tensor] = {}
    if not spec.contrastive:
        for p in personas:
            (out[p.name],) = spec.masks(weight, [_stat(p, module, config)], config)
        return out
    by = {p.name: p for p in personas}
    for a, b in pairs:
        out[a], out[b] = spec.masks(
            weight, [_stat(by[a], module, config), _stat(by[b], module, config)], config
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
    """Score, select and write every persona into an open (writable) bundle, one module at a
    time.

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


def write_bundle(
    out: str | os.PathLike,
    model: nn.Module,
    modules: Mapping[str, nn.Linear],
    personas: list[PersonaStats],
    *,
    pairs: list[tuple[str, str]] = (),
    config: BuildConfig | None = None,
    force: bool = False,
    progress: Progress = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    codec: str = "zstd",
) -> dict[str, dict]:
    """Score and write ``personas`` into a new bundle at ``out`` (atomically).

    Returns:
        persona name -> its committed metadata.
    """
    config = config or BuildConfig()
    config.check()
    for p in personas:
        check_persona_name(p.name)
    check_pairs([p.name for p in personas], list(pairs), config)
    fp = model_fingerprint(model, dict(modules), hash_weights=True)
    with create_bundle(out, fp, force=force) as bundle:
        return write_personas(
            bundle, modules, personas, list(pairs), config, progress, chunk_bytes, codec
        )


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
    write_bundle(out, model, modules, personas, pairs=list(pairs), config=config, force=force)
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
