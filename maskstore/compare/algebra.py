"""Set algebra across personas, on packed bits, streaming chunk by chunk.

A mask is the set of kept weights. For every module, one pass over its chunks reads each chunk of
each persona once and accumulates |A| per persona and |A and B| for every pair; everything else
follows from those and the number of positions ``total`` (out * in, padding excluded):

    |A or B| = |A| + |B| - |A and B|      |A minus B| = |A| - |A and B|
    Hamming  = |A| + |B| - 2 |A and B|    differential ratio = Hamming / total
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import MaskstoreError
from ..progress import Progress, counter
from ..store.bits import pad_mask
from ..store.format import Bundle
from ..store.names import module_kind, module_layer

GROUPINGS = ("model", "kind", "layer", "module")
METRICS = ("jaccard", "diff", "pruned_jaccard", "overlap", "intersection", "hamming")


@dataclass(frozen=True)
class Ref:
    """A persona in a bundle; ``source`` names the bundle where the persona's name alone is
    ambiguous (:func:`labelled`)."""

    bundle: Bundle
    name: str
    source: str | None = None

    @property
    def label(self) -> str:
        """``NAME``, or ``SOURCE#NAME`` when another operand has the same name."""
        return self.name if self.source is None else f"{self.source}#{self.name}"


def labelled(refs: list[Ref], sources: list[str]) -> list[Ref]:
    """``refs`` with unambiguous labels: ``NAME`` when no other ref has that name, else
    ``SOURCE#NAME`` (``sources[i]`` naming ``refs[i]``'s bundle as the user wrote it).

    Raises:
        MaskstoreError: the same persona of the same source given twice.
    """
    count: dict[str, int] = {}
    for r in refs:
        count[r.name] = count.get(r.name, 0) + 1
    out = [Ref(r.bundle, r.name, src if count[r.name] > 1 else None)
           for r, src in zip(refs, sources, strict=True)]  # fmt: skip
    labels = [r.label for r in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise MaskstoreError(f"{', '.join(dup)} given twice: name each persona once")
    return out


def check_compatible(refs: list[Ref]) -> list[str]:
    """Modules all personas mask, after checking their bundles describe the same model.

    Raises:
        MaskstoreError: naming the first architecture, shape or weights mismatch.
    """
    base = refs[0].bundle.fingerprint
    for r in refs[1:]:
        fp = r.bundle.fingerprint
        if fp is base:
            continue
        if fp["architecture"] != base["architecture"]:
            raise MaskstoreError(
                f"{r.name!r} is for {fp['architecture']}, {refs[0].name!r} for "
                f"{base['architecture']}: compare masks of one model"
            )
        for m, shape in fp["modules"].items():
            if m in base["modules"] and list(base["modules"][m]) != list(shape):
                raise MaskstoreError(
                    f"module {m} is {tuple(shape)} for {r.name!r} but "
                    f"{tuple(base['modules'][m])} for {refs[0].name!r}: different models"
                )
        wa, wb = base.get("weights_xxh3"), fp.get("weights_xxh3")
        if wa and wb and wa != wb:
            raise MaskstoreError(
                f"{r.name!r} and {refs[0].name!r} were built on different weights: compare one model"
            )
    common = None
    for r in refs:
        mods = r.bundle.persona_modules(r.name)
        common = mods if common is None else [m for m in common if m in set(mods)]
    if not common:
        raise MaskstoreError("the personas share no masked module: nothing to compare")
    return common


def _lockstep(refs: list[Ref], module: str) -> Iterator[list[np.ndarray]]:
    """Blocks of one module, aligned across personas; each chunk of each persona read once.
    Like :meth:`Bundle.iter_chunks`' blocks, they are valid until the next step."""
    gens = [r.bundle.iter_chunks(r.name, module) for r in refs]
    for items in zip(*gens, strict=True):
        starts = {r0 for r0, _ in items}
        if len(starts) == 1 and len({b.shape[0] for _, b in items}) == 1:
            yield [b for _, b in items]
            continue
        # Chunk grids differ (personas written with other chunk sizes): they differ from the
        # first chunk on, so read the rest of each module whole and compare that once.
        yield [
            np.concatenate([b, *(blk for _, blk in g)])
            for (_, b), g in zip(items, gens, strict=True)
        ]
        return


def _words(block: np.ndarray) -> np.ndarray:
    """A packed block as a flat uint64 view (a zero-padded copy only if its size needs it)."""
    flat = np.ascontiguousarray(block).reshape(-1)
    if flat.size % 8:
        flat = np.concatenate([flat, np.zeros(8 - flat.size % 8, dtype=np.uint8)])
    return flat.view(np.uint64)


@dataclass
class ModuleCounts:
    """Counts for one module: kept[i] = |P_i|, inter[i, j] = |P_i and P_j| (diagonal = kept)."""

    name: str
    total: int
    inter: np.ndarray  # (N, N) int64

    @property
    def kind(self) -> str:
        return module_kind(self.name)

    @property
    def layer(self) -> int | None:
        return module_layer(self.name)


def count_module(refs: list[Ref], module: str) -> ModuleCounts:
    """Pairwise intersection counts of one module over all personas, streaming."""
    n = len(refs)
    out_f, in_f = (
        refs[0].bundle.modules[module].out_features,
        refs[0].bundle.modules[module].in_features,
    )
    inter = np.zeros((n, n), dtype=np.int64)
    tmp = cnt = None
    for blocks in _lockstep(refs, module):
        words = [_words(b) for b in blocks]
        if tmp is None or tmp.shape != words[0].shape:
            tmp = np.empty_like(words[0])
            cnt = np.empty(words[0].shape, dtype=np.uint8)
        # per-word counts are <= 64, so a uint32 sum cannot overflow below 2**26 words, and
        # summing into uint32 runs twice as fast as into uint64
        acc = np.uint32 if words[0].size < 1 << 26 else np.uint64
        for i in range(n):
            np.bitwise_count(words[i], out=cnt)
            inter[i, i] += int(np.add.reduce(cnt, dtype=acc))
            for j in range(i + 1, n):
                np.bitwise_and(words[i], words[j], out=tmp)
                np.bitwise_count(tmp, out=cnt)
                inter[i, j] += int(np.add.reduce(cnt, dtype=acc))
    iu = np.triu_indices(n, 1)
    inter[(iu[1], iu[0])] = inter[iu]
    return ModuleCounts(module, out_f * in_f, inter)


def count_all(
    refs: list[Ref], modules: list[str] | None = None, progress: Progress | None = None
) -> list[ModuleCounts]:
    """Counts for every module the personas share (or ``modules``), one module at a time
    (``progress(done, total)`` in modules)."""
    common = check_compatible(refs)
    if modules is not None:
        missing = [m for m in modules if m not in common]
        if missing:
            raise MaskstoreError(f"module {missing[0]!r} is not masked by every persona")
        common = modules
    out, tick = [], counter(progress, len(common))
    for m in common:
        out.append(count_module(refs, m))
        tick(1)
    return out


def group_key(mc: ModuleCounts, by: str) -> str:
    if by == "model":
        return "model"
    if by == "kind":
        return mc.kind
    if by == "layer":
        return "none" if mc.layer is None else str(mc.layer)
    if by == "module":
        return mc.name
    raise MaskstoreError(f"unknown grouping {by!r}: use one of {', '.join(GROUPINGS)}")


def aggregate(counts: Iterable[ModuleCounts], by: str) -> dict[str, tuple[int, np.ndarray]]:
    """Sum counts per group: ``{group: (total, inter)}`` in first-seen order."""
    groups: dict[str, tuple[int, np.ndarray]] = {}
    for mc in counts:
        k = group_key(mc, by)
        if k in groups:
            t, m = groups[k]
            groups[k] = (t + mc.total, m + mc.inter)
        else:
            groups[k] = (mc.total, mc.inter.copy())
    if by == "layer":
        groups = dict(
            sorted(
                groups.items(),
                key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0),
            )
        )
    return groups


