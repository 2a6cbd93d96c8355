"""Merging two versions persona by persona (a three-way merge against their common ancestor).

A persona is compared by its metadata digest, which pins its method, parameters, statistics and
every mask digest. Against the merge base, a persona changed (or added, or removed) on one side
only is taken from that side; one changed identically on both sides is taken once; one changed
differently on both sides is a conflict, resolved by naming the side to keep. The merged version
reuses both sides' objects (no chunk is read or written) and has both versions as parents.
"""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import MaskstoreError, MergeConflict
from ..store.format import bundle_digest
from .history import ancestors
from .objects import new_manifest
from .snapshot import check_metadata

if TYPE_CHECKING:
    from ._protocol import RepositoryLike as Repository


@dataclass
class MergeResult:
    """What a merge did: the new version and, per persona, the side it came from."""

    version: str
    base: str | None
    bases: list[str] = field(default_factory=list)  # every best common ancestor
    taken: dict[str, str] = field(default_factory=dict)  # persona -> "ours" | "theirs" | "both"
    removed: list[str] = field(default_factory=list)
    resolved: dict[str, str] = field(default_factory=dict)  # conflicts and the side chosen


def merge_bases(repo: Repository, a: str, b: str) -> list[str]:
    """The best common ancestors of ``a`` and ``b`` (git's merge bases): versions both descend
    from that no other common ancestor descends from. Several after criss-cross merges; none
    when the histories share nothing."""
    mine = set(ancestors(repo, a))
    common = [v for v in ancestors(repo, b) if v in mine]  # nearest first along b's walk
    dominated: set[str] = set()
    for c in common:
        if c not in dominated:
            dominated.update(v for v in ancestors(repo, c) if v != c)
    return [c for c in common if c not in dominated]


def merge_base(repo: Repository, a: str, b: str) -> str | None:
    """One best common ancestor of ``a`` and ``b`` (None when they share none)."""
    bases = merge_bases(repo, a, b)
    return bases[0] if bases else None


_AMBIGUOUS = object()  # the merge bases disagree on a persona: never resolved silently


def _digests(man: dict | None) -> dict[str, str]:
    if man is None:
        return {}
    return {p: pe["meta"]["digest"] for p, pe in man["personas"].items()}


def _entry(man: dict, vid: str, persona: str) -> dict:
    """A persona's manifest entry, its same-version delta bases pinned to ``vid`` (in the
    merged version, a base named without a version would mean the merged version's persona)."""
    pe = _copy.deepcopy(man["personas"][persona])
    for e in pe["arrays"].values():
        if "delta" in e and e["delta"]["version"] is None:
            e["delta"]["version"] = vid
    return pe


def merge(
    repo: Repository,
    ours: str,
    theirs: str,
    message: str,
    take_ours: tuple[str, ...] = (),
    take_theirs: tuple[str, ...] = (),
    advice: str = "",
) -> MergeResult:
    """Merge version ``theirs`` into ``ours`` (full ids, both in ``repo``); returns the merged
    version, written but not yet pointed at by any ref.

    Args:
        take_ours, take_theirs: personas in conflict and the side to keep for each.
        advice: how a conflict message tells the user to resolve it (the command line).

    Raises:
        MergeConflict: personas changed differently on both sides and not resolved.
        MaskstoreError: the two sides are for different models, or the options contradict.
    """
    both = set(take_ours) & set(take_theirs)
    if both:
        raise MaskstoreError(
            f"{', '.join(sorted(both))} named in both `ours` and `theirs`: choose one side"
        )
    m_o, m_t = repo.objects.manifest(ours), repo.objects.manifest(theirs)
    if m_o["root"]["model"] != m_t["root"]["model"]:
        raise MaskstoreError(
            f"{ours[:12]} and {theirs[:12]} hold masks for different models: they cannot be "
            "merged (pull --force takes the remote's branch instead)"
        )
    bases = merge_bases(repo, ours, theirs)
    base = bases[0] if bases else None
    per_base = [_digests(repo.objects.manifest(v)) for v in bases] or [{}]
    d_b: dict = {}
    for p in set().union(*per_base):
        seen = {d.get(p) for d in per_base}
        d_b[p] = seen.pop() if len(seen) == 1 else _AMBIGUOUS
    d_o, d_t = _digests(m_o), _digests(m_t)
    names = sorted(set(d_b) | set(d_o) | set(d_t))
    unknown = sorted((set(take_ours) | set(take_theirs)) - set(names))
    if unknown:
        raise MaskstoreError(
            f"no persona {', '.join(map(repr, unknown))} on either side: check the names"
        )
    res = MergeResult(version="", base=base, bases=bases)
    personas: dict[str, dict] = {}
    conflicts: list[str] = []
    for p in names:
        b, o, t = d_b.get(p), d_o.get(p), d_t.get(p)
        if o == t:
            side = "both"
        elif o == b:
            side = "theirs"
        elif t == b:
            side = "ours"
        elif p in take_ours:
            side = res.resolved[p] = "ours"
        elif p in take_theirs:
            side = res.resolved[p] = "theirs"
        else:
            conflicts.append(p)
            continue
        man, vid, digest = (m_t, theirs, t) if side == "theirs" else (m_o, ours, o)
        if digest is None:
            res.removed.append(p)
            continue
        personas[p] = _entry(man, vid, p)
        res.taken[p] = side
    if conflicts:
        raise MergeConflict(
            f"{len(conflicts)} persona(s) changed differently on both sides: "
            f"{', '.join(conflicts)}; keep one side of each with {advice}",
            conflicts,
        )
    digest = bundle_digest(
        m_o["root"]["model"], {p: pe["meta"]["digest"] for p, pe in personas.items()}
    )
    man = new_manifest([ours, theirs], message, m_o["root"], personas, digest, repo.author())
    res.version = repo.objects.put_manifest(man)
    check_metadata(repo, res.version)
    return res
