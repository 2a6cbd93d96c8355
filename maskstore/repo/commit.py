"""Committing a bundle as a version: chunks, then the manifest, then the branch ref.

A mask array may be stored as a **delta**: its chunks are the xor against the same module of a
base persona (an earlier persona of the same version, or the same persona in the parent version),
chosen when the xor is sparser (smaller entropy) than the mask itself; chains are at most
``MAX_DELTA_DEPTH`` deep. A persona may be stored as a **recipe**: statistics, method and mask
digests, no mask bits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import MaskstoreError
from ..progress import Progress, counter
from ..store import codecs
from ..store.bits import popcount
from ..store.format import Bundle
from ..store.names import check_ref_name
from .objects import new_manifest
from .snapshot import MAX_DELTA_DEPTH, VersionSource

if TYPE_CHECKING:
    from ._protocol import RepositoryLike as Repository

# A delta base: (the parent version's bundle, or None for this commit; persona; depth; bits)
Base = tuple[Bundle | None, str, int, float]


def commit(
    repo: Repository,
    b: Bundle,
    message: str,
    branch: str = "main",
    delta: bool = True,
    recipes: tuple[str, ...] = (),
    progress: Progress | None = None,
    author: str | None = None,
    allow_empty: bool = False,
) -> str:
    """Snapshot bundle ``b`` as a new version on ``branch``; returns the version id.

    ``author`` is recorded in the manifest (``log`` shows it). A bundle whose personas are the
    branch head's, digest for digest, is refused unless ``allow_empty``.

    Holds the repository's lock shared: gc (exclusive) cannot remove an object that this
    commit found present and so did not write.
    """
    check_ref_name(branch)
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        raise MaskstoreError("the commit message is not valid UTF-8: retype it") from None
    if author is not None and (len(author) > 256 or not author.isprintable()):
        raise MaskstoreError("the author must be printable and at most 256 characters")
    head = repo.refs.get("branches", branch)
    if head and not allow_empty:
        had = {p: e["meta"]["digest"] for p, e in repo.objects.manifest(head)["personas"].items()}
        if had == {p: b.persona(p)["digest"] for p in b.personas}:
            raise MaskstoreError(
                f"nothing to commit: the bundle's personas are {branch}'s head {head[:12]}, "
                "digest for digest (allow_empty=True commits anyway)"
            )
    with repo.store.lock("gc", shared=True):
        return _commit(repo, b, message, branch, delta, recipes, progress, author)


def _commit(
    repo: Repository,
    b: Bundle,
    message: str,
    branch: str,
    delta: bool,
    recipes: tuple[str, ...],
    progress: Progress | None,
    author: str | None = None,
) -> str:
    parent = repo.refs.get("branches", branch)
    tick = counter(progress, sum(len(b.persona(p)["modules"]) for p in b.personas))
    # one reader of the parent for the whole commit: its persona metadata is checked once
    parent_b = Bundle(source=repo.source(parent)) if parent else None
    personas: dict[str, dict] = {}
    depth: dict[tuple[str, str], int] = {}
    for p in b.personas:
        meta = b.persona(p)
        if p in recipes:
            _check_recipe(b, p)
        arrays = {}
        for module in meta["modules"]:
            kinds = ["masks"] + (["stats"] if meta["modules"][module].get("stats") else [])
            for kind in kinds:
                arr, _ameta = b.array(p, kind, module)
                key = f"{kind}/{module}"
                if kind == "masks" and p in recipes:
                    arrays[key] = {"zarr": arr.meta.raw, "recipe": True}
                    continue
                base = None
                if kind == "masks" and delta:
                    base = _pick_base(b, p, module, personas, parent_b, depth)
                arrays[key] = _store_array(repo, b, p, kind, module, arr.meta.raw, base)
                if base is not None:
                    depth[(p, module)] = base[2] + 1
            tick(1)
        personas[p] = {"meta": meta, "arrays": arrays}
    man = new_manifest([parent] if parent else [], message, b.meta, personas, b.digest, author)
    vid = repo.objects.put_manifest(man)
    repo.refs.set_branch(branch, vid, parent)
    return vid


def _source(b: Bundle) -> VersionSource:
    """The version a parent bundle reads."""
    assert isinstance(b.source, VersionSource)
    return b.source


def _check_recipe(b: Bundle, p: str) -> None:
    meta = b.persona(p)
    if meta["provenance"]["op"] != "build" or not b.has_stats(p):
        raise MaskstoreError(f"persona {p!r} cannot be a recipe: it was not built from statistics")
    opp = meta["params"].get("opposite")
    if opp and (opp not in b.personas or not b.has_stats(opp)):
        raise MaskstoreError(
            f"recipe {p!r} needs its opposite {opp!r} with statistics in the bundle"
        )


def _pick_base(
    b: Bundle,
    p: str,
    module: str,
    done: dict[str, dict],
    parent: Bundle | None,
    depth: dict[tuple[str, str], int],
) -> Base | None:
    """The sparsest xor base for ``p``'s mask of ``module``, or None when none beats the mask."""
    mine = b.read_packed(p, module)
    my_rows = b.array(p, "masks", module)[0].meta.chunk_rows
    info = b.modules[module]
    best: Base | None = None
    own_h = codecs.entropy(popcount(mine) / info.numel) * info.numel  # the mask itself ~H(p)
    cands: list[tuple[Bundle | None, str]] = [
        (None, q)
        for q in done
        if module in done[q]["meta"]["modules"]
        and f"masks/{module}" in done[q]["arrays"]
        and not done[q]["arrays"][f"masks/{module}"].get("recipe")
    ]
    if parent is not None and p in parent.personas:
        pe = _source(parent).manifest["personas"][p]["arrays"].get(f"masks/{module}", {})
        if not pe.get("recipe") and "chunks" in pe:
            cands.append((parent, p))
    for src, q in cands:
        d = depth.get((q, module), 0) if src is None else _source(src).depth(q, module)
        if d >= MAX_DELTA_DEPTH:
            continue
        other_b = b if src is None else src
        if other_b.array(q, "masks", module)[0].meta.chunk_rows != my_rows:
            continue
        other = other_b.read_packed(q, module)
        x = popcount(np.bitwise_xor(mine, other))
        h = codecs.entropy(x / info.numel) * info.numel
        if h < 0.9 * own_h and (best is None or h < best[3]):
            best = (src, q, d, h)
    return best


def _store_array(
    repo: Repository, b: Bundle, p: str, kind: str, module: str, zmeta: dict, base: Base | None
) -> dict:
    entry: dict = {"zarr": zmeta, "chunks": []}
    base_iter = None
    if base is not None:
        src, q, _d, _h = base
        other_b = b if src is None else src
        base_iter = other_b.iter_chunks(q, module)
        entry["delta"] = {"persona": q, "version": None if src is None else _source(src).version}
    for _r0, block in b.iter_chunks(p, module, kind):
        data = block
        if base_iter is not None:
            _, other = next(base_iter)
            if other.shape != block.shape:
                raise MaskstoreError(f"{module}: delta base has another chunk grid")
            data = np.bitwise_xor(block, other)
        share = codecs.share_of_ones(data) if kind == "masks" else None
        entry["chunks"].append(list(repo.objects.put_chunk(data, share)))
    return entry
