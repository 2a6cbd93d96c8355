"""The build pipeline the command line runs, as a library function: calibration (whole model,
block by block with ``offload``, or sharded across ``torchrun`` ranks) or stored statistics,
then scoring, selection and writing.

``maskstore build`` checks its arguments, makes a :class:`BuildJob` and calls
:func:`run_build`; API users can do the same, or call :func:`maskstore.build` with their own
model and token batches. Progress follows one convention: ``stage(name, total)`` returns a
``progress(done, total)`` callback for that stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..models import DEFAULT_MODEL, load_model, load_tokenizer, model_folder, torch_dtype
from ..modules import check_untied, maskable_modules, vocab_size
from ..progress import Progress, Stage
from ..store.format import DEFAULT_CHUNK_BYTES, Bundle
from . import (
    BuildConfig,
    PersonaStats,
    block_finisher,
    collector,
    distributed,
    finish_stats,
    gram_blocks,
    masks_for_module,
    model_source,
    stats_from_bundle,
    write_bundle,
)
from . import calibration as cal
from .offload import LayerwiseModel, checkpoint_bytes, collect_by_block


@dataclass(kw_only=True)
class BuildJob:
    """Everything ``maskstore build`` does, by keyword (the CLI's options)."""

    out: Path
    config: BuildConfig = field(default_factory=BuildConfig)
    data: dict[str, list] = field(default_factory=dict)  # persona -> calibration samples
    from_stats: Bundle | None = None  # or: reuse this bundle's statistics for ``names``
    names: list[str] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)
    model: str | None = None  # a folder, a cached Hub id, or None for the embedded model
    revision: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    only: str | None = None
    modules: str | None = None  # regex over module names
    include_lm_head: bool = False
    untie: bool = False
    samples: int | None = None
    seed: int = 0
    max_tokens: int = 512
    batch_size: int = 8
    chat_template: bool = False
    offload: bool = False
    max_memory: int | None = None  # bytes: offload when the weights are larger
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    codec: str = "zstd"
    force: bool = False
    into: bool = False  # add to the existing bundle ``out``


@dataclass
class BuildResult:
    out: Path
    metas: dict[str, dict]  # persona -> its committed metadata
    modules: dict  # name -> nn.Linear (shapes for the summary)
    seconds: dict[str, float]


def _stage(stage: Stage | None, name: str, total: int | None) -> Progress | None:
    return stage(name, total) if stage is not None else None


def run_build(job: BuildJob, stage: Stage | None = None) -> BuildResult | None:
    """Run a build; returns what was written (None on the ranks other than 0 under
    ``torchrun``, which only calibrate and select).

    Raises:
        MaskstoreError: bad input, found before the heavy work where it can be.
    """
    config, t0 = job.config, time.perf_counter()
    times: dict[str, float] = {}
    rank, size = distributed.world()
    if size > 1:
        distributed.init(job.device)
    budget = job.max_memory
    folder = model_folder(job.model, job.revision)
    layerwise = None
    if job.offload or (budget is not None and checkpoint_bytes(folder) > budget):
        from ..models import check_device

        check_device(job.device)
        layerwise = LayerwiseModel(
            folder, torch_dtype(job.dtype), job.device, budget=(budget or 4 << 30) // 4
        )
        mdl, tok = layerwise.model, load_tokenizer(folder)
    else:
        mdl, tok = load_model(folder, dtype=job.dtype, device=job.device)
    times["load_model"] = time.perf_counter() - t0
    mods = maskable_modules(mdl, only=job.only, pattern=job.modules,
                            include_lm_head=job.include_lm_head)  # fmt: skip
    check_untied(mdl, mods, job.untie)

    t1 = time.perf_counter()
    if job.from_stats is not None:
        stats = stats_from_bundle(job.from_stats, job.names, mods)
    else:
        stats = _calibrate(job, mdl, tok, mods, layerwise, rank, size, stage)
    times["calibration"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    weight_of = None if layerwise is None else layerwise.weight
    masks_of = None
    if size > 1:  # modules split across ranks for selection; rank 0 writes

        def select(name: str):
            zero = {p.name: 0 for p in stats}
            w = mods[name].weight if weight_of is None else weight_of(name)
            return masks_for_module(w, stats, job.pairs, name, config, zero), zero

        gathered = distributed.gather_masks(list(mods), select, rank, size)
        if rank != 0:
            distributed.finish()
            return None
        masks_of = gathered.__getitem__
    metas = write_bundle(
        job.out,
        mdl,
        mods,
        stats,
        pairs=job.pairs,
        config=config,
        force=job.force,
        progress=_stage(stage if rank == 0 else None, "scoring and writing", len(mods)),
        chunk_bytes=job.chunk_bytes,
        codec=job.codec,
        weight_of=weight_of,
        masks_of=masks_of,
        into=job.into,
        source={
            "model": str(job.model) if job.model is not None else f"embedded:{DEFAULT_MODEL}",
            "revision": job.revision or model_source(mdl).get("revision")
            if layerwise is None
            else job.revision,
            "dtype": job.dtype,
        },
    )
    if size > 1:
        distributed.finish()
    times["scoring_write"] = time.perf_counter() - t2
    times["total"] = time.perf_counter() - t0
    return BuildResult(Path(job.out), metas, mods, times)


def _calibrate(job, mdl, tok, mods, layerwise, rank, size, stage) -> list[PersonaStats]:
    """Each persona's statistics, with its calibration record over every batch (so every rank
    records the digest one process would)."""
    config = job.config
    chosen = {n: cal.choose(smp, job.samples, job.seed) for n, smp in job.data.items()}
    made = {n: list(cal.batches(tok, c, job.max_tokens, job.batch_size, job.chat_template))
            for n, c in chosen.items()}  # fmt: skip
    records = {}
    vocab = vocab_size(layerwise.model if layerwise is not None else mdl)  # another tokenizer?
    for n, bs in made.items():
        records[n] = cal.Recorder(bs, cal.describe(job.max_tokens, job.seed, job.chat_template),
                                  vocab)  # fmt: skip
        for _ in records[n]:
            pass
    # each rank takes every size-th batch; one process takes them all
    batches = {n: distributed.shard(bs, rank, size) for n, bs in made.items()}
    collectors = {n: collector(mods, config, record=size > 1) for n in job.data}
    shown = stage if rank == 0 else None
    layers = gram_blocks(layerwise.model if layerwise is not None else mdl, mods, config)
    if layers is not None:  # SparseGPT: one block's Gram matrices at a time
        gather = distributed.gather_grams if size > 1 else None
        kw = {"progress": _stage(shown, "calibrating, block by block", len(layers)),
              "after_block": block_finisher(collectors, mods, config, gather)}  # fmt: skip
        if layerwise is not None:
            layerwise.collect(collectors, batches, **kw)
        else:
            collect_by_block(mdl, layers, collectors, batches, **kw)
    elif layerwise is not None:
        layerwise.collect(collectors, batches,
                          progress=_stage(shown, "calibrating, block by block",
                                          len(layerwise.layers)))  # fmt: skip
    else:
        for n, bs in batches.items():
            total = sum(len(b["input_ids"]) for _, b in bs)
            collectors[n].run(mdl, [b for _, b in bs], progress=_stage(shown, f"calibrating {n}",
                              total), indices=[i for i, _ in bs])  # fmt: skip
    if size > 1:
        distributed.gather_stats(collectors)
    return [
        PersonaStats(n, finish_stats(collectors[n], config), records[n].record()) for n in chosen
    ]
