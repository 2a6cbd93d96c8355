"""History: ancestors, the log, and what changed between two versions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..store.stores import Store

if TYPE_CHECKING:
    from ._protocol import RepositoryLike as Repository


def ancestors(repo: Repository, vid: str, store: Store | None = None) -> Iterator[str]:
    """``vid`` and every version before it (first parents first)."""
    seen, todo = set(), [vid]
    while todo:
        v = todo.pop(0)
        if v in seen:
            continue
        seen.add(v)
        yield v
        todo.extend(repo.objects.manifest(v, store)["parents"])


def log(repo: Repository, ref: str = "main") -> list[dict]:
    out = []
    for v in ancestors(repo, repo.refs.resolve(ref)):
        m = repo.objects.manifest(v)
        out.append(
            {
                "version": v,
                "created": m["created"],
                "message": m["message"],
                "author": m.get("author"),
                "bundle_digest": m["bundle_digest"],
                "personas": sorted(m["personas"]),
                "parents": m["parents"],
            }
        )
    return out


def diff(repo: Repository, a: str, b: str) -> dict:
    """Which personas and modules differ between versions ``a`` and ``b``, and by how much."""
    from ..compare import algebra

    sa, sb = repo.snapshot(a), repo.snapshot(b)
    ba, bb = sa.bundle, sb.bundle
    out: dict = {
        "a": sa.version,
        "b": sb.version,
        "added": sorted(set(bb.personas) - set(ba.personas)),
        "removed": sorted(set(ba.personas) - set(bb.personas)),
        "changed": {},
        "unchanged": [],
    }
    for p in sorted(set(ba.personas) & set(bb.personas)):
        ma, mb = ba.persona(p), bb.persona(p)
        if ma["digest"] == mb["digest"]:
            out["unchanged"].append(p)
            continue
        mods = [
            m
            for m in ma["modules"]
            if m in mb["modules"] and ma["modules"][m]["mask"] != mb["modules"][m]["mask"]
        ]
        rec: dict = {
            "modules_changed": len(mods),
            "modules_added": sorted(set(mb["modules"]) - set(ma["modules"])),
            "modules_removed": sorted(set(ma["modules"]) - set(mb["modules"])),
        }
        if mods and not sa.is_recipe(p) and not sb.is_recipe(p):
            refs = [algebra.Ref(ba, p), algebra.Ref(bb, p)]
            counts = [algebra.count_module(refs, m) for m in mods]
            allc = algebra.pairs_report(refs, counts, by="module")[0]
            rec["diff_ratio_changed_modules"] = allc["diff_ratio"]
            rec["modules"] = {m: g["diff_ratio"] for m, g in allc["groups"].items()}
        out["changed"][p] = rec
    return out