def pair_metrics(a: int, b: int, inter: int, total: int) -> dict[str, float | int]:
    """Every count and metric of one pair from |A|, |B|, |A and B| and the positions compared."""
    union = a + b - inter
    hamming = a + b - 2 * inter
    pruned_union = total - inter
    return {
        "total": total,
        "kept_a": a,
        "kept_b": b,
        "intersection": inter,
        "union": union,
        "a_minus_b": a - inter,
        "b_minus_a": b - inter,
        "hamming": hamming,
        "jaccard": inter / union if union else 1.0,
        "pruned_jaccard": (total - union) / pruned_union if pruned_union else 1.0,
        "overlap": inter / min(a, b) if min(a, b) else 1.0,
        "diff_ratio": hamming / total if total else 0.0,
        "kept_share_a": a / total if total else 0.0,
        "kept_share_b": b / total if total else 0.0,
    }


def metric_name(metric: str) -> str:
    return {"diff": "diff_ratio"}.get(metric, metric)


def pairs_report(refs: list[Ref], counts: list[ModuleCounts], by: str = "kind") -> list[dict]:
    """One JSON-ready dict per pair (i < j): overall metrics plus the same under ``groups``."""
    overall = aggregate(counts, "model")["model"]
    groups = aggregate(counts, by) if by != "model" else {}
    out = []
    n = len(refs)
    for i in range(n):
        for j in range(i + 1, n):
            total, m = overall
            rec = {"a": refs[i].label, "b": refs[j].label}
            rec.update(pair_metrics(int(m[i, i]), int(m[j, j]), int(m[i, j]), total))
            rec["groups"] = {
                k: pair_metrics(int(g[i, i]), int(g[j, j]), int(g[i, j]), t)
                for k, (t, g) in groups.items()
            }
            out.append(rec)
    return out


