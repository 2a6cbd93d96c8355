"""Keeping a repository healthy: what is reachable, garbage collection, verification."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import MaskstoreError
from ..store.hashing import blake2b_hex
from .snapshot import check_metadata
from .transfer import needed, reflog_heads

if TYPE_CHECKING:
    from ._protocol import RepositoryLike as Repository


REFLOG_EXPIRY = 30 * 86400.0  # seconds gc keeps a head a branch was moved off (pull --force)


def reachable(repo: Repository, since: float | None = None) -> tuple[set[str], set[str]]:
    """(version ids, chunk names) that some tag or branch reaches, or (with ``since``) a head
    a branch left at or after ``since`` (its reflog)."""
    heads = repo.refs.heads()
    if since is not None:
        heads += [v for v in reflog_heads(repo.store, since) if repo.store.has(f"versions/{v}")]
    versions, chunks = needed(repo, heads, repo.store)
    return set(versions), {h for h, _, _ in chunks}


def gc(repo: Repository, grace_seconds: float = 3600.0) -> tuple[int, int]:
    """Delete objects no tag or branch reaches, and temporary files and stale locks, last
    touched more than ``grace_seconds`` before gc started. Returns (objects removed, bytes
    freed).

    gc holds the repository's lock exclusively while commits, pulls and imports hold it shared,
    so it never runs while a writer has decided that an object it needs already exists: what
    that writer references is reachable by the time gc looks.
    """
    with repo.store.lock("gc", shared=False):
        cutoff = time.time() - grace_seconds
        # and the heads branches left within the reflog's expiry (as git's gc.reflogExpire)
        versions, chunks = reachable(repo, since=min(cutoff, time.time() - REFLOG_EXPIRY))
        removed = freed = 0
        for key in repo.store.list("chunks/") + repo.store.list("versions/"):
            name = key.split("/", 1)[1].replace("/", "")
            live = name in versions if key.startswith("versions/") else name in chunks
            if live or repo.store.mtime(key) >= cutoff:
                continue
            size = repo.store.size(key)
            repo.store.delete(key)
            removed, freed = removed + 1, freed + size
        for key in leftovers(repo, cutoff):
            repo.store.remove_leftover(key)  # type: ignore[attr-defined]
            removed += 1
    return removed, freed


def leftovers(repo: Repository, older_than: float | None = None) -> list[str]:
    """Temporary files and stale ref locks left by interrupted writers (all ages by default)."""
    cutoff = time.time() + 1 if older_than is None else older_than
    return [
        k
        for prefix in ("chunks/", "versions/", "refs/")
        for k in repo.store.leftovers(prefix, cutoff)
    ]


def verify(repo: Repository, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Check every reachable object (blake2b of manifests, xxh3 and blake2b of chunks).

    ``progress(done, total)`` is called after each chunk."""
    problems = []
    try:
        versions, chunks = needed(repo, repo.refs.heads(), repo.store)
    except MaskstoreError as e:
        return [str(e)]
    for v in versions:
        try:
            check_metadata(repo, v)
            for persona, pe in repo.source(v).manifest["personas"].items():
                for key, e in pe["arrays"].items():
                    if "delta" in e:
                        repo.source(v).object_array(persona, key)
        except MaskstoreError as e:
            problems.append(f"version {v[:12]}: {e}")
    for i, (h, bl, size) in enumerate(chunks):
        try:
            raw = repo.objects.read_chunk(h, limit=size)
            if len(raw) != size or blake2b_hex(raw) != bl:
                problems.append(f"chunk {h} does not match its manifest's blake2b")
        except MaskstoreError as e:
            problems.append(str(e))
        if progress:
            progress(i + 1, len(chunks))
    return problems
