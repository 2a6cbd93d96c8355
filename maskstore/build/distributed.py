"""Data-parallel calibration on ``torch.distributed`` (``torchrun``; gloo on CPU, nccl on GPU).

Each rank takes every N-th batch of each persona's calibration set. A rank does not sum its
batches: it keeps each batch's sums apart, and every rank gathers all of them and folds them in
calibration order, exactly as one process folds them batch by batch. The statistics, and so the
masks and digests, are therefore bit for bit those of one process, for any number of ranks
(float addition is not associative, so a reduce of per-rank totals would not be). Modules are
then split across ranks for scoring and selection, and rank 0 gathers the packed masks and
writes the bundle.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from ..errors import MaskstoreError
from ..store.bits import pack, unpack
from .collect import StatsCollector


def world() -> tuple[int, int]:
    """``(rank, world size)`` from torchrun's environment (``(0, 1)`` outside it)."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise MaskstoreError("RANK and WORLD_SIZE must be integers (set by torchrun)") from None


def init(device: str = "cpu") -> None:
    """Join the process group torchrun describes: nccl for CUDA devices, else gloo."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)


def finish() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(items: Sequence, rank: int, size: int) -> list[tuple[int, object]]:
    """``(index, item)`` for every ``size``-th item starting at ``rank``."""
    return [(i, x) for i, x in enumerate(items) if i % size == rank]


def _gather(obj: object) -> list:
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_stats(collectors: Mapping[str, StatsCollector]) -> None:
    """Every rank's recorded per-batch sums, folded in calibration order on every rank."""
    mine = {p: c.partials for p, c in collectors.items()}
    every = _gather(mine)
    for persona, coll in collectors.items():
        merged = {
            name: [part for rank in every for part in rank[persona][name]] for name in coll.modules
        }
        coll.replay(merged)
        coll.partials = {n: [] for n in coll.modules}


def gather_grams(collectors: Mapping[str, StatsCollector], names: Iterable[str]) -> None:
    """The Gram matrices of modules ``names`` (one block's): every rank's per-batch ``X^T X``,
    folded on every rank in calibration order (the first batch's, then ``+=`` each next one,
    as one process folds them), so SparseGPT's ``[H^-1]_jj`` are bit for bit one process's.
    Only one block's matrices are in flight at a time."""
    names = list(names)
    mine = {}
    for p, c in collectors.items():
        of = {n: c.group_of[n] for n in names if n in c.group_of}
        mine[p] = (of, {g: c.gram_parts.pop(g, []) for g in set(of.values())})
    every = _gather(mine)
    del mine
    for persona, coll in collectors.items():
        for rank in every:  # a rank with none of this persona's batches learns the groups here
            coll.group_of.update(rank[persona][0])
        for g in {g for rank in every for g in rank[persona][1]}:
            parts = sorted((x for rank in every for x in rank[persona][1].get(g, [])),
                           key=lambda x: x[0])  # fmt: skip
            total, tokens = parts[0][1], parts[0][2]
            for _, gram, n in parts[1:]:
                total += gram
                tokens += n
            coll.grams[g], coll.gram_tokens[g] = total, tokens
    every.clear()


def gather_masks(
    names: list[str], select, rank: int, size: int
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, int]]] | None:
    """Modules ``names[rank::size]`` selected here (``select(name) -> (masks, zero_kept)``);
    rank 0 gets every module's, packed on the way."""
    import torch.distributed as dist

    local = {}
    for name in names[rank::size]:
        masks, zeros = select(name)
        local[name] = ({p: pack(m) for p, m in masks.items()}, zeros,
                       {p: m.shape[1] for p, m in masks.items()})  # fmt: skip
    every: list = [None] * size if rank == 0 else None
    dist.gather_object(local, every, dst=0)
    if rank != 0:
        return None
    out = {}
    for part in every:
        for name, (packed, zeros, widths) in part.items():
            out[name] = (
                {
                    p: torch.from_numpy(np.ascontiguousarray(unpack(b, widths[p])))
                    for p, b in packed.items()
                },
                zeros,
            )
    return out