# --------------------------------------------------------------------------------------------
# New masks from old

_BINARY: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "union": lambda a, b, out: np.bitwise_or(a, b, out=out),
    "intersect": lambda a, b, out: np.bitwise_and(a, b, out=out),
    "subtract": lambda a, b, out: np.bitwise_and(a, np.invert(b, out=out), out=out),
    "xor": lambda a, b, out: np.bitwise_xor(a, b, out=out),
}
OPS = (*_BINARY, "complement", "vote")
_NARY = ("union", "intersect", "vote")  # any number of operands from 2 (vote: from 1)


def _arity(op: str, n: int, at_least: int | None) -> None:
    if op == "complement":
        ok, want = n == 1, "1 persona"
    elif op in ("subtract", "xor"):
        ok, want = n == 2, "2 personas"
    elif op == "vote":
        ok, want = n >= 1, "at least 1 persona"
    else:
        ok, want = n >= 2, "at least 2 personas"
    if not ok:
        raise MaskstoreError(f"{op} takes {want}, got {n}")
    if op == "vote" and not (isinstance(at_least, int) and 1 <= at_least <= n):
        raise MaskstoreError(f"vote needs `at_least` K with 1 <= K <= {n}, got {at_least}")
    if op != "vote" and at_least is not None:
        raise MaskstoreError("`at_least` is for vote")


def _check_writable(bundle: Bundle) -> None:
    if not hasattr(bundle, "persona_writer"):
        raise MaskstoreError(
            f"{bundle.path} was opened read-only: open it with open_bundle(path, writable=True)"
        )


def _operand(bundle: Bundle, op: str | Ref) -> tuple[Ref, str]:
    """An operand as a :class:`Ref` and the name provenance records for it: ``NAME`` in
    ``bundle``, or a ``Ref`` into another bundle of the same model (recorded as
    ``<its folder name>#NAME``; its digest pins the content)."""
    if isinstance(op, Ref):
        if op.bundle is bundle:
            return op, op.name
        return op, f"{op.bundle.path.name}#{op.name}"
    return Ref(bundle, op), op


