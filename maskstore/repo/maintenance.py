"""Keeping a repository healthy: what is reachable, garbage collection, verification."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..errors import MaskstoreError
from ..hashing import blake2b_hex
from .transfer import needed

if TYPE_CHECKING:
    from . import Repository


def reachable(repo: Repository) -> tuple[set[str], set[str]]:
    """(version ids, chunk names) that some tag or branch reaches."""
    versions, chunks = needed(repo, repo.refs.heads(), repo.store)
    return set(versions), {h for h, _ in chunks}


def gc(repo: Repository, grace_seconds: float = 3600.0) -> tuple[int, int]:
    """Delete objects no tag or branch reaches (older than ``grace_seconds``, so a commit in
    flight keeps its fresh chunks). Returns (objects removed, bytes freed)."""
    versions, chunks = reachable(repo)
    now = time.time()
    removed = freed = 0
    for key in repo.store.list("chunks/") + repo.store.list("versions/"):
        name = key.split("/", 1)[1].replace("/", "")
        live = name in versions if key.startswith("versions/") else name in chunks
        if live or now - repo.store.mtime(key) < grace_seconds:
            continue
        size = repo.store.size(key)
        repo.store.delete(key)
        removed, freed = removed + 1, freed + size
    return removed, freed


def verify(repo: Repository) -> list[str]:
    """Check every reachable object (blake2b of manifests, xxh3 and blake2b of chunks)."""
    problems = []
    try:
        _versions, chunks = needed(repo, repo.refs.heads(), repo.store)
    except MaskstoreError as e:
        return [str(e)]
    for h, bl in chunks:
        try:
            if blake2b_hex(repo.objects.read_chunk(h)) != bl:
                problems.append(f"chunk {h} does not match its manifest's blake2b")
        except MaskstoreError as e:
            problems.append(str(e))
    return problems
