"""Moving versions between stores: push, pull, export (one zip) and import.

Only missing objects move; every object is verified (xxh3 and blake2b) before it lands, chunks
first, then manifests (parents before children), then the ref.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import IntegrityError, MaskstoreError
from ..progress import Progress
from ..store.chunks import ArrayMeta
from ..store.hashing import blake2b_hex, canonical_json
from ..store.names import check_ref_name, is_hex
from ..store.stores import RefConflict, Store, ZipStore, open_store
from ..store.writer import temp_sibling
from . import signing
from .history import ancestors
from .merge import MergeResult, merge
from .objects import (
    REPO_FORMAT,
    REPO_MARKER,
    Objects,
    chunk_key,
    decode_chunk,
    stored_bound,
    version_key,
)
from .refs import SINGULAR, Refs
from .snapshot import check_metadata

if TYPE_CHECKING:
    from ._protocol import RepositoryLike as Repository

# progress(done, total): chunks checked or moved so far, of all the versions need


@dataclass
class TransferReport:
    """What a push or pull moved and, for a pulled branch, what became of the local one.

    ``outcome``: ``created``, ``up-to-date``, ``fast-forward``, ``ahead`` (the local branch
    already contains the remote's head), ``merged``, ``forced`` or ``tag``; ``version``: where
    the ref points now; ``merge``: the persona-by-persona record of a merge."""

    objects: int
    bytes: int
    skipped: int
    outcome: str = ""
    version: str = ""
    merge: MergeResult | None = None
    discarded: str | None = None  # the local head a forced pull moved the branch off
    stale: list[str] = field(default_factory=list)  # working bundles the branch moved past
    stale: list[str] = field(default_factory=list)  # working bundles the branch moved past


def needed(
    repo: Repository, vids: list[str], store: Store
) -> tuple[list[str], list[tuple[str, str, int]]]:
    """Versions reachable from ``vids`` (in ``store``) and their chunks (xxh3, blake2b, raw
    bytes the chunk must decode to)."""
    versions, chunks, seen = [], {}, set()
    todo = list(vids)
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        versions.append(v)
        man = repo.objects.manifest(v, store)
        todo.extend(man["parents"])
        for pe in man["personas"].values():
            for key, e in pe["arrays"].items():
                if e.get("chunks"):
                    m = ArrayMeta.parse(e["zarr"], f"version {v[:12]} {key}")
                    for i, (h, bl) in enumerate(e["chunks"]):
                        if i >= m.nchunks:
                            raise IntegrityError(
                                f"version {v[:12]}: {key} lists more chunks than its grid holds"
                            )
                        chunks[h] = (bl, m.rows_of(i) * m.row_bytes)
                if "delta" in e and e["delta"]["version"]:
                    todo.append(e["delta"]["version"])
    return versions, [(h, bl, n) for h, (bl, n) in chunks.items()]


def copy(
    repo: Repository, src: Store, dst: Store, vids: list[str], progress: Progress | None = None
) -> TransferReport:
    """Copy what ``dst`` lacks; every object is verified (xxh3 and blake2b) before it lands
    (``progress(done, total)`` follows the chunks)."""
    versions, chunks = needed(repo, vids, src)
    have = set(dst.list("chunks/")) | set(dst.list("versions/"))
    moved = nbytes = skipped = 0
    for i, (h, bl, size) in enumerate(chunks):
        if progress:
            progress(i, len(chunks))
        key = chunk_key(h)
        if key in have:
            # held already: its content must still be what this manifest's blake2b pins
            Objects(dst).read_chunk(h, limit=size, blake2b=bl)
            skipped += 1
            continue
        data = src.get(key, limit=stored_bound(size))
        if data is None:
            raise IntegrityError(f"chunk {h} is missing from {src.url}: it is damaged")
        raw = decode_chunk(h, data, src.url, limit=size)
        if len(raw) != size or blake2b_hex(raw) != bl:
            raise IntegrityError(
                f"chunk {h} from {src.url} does not match its manifest's blake2b: refused"
            )
        dst.put(key, data)
        moved, nbytes = moved + 1, nbytes + len(data)
    if progress:
        progress(len(chunks), len(chunks))
    for v in reversed(versions):  # parents before children
        key = version_key(v)
        if key in have:
            skipped += 1
            continue
        repo.objects.manifest(v, src)  # verifies blake2b
        data = src.get(key)
        dst.put(key, data)
        moved, nbytes = moved + 1, nbytes + len(data or b"")
    return TransferReport(moved, nbytes, skipped)


def update_ref(
    repo: Repository,
    history: Store,
    dst: Store,
    name: str,
    vid: str,
    kind: str,
    said: str | None = None,
) -> None:
    """Point ``name`` at ``vid`` in ``dst``: tags are created once, branches only fast-forward."""
    check_ref_name(name)
    refs = Refs(dst, dst.url)
    where = said or dst.url  # the remote as the user named it
    other = "branches" if kind == "tags" else "tags"
    if dst.has(f"refs/{other}/{name}"):  # one namespace: a tag never shadows a branch
        raise RefConflict(
            f"{name!r} is a {SINGULAR[other]} on {where} and a {SINGULAR[kind]} where it comes "
            f"from: refusing to create a {SINGULAR[kind]} beside it; rename one of them"
        )
    if kind == "tags":
        if not dst.create(f"refs/tags/{name}", vid.encode()):
            have = refs.get("tags", name) or ""
            if have != vid:
                raise RefConflict(
                    f"tag {name!r} is {have[:12]} on {where}, not {vid[:12]}: tags never move; "
                    f"name this version anew (maskstore tag NEW_NAME {vid[:12]}) and send that"
                )
        return
    cur = dst.get(f"refs/branches/{name}")
    cur_v = cur.decode().strip() if cur else None
    if cur_v == vid:
        return
    if cur_v and cur_v not in set(ancestors(repo, vid, history)):
        raise RefConflict(
            f"branch {name!r} on {where} is at {cur_v[:12]}, which {vid[:12]} does not contain: "
            f"merge it here with maskstore pull {where} {name}, then push again"
        )
    dst.swap(f"refs/branches/{name}", vid.encode(), cur)


def push(
    repo: Repository,
    remote: str | Store,
    ref: str = "main",
    progress: Progress | None = None,
    said: str | None = None,
):
    """Send tag or branch ``ref`` and what it needs; only missing objects move. ``said``: the
    remote as the user named it (a configured name), for the advice in errors."""
    kind = repo.refs.kind_of(ref)
    if kind is None:
        repo.refs.resolve(ref)  # an unknown name fails here with its own message
        raise MaskstoreError(
            f"push sends a tag or a branch, and {ref!r} is a version id: "
            f"tag it first (maskstore tag NAME {ref}), then push NAME"
        )
    vid = repo.refs.resolve(ref)
    dst = remote if isinstance(remote, Store) else open_store(remote, create=True)
    with dst.lock("gc", shared=True):
        dst.create(REPO_MARKER, canonical_json({"format": REPO_FORMAT}))
        rep = copy(repo, repo.store, dst, [vid], progress)
        _copy_signature(repo.store, dst, kind, ref, vid)
        update_ref(repo, repo.store, dst, ref, vid, kind, said)
    rep.version = vid
    return rep


def record_reflog(store: Store, branch: str, old: str, new: str, why: str) -> None:
    """Append ``old -> new`` to the branch's reflog (``reflog/<branch>``): gc keeps a head a
    branch left within its grace period, so ``pull --force`` can be undone
    (``maskstore branch NAME OLD``)."""
    import time

    line = f"{int(time.time())} {old} {new} {' '.join(why.split())[:200]}\n".encode()
    have = store.get(f"reflog/{branch}", limit=1 << 20) or b""
    store.put(f"reflog/{branch}", (have + line)[-(1 << 20) + 4096 :])


def reflog_heads(store: Store, since: float) -> list[str]:
    """The versions branches left at or after ``since`` (seconds since the epoch)."""
    out = []
    for key in store.list("reflog/"):
        for line in (store.get(key, limit=1 << 20) or b"").decode("ascii", "replace").splitlines():
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[0].isdigit() and int(parts[0]) >= since:
                if is_hex(parts[1], 64):
                    out.append(parts[1])
    return out


def _copy_signature(src: Store, dst: Store, kind: str, name: str, vid: str) -> bytes | None:
    """Carry the signature of ``kind/name -> vid`` along, if ``src`` has one."""
    key = signing.signature_key(kind, name, vid)
    sig = src.get(key, limit=signing.MAX_SIGNATURE_BYTES)
    if sig is not None:
        signing.check_signature_bytes(sig, f"{key} on {src.url}")
        if dst.get(key, limit=signing.MAX_SIGNATURE_BYTES) is None:
            dst.create(key, sig)  # never replaces a signature already here (it may be valid)
    return sig


def check_trust(
    repo: Repository, sig: bytes | None, kind: str, name: str, vid: str, allowed: str | None
) -> None:
    """Refuse ``kind/name -> vid`` unless a signature by an allowed signer covers it."""
    what = f"{SINGULAR[kind]} {name!r}"
    if allowed is None:
        raise MaskstoreError(
            f"{what}: signed refs are required but no allowed-signers file is set: pass "
            "`allowed_signers` FILE or set trust.allowed_signers in the repository's config.json"
        )
    if sig is None:
        raise MaskstoreError(f"{what} is not signed: refused (signed refs are required)")
    verdict = signing.verify(sig, kind, name, vid, allowed)
    if not verdict.ok:
        raise MaskstoreError(f"{what}: {verdict.reason}: refused")


def pull(
    repo: Repository,
    remote: str | Store,
    ref: str = "main",
    progress: Progress | None = None,
    require_signed: bool | None = None,
    allowed_signers: str | None = None,
    force: bool = False,
    ours: tuple[str, ...] = (),
    theirs: tuple[str, ...] = (),
    tracking: str | None = None,
    said: str | None = None,
    record: str | None = None,
) -> TransferReport:
    """Fetch tag or branch ``ref`` from a remote (or an export zip) with what it needs.

    With ``tracking`` (a remote's name), only fetch: the objects arrive and the remote's head
    is recorded as ``remotes/<tracking>/<kind>/<ref>``; no local ref moves (``fetch``).

    With ``require_signed`` (default: the repository's ``trust.require_signed``), the ref must
    carry a signature that ``allowed_signers`` (default: ``trust.allowed_signers``) accepts.

    A local branch behind the remote's fast-forwards; one that has diverged from it is merged
    persona by persona (:func:`maskstore.repo.merge.merge`; ``ours``/``theirs`` name the side
    kept for each conflicting persona), or with ``force`` reset to the remote's head."""
    check_ref_name(ref)
    src = remote if isinstance(remote, Store) else open_store(remote)
    kind = Refs(src, src.url).kind_of(ref)
    if kind is None:
        if hasattr(src, "check_bucket"):
            try:
                src.check_bucket()
            except MaskstoreError as e:
                if said is None or said == src.url:
                    raise
                raise MaskstoreError(f"remote {said!r} ({src.url}): {e}") from None
        raise MaskstoreError(f"{src.url} has no tag or branch {ref!r}")
    vid = Refs(src, src.url).get(kind, ref) or ""
    if not is_hex(vid, 64):
        raise IntegrityError(
            f"{SINGULAR[kind]} {ref!r} on {src.url} does not hold a version id: refused"
        )
    trust = repo.config.get("trust", {})
    if require_signed is None:
        require_signed = bool(trust.get("require_signed", False))
    allowed_signers = allowed_signers or trust.get("allowed_signers")
    sig = src.get(signing.signature_key(kind, ref, vid), limit=signing.MAX_SIGNATURE_BYTES)
    if require_signed:
        check_trust(repo, sig, kind, ref, vid, allowed_signers)
    with repo.store.lock("gc", shared=True):
        rep = copy(repo, src, repo.store, [vid], progress)
        versions = needed(repo, [vid], repo.store)[0]
        check_delta_chains(repo, versions)
        for v in versions:
            check_metadata(repo, v)
        _copy_signature(src, repo.store, kind, ref, vid)
        if record is not None:  # a configured remote's head: known now, merge or not
            repo.store.put(f"remotes/{record}/{kind}/{ref}", vid.encode())
        if tracking is not None:
            repo.store.put(f"remotes/{tracking}/{kind}/{ref}", vid.encode())
            rep.outcome, rep.version = "fetched", vid
        elif kind == "tags":
            update_ref(repo, repo.store, repo.store, ref, vid, kind)
            rep.outcome, rep.version = "tag", vid
        else:
            _integrate(repo, rep, said or src.url, ref, vid, force, tuple(ours), tuple(theirs))
    return rep


def _integrate(
    repo: Repository,
    rep: TransferReport,
    url: str,
    name: str,
    vid: str,
    force: bool,
    ours: tuple[str, ...],
    theirs: tuple[str, ...],
) -> None:
    """Move local branch ``name`` to take in the remote's head ``vid`` (records it in ``rep``)."""
    cur = repo.refs.get("branches", name)
    rep.version = vid
    if cur is None:
        rep.outcome = "created"
    elif cur == vid:
        rep.outcome = "up-to-date"
        return
    elif force:
        rep.outcome, rep.discarded = "forced", cur
        record_reflog(repo.store, name, cur, vid, f"pull --force from {url}")
    elif cur in set(ancestors(repo, vid)):
        rep.outcome = "fast-forward"
    elif vid in set(ancestors(repo, cur)):
        rep.outcome, rep.version = "ahead", cur
        return
    else:
        rep.merge = merge(
            repo,
            cur,
            vid,
            f"merge {name} from {url}",
            ours,
            theirs,
            advice=f"maskstore pull {url} {name} --ours NAME or --theirs NAME, or take the "
            "remote's branch whole with --force",
        )
        rep.outcome, rep.version = "merged", rep.merge.version
    repo.refs.set_branch(name, rep.version, cur)


def export(repo: Repository, ref: str, out: str | os.PathLike, force: bool = False) -> Path:
    """A single ``.zip`` with version ``ref``, what it needs, and its tag or branch."""
    out = Path(out)
    if out.exists() and not force:
        raise MaskstoreError(f"{out} already exists: choose another name or pass force=True")
    vid = repo.refs.resolve(ref)
    kind = repo.refs.kind_of(ref)
    name = ref if kind else f"v-{vid[:12]}"
    versions, chunks = needed(repo, [vid], repo.store)
    if not out.parent.is_dir():
        raise MaskstoreError(f"{out.parent} does not exist: create it first")
    tmp = temp_sibling(out)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(REPO_MARKER, canonical_json({"format": REPO_FORMAT}))
            for h, bl, size in chunks:
                repo.objects.read_chunk(h, limit=size, blake2b=bl)
                zf.writestr(chunk_key(h), repo.store.get(chunk_key(h)))
            for v in versions:
                repo.objects.manifest(v)
                zf.writestr(version_key(v), repo.store.get(version_key(v)))
            zf.writestr(f"refs/{kind or 'tags'}/{name}", vid)
            if kind:
                sig = repo.store.get(signing.signature_key(kind, name, vid))
                if sig is not None:
                    zf.writestr(signing.signature_key(kind, name, vid), sig)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def import_(
    repo: Repository,
    path: str | os.PathLike,
    require_signed: bool | None = None,
    allowed_signers: str | None = None,
) -> list[str]:
    """Bring in every ref of an export zip (verified). Returns the ref names."""
    src = ZipStore(path)
    names = []
    for key in src.list("refs/"):
        parts = key.split("/")
        if len(parts) != 3 or parts[1] not in ("tags", "branches"):
            raise IntegrityError(f"{path} holds {key!r}, which is not a tag or branch: refused")
        names.append(check_ref_name(parts[2]))
    for name in names:
        pull(repo, src, name, require_signed=require_signed, allowed_signers=allowed_signers)
    return names


def check_delta_chains(repo: Repository, versions: list[str]) -> None:
    """Refuse versions whose xor-delta chains loop or run deeper than ``MAX_DELTA_DEPTH``
    (their arrays are resolved without reading a chunk)."""
    for v in versions:
        src = repo.source(v)
        for persona, pe in src.manifest["personas"].items():
            for key, e in pe["arrays"].items():
                if "delta" in e:
                    src.object_array(persona, key)