def apply_op(
    bundle: Bundle,
    op: str,
    operands: list[str | Ref],
    name: str,
    overwrite: bool = False,
    at_least: int | None = None,
) -> dict:
    """Write ``op(operands)`` as a new persona ``name`` of the same (directory) bundle.

    Args:
        op: union or intersect (2 or more operands), subtract (A minus B), xor, complement
            (one operand), or vote (a weight is kept where ``at_least`` operands keep it).
        operands: persona names in ``bundle``, or :class:`Ref` s to personas of other bundles
            of the same model.
        name: the new persona's name; its provenance records ``op`` and the operand digests.
        at_least: vote's K (1 <= K <= number of operands).
    Returns:
        The new persona's metadata.
    """
    if op not in OPS:
        raise MaskstoreError(f"unknown operation {op!r}: use one of {', '.join(OPS)}")
    _arity(op, len(operands), at_least)
    _check_writable(bundle)
    refs, labels = zip(*(_operand(bundle, o) for o in operands), strict=True)
    refs = list(refs)
    modules = check_compatible(refs)
    metas = [r.bundle.persona(r.name) for r in refs]
    provenance = {
        "op": op,
        "operands": [
            {"name": p, "digest": m["digest"]} for p, m in zip(labels, metas, strict=True)
        ],
    }
    sp = [m["sparsity"] for m in metas]
    params = {"operands": list(labels)} | ({"at_least": at_least} if op == "vote" else {})
    with bundle.persona_writer(
        name,
        method=op,
        params=params,
        sparsity=None if op != "complement" or sp[0] is None else 1 - sp[0],
        provenance=provenance,
        overwrite=overwrite,
    ) as w:
        for module in modules:
            w.write_packed_blocks(module, _op_blocks(refs, module, op, at_least))
        return w.meta


def _op_blocks(
    refs: list[Ref], module: str, op: str, at_least: int | None = None
) -> Iterator[np.ndarray]:
    pad = pad_mask(refs[0].bundle.modules[module].in_features)
    for blocks in _lockstep(refs, module):
        out = np.empty_like(blocks[0])
        if op == "complement":
            np.invert(blocks[0], out=out)
        elif op == "vote":  # count each bit over the operands, a row block at a time
            count = np.zeros((blocks[0].shape[0], blocks[0].shape[1] * 8), np.uint16)
            for b in blocks:
                count += np.unpackbits(b, axis=1, bitorder="little")
            out = np.packbits(count >= at_least, axis=1, bitorder="little")
        else:
            _BINARY[op](blocks[0], blocks[1], out)
            for b in blocks[2:]:  # union and intersect fold left over more operands
                _BINARY[op](out, b, out)
        np.bitwise_and(out, pad, out=out)  # padding bits stay zero
        yield out


__all__ = [
    "OPS",
    "ModuleCounts",
    "Ref",
    "aggregate",
    "apply_op",
    "blend",
    "check_blend_weights",
    "gather",
    "count_all",
    "pair_metrics",
    "pairs_report",
]


def blend(bundle: Bundle, weights: dict[str, float], name: str, overwrite: bool = False) -> dict:
    """Store the weighted soft combination ``G = sum_p w_p G_p`` as persona ``name`` (as PEFT's
    ``add_weighted_adapter``): its params hold the weights, its provenance the operands'
    digests, and its mask their union (where any operand keeps a weight, so ``G > gamma``).
    :meth:`maskstore.MaskHandle.use` applies it by name.

    Args:
        weights: persona (of ``bundle``) -> weight >= 0; the weights sum to 1.
    Returns:
        The new persona's metadata.
    """
    check_blend_weights(bundle, weights)
    _check_writable(bundle)
    names = list(weights)
    refs = [Ref(bundle, p) for p in names]
    modules = check_compatible(refs)
    provenance = {
        "op": "blend",
        "operands": [{"name": p, "digest": bundle.persona(p)["digest"]} for p in names],
    }
    with bundle.persona_writer(
        name,
        method="blend",
        params={"weights": {p: float(w) for p, w in weights.items()}},
        sparsity=None,
        provenance=provenance,
        overwrite=overwrite,
    ) as w:
        for module in modules:  # the union: kept where at least one operand keeps
            w.write_packed_blocks(module, _op_blocks(refs, module, "vote", 1))
        return w.meta


def gather(refs: list[Ref], out: str | os.PathLike) -> list[str]:
    """Copy personas of several bundles of one model into a new bundle at ``out`` (so that one
    :class:`~maskstore.runtime.MaskHandle` can switch between them). Masks only; metadata and
    digests as they were. A name taken twice gets a ``.2``, ``.3``... suffix.

    Returns:
        The name of each ref's copy, in order.
    """
    from ..store.writer import create_bundle

    check_compatible(refs)
    names: list[str] = []
    with create_bundle(out, refs[0].bundle.fingerprint, source=refs[0].bundle.model_source) as nb:
        for r in refs:
            meta = r.bundle.persona(r.name)
            if meta["method"] == "blend":
                raise MaskstoreError(
                    f"{r.label} is a blend: use it from its own bundle, with its operands"
                )
            name, k = r.name, 1
            while name in names:
                k += 1
                name = f"{r.name}.{k}"
            names.append(name)
            keep = ("method", "params", "sparsity", "calibration", "provenance")
            with nb.persona_writer(name, **{f: meta[f] for f in keep}) as w:
                for module in meta["modules"]:
                    w.write_packed_blocks(
                        module, (b for _, b in r.bundle.iter_chunks(r.name, module))
                    )
    return names


def check_blend_weights(bundle: Bundle, weights: dict[str, float]) -> None:
    """Weights of a blend: known personas of ``bundle``, numbers >= 0 that sum to 1."""
    if not weights:
        raise MaskstoreError("a weighted combination needs at least one persona")
    for p, w in weights.items():
        if p not in bundle.personas:
            known = ", ".join(bundle.personas) or "none"
            raise MaskstoreError(f"unknown persona {p!r}; known: {known}")
        if bundle.persona(p)["method"] == "blend":
            raise MaskstoreError(f"{p!r} is itself a blend: blend the personas it combines")
        if not (isinstance(w, int | float) and not isinstance(w, bool) and w >= 0):
            raise MaskstoreError(f"weight of {p!r} must be a number >= 0, got {w!r}")
    if abs(sum(weights.values()) - 1.0) > 1e-6:
        raise MaskstoreError(
            f"weights must sum to 1 (kept weights stay unchanged), got {sum(weights.values())}"
        )


def overlap(bundle: Bundle, personas: list[str] | None = None, by: str = "model") -> list[dict]:
    """All-pairs overlap of a bundle's personas (default: all of them), streaming over packed
    bits: one dict per pair with its metrics (``jaccard``, ``diff_ratio``, ...), and the same
    per ``by`` group (``kind``, ``layer``, ``module``)."""
    if by not in GROUPINGS:
        raise MaskstoreError(f"by must be one of {', '.join(GROUPINGS)}, got {by!r}")
    names = list(bundle.personas if personas is None else personas)
    dup = sorted({p for p in names if names.count(p) > 1})
    if dup:  # as the command line says it
        raise MaskstoreError(f"{', '.join(map(str, dup))} given twice: name each persona once")
    refs = [Ref(bundle, p) for p in names]
    for r in refs:
        bundle.persona(r.name)
    if len(refs) < 2:
        raise MaskstoreError("overlap compares at least two personas")
    return pairs_report(refs, count_all(refs), by=by)
