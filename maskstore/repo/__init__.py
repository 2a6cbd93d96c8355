"""Versioned, shareable bundles: a content-addressed repository of immutable snapshots.

Layout of a repository (a local folder, or the same keys on a remote)::

    maskstore-repo.json                 {"format": 1}
    chunks/<xx>/<xxh3-128>              zstd frame of one raw chunk, named by its xxh3-128
    versions/<blake2b-256>              zstd frame of a version manifest (canonical JSON)
    refs/tags/<name>, refs/branches/<name>   a version id

A **version** is a manifest naming every persona, array and chunk plus all metadata; its id is
the blake2b-256 of the manifest's canonical JSON, and the manifest records the blake2b of every
raw chunk next to its xxh3 name, so one trusted id pins every byte. Its ``parents`` are the
version it was committed on (two for a merge, :mod:`.merge`); a mask stored as an xor delta
names its base persona and, unless it is in the same version, the base's version id. A chunk
identical across personas or versions is stored once. Writes are ordered chunks -> manifest ->
ref, each atomic, so a killed commit or push leaves every ref pointing at a complete version.

One module a concept: :mod:`.objects` (chunks and manifests), :mod:`.refs` (tags and branches),
:mod:`.commit` (versions and xor deltas), :mod:`.snapshot` (reading a version as a bundle,
checkout), :mod:`.history` (log, diff), :mod:`.transfer` (push, pull, export, import),
:mod:`.merge` (three-way merges by persona), :mod:`.maintenance` (gc, verify).
:class:`Repository` is the thin front over them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import MaskstoreError
from ..progress import Progress
from ..store.format import Bundle
from ..store.hashing import canonical_json
from ..store.names import check_ref_name, is_hex
from ..store.stores import LocalStore, Store, check_s3_url, open_store
from . import commit as _commit
from . import history, maintenance, signing, transfer
from .merge import MergeConflict, MergeResult, merge
from .objects import REPO_FORMAT, REPO_MARKER, Objects
from .refs import SINGULAR, Refs
from .snapshot import MAX_DELTA_DEPTH, Snapshot, VersionSource
from .transfer import TransferReport


class Repository:
    """A repository of versions. Create with :func:`init_repo` or open with :func:`open_repo`.

    Attributes:
        store: where its objects and refs live.
        objects: chunks and manifests (:class:`~maskstore.repo.objects.Objects`).
        refs: tags and branches (:class:`~maskstore.repo.refs.Refs`).
    """

    def __init__(self, store: Store, path: str) -> None:
        self.store = store
        self.path = path
        self.objects = Objects(store)
        self.refs = Refs(store, path)
        self._sources: dict[str, VersionSource] = {}

    # ---- reading
    def resolve(self, ref: str) -> str:
        """A tag, a branch, or a (unique prefix of a) version id -> the full version id."""
        return self.refs.resolve(ref)

    def manifest(self, version: str) -> dict:
        return self.objects.manifest(version)

    def source(self, version: str) -> VersionSource:
        """The bundle source of a full version id (cached)."""
        if version not in self._sources:
            self._sources[version] = VersionSource(self, version)
        return self._sources[version]

    def snapshot(self, ref: str) -> Snapshot:
        """Version ``ref`` (tag, branch or id prefix); its ``.bundle`` reads like a bundle."""
        return Snapshot(self, self.resolve(ref))

    def object_size(self, h: str) -> int:
        return self.objects.size(h)

    def tags(self) -> dict[str, str]:
        return self.refs.all("tags")

    def branches(self) -> dict[str, str]:
        return self.refs.all("branches")

    def branch_head(self, name: str) -> str | None:
        return self.refs.get("branches", name)

    # ---- writing
    def commit(
        self,
        bundle: Bundle | str | os.PathLike,
        message: str,
        branch: str = "main",
        delta: bool = True,
        recipes: tuple[str, ...] = (),
        progress: Progress | None = None,
        sign: str | os.PathLike | None = None,
        author: str | None = None,
        allow_empty: bool = False,
    ) -> str:
        """Snapshot a bundle as a new version on ``branch``; returns the version id. With
        ``sign`` (an SSH private key file) the new branch head is signed. ``author`` defaults
        to :meth:`author` (None records none); an unchanged bundle needs ``allow_empty``."""
        if not isinstance(message, str):
            raise MaskstoreError(f"`message` must be a string, got {type(message).__name__}")
        if sign is not None and not Path(sign).is_file():
            raise MaskstoreError(f"`sign` {sign}: no such key file")
        b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        vid = _commit.commit(self, b, message, branch=branch, delta=delta,
                             recipes=tuple(recipes), progress=progress,
                             author=author if author is not None else self.author(),
                             allow_empty=allow_empty)  # fmt: skip
        if sign is not None:
            sig = signing.sign(sign, "branches", branch, vid)
            self.store.put(signing.signature_key("branches", branch, vid), sig)
        if isinstance(b.store, LocalStore):
            self.set_worktree(b.path, vid)  # the bundle now holds this version
        return vid

    # ---- working bundles: which version each local bundle last held
    def _worktree_key(self, path: str | os.PathLike) -> tuple[str, str]:
        from ..store.hashing import xxh3

        where = str(Path(path).resolve())
        return f"worktrees/{xxh3(where.encode('utf-8', 'surrogateescape'))}", where

    def set_worktree(self, path: str | os.PathLike, vid: str) -> None:
        """Record that the bundle at ``path`` holds version ``vid`` (a checkout or a commit
        of it), so status can tell its changes from the branch's and pull can say it is
        stale."""
        key, where = self._worktree_key(path)
        self.store.put(key, canonical_json({"path": where, "version": vid}))

    def worktree(self, path: str | os.PathLike) -> str | None:
        """The version the bundle at ``path`` last held here (None: unknown)."""
        key, where = self._worktree_key(path)
        try:
            doc = json.loads(self.store.get(key, limit=8192) or b"null")
        except ValueError:
            return None
        ok = isinstance(doc, dict) and doc.get("path") == where
        vid = doc.get("version") if ok else None
        return vid if isinstance(vid, str) and is_hex(vid, 64) else None

    def worktrees(self) -> dict[str, str]:
        """``{bundle path: version}`` for every working bundle recorded (existing or not)."""
        out = {}
        for key in self.store.list("worktrees/"):
            try:
                doc = json.loads(self.store.get(key, limit=8192) or b"null")
            except ValueError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("path"), str):
                vid = doc.get("version")
                if isinstance(vid, str) and is_hex(vid, 64):
                    out[doc["path"]] = vid
        return out

    def tag(self, name: str, ref: str, sign: str | os.PathLike | None = None) -> str:
        """Create tag ``name`` at ``ref`` (tags never move); with ``sign`` (an SSH private key
        file) also store its signature."""
        vid = self.resolve(ref)
        sig = signing.sign(sign, "tags", name, vid) if sign is not None else None
        self.refs.tag(name, vid)
        if sig is not None:
            self.store.put(signing.signature_key("tags", name, vid), sig)
        return vid

    def sign(self, name: str, key: str | os.PathLike) -> str:
        """Sign tag or branch ``name`` where it points now; returns the version id."""
        kind = self.refs.kind_of(name)
        if kind is None:
            raise MaskstoreError(f"no tag or branch {name!r} to sign")
        vid = self.refs.get(kind, name) or ""
        self.store.put(signing.signature_key(kind, name, vid), signing.sign(key, kind, name, vid))
        return vid

    def signatures(self, allowed_signers: str | os.PathLike | None = None) -> list[dict]:
        """Every tag and branch head with who signed it (checked against ``allowed_signers``,
        default ``trust.allowed_signers``; without one, only that the signature covers the ref)."""
        allowed = allowed_signers or self.config.get("trust", {}).get("allowed_signers")
        out = []
        for kind in ("tags", "branches"):
            for name, vid in sorted(self.refs.all(kind).items()):
                sig = self.store.get(
                    signing.signature_key(kind, name, vid), limit=signing.MAX_SIGNATURE_BYTES
                )
                rec = {
                    "kind": SINGULAR[kind],
                    "name": name,
                    "version": vid,
                    "signed": sig is not None,
                }
                if sig is not None:
                    v = signing.verify(sig, kind, name, vid, allowed)
                    rec |= {"ok": v.ok, "signer": v.signer, "reason": v.reason}
                out.append(rec)
        return out

    def author(self) -> str | None:
        """Who commits: ``$MASKSTORE_AUTHOR``, else ``author`` in the repository's
        ``config.json``, else git's ``user.name <user.email>``, else None."""
        env = os.environ.get("MASKSTORE_AUTHOR")
        if env:
            return env
        conf = self.config.get("author")
        if isinstance(conf, str) and conf:
            return conf
        import shutil
        import subprocess

        if shutil.which("git") is None:
            return None

        def git(key: str) -> str:
            try:
                r = subprocess.run(["git", "config", "--get", key], capture_output=True,
                                   text=True, timeout=10)  # fmt: skip
            except (OSError, subprocess.SubprocessError):
                return ""
            return r.stdout.strip() if r.returncode == 0 else ""

        name, email = git("user.name"), git("user.email")
        if not name and not email:
            return None
        return f"{name} <{email}>" if name and email else name or email

    @property
    def config(self) -> dict:
        """``config.json`` of the repository (``{"trust": {"allowed_signers": PATH,
        "require_signed": BOOL}}``), empty when absent."""
        raw = self.store.get("config.json", limit=1 << 16)
        if raw is None:
            return {}
        try:
            doc = json.loads(raw)
        except ValueError:
            raise MaskstoreError(f"{self.path}/config.json is not JSON: fix it") from None
        if not isinstance(doc, dict):
            raise MaskstoreError(f"{self.path}/config.json must hold an object")
        return doc

    def set_branch(self, name: str, vid: str, expected: str | None) -> None:
        self.refs.set_branch(name, vid, expected)

    def delete_branch(self, name: str) -> None:
        """Remove a branch ref (its versions stay until ``gc`` finds them unreachable)."""
        self.refs.delete_branch(name)

    def checkout(
        self,
        ref: str,
        out: str | os.PathLike,
        model: Any = None,
        force: bool = False,
        progress: Progress | None = None,
        recompute: Callable[..., Any] | None = None,
    ) -> Path:
        """Write version ``ref`` as a plain bundle at ``out`` (recipes need ``model`` and
        ``recompute=maskstore.build.recompute_recipe``); ``progress(done, total)`` follows the modules
        written."""
        snap = self.snapshot(ref)
        path = snap.checkout(out, model=model, force=force, progress=progress,
                             recompute=recompute)  # fmt: skip
        self.set_worktree(path, snap.version)
        return path

    # ---- history
    def log(self, ref: str = "main") -> list[dict]:
        return history.log(self, ref)

    def diff(self, a: str, b: str) -> dict:
        return history.diff(self, a, b)

    # ---- transfers
    def push(self, remote: str | Store, ref: str = "main", progress: Progress | None = None):
        """Send tag or branch ``ref`` and what it needs to a remote (a configured remote's
        name or a URL); only missing objects move (``progress(done, total)`` follows the
        chunks)."""
        named = (
            None if isinstance(remote, Store) or str(remote) not in self.remotes() else str(remote)
        )
        said = None if isinstance(remote, Store) else str(remote)
        rep = transfer.push(self, self.remote_store(remote, create=True) if named else remote,
                            ref, progress, said=said)  # fmt: skip
        if named is not None:  # REMOTE/REF follows what the remote now holds
            self._track(named, ref, rep.version)
        return rep

    def _track(self, remote: str, ref: str, vid: str) -> None:
        kind = self.refs.kind_of(ref) or "branches"
        self.store.put(f"remotes/{remote}/{kind}/{ref}", vid.encode())

    def pull(
        self,
        remote: str | Store,
        ref: str = "main",
        progress: Progress | None = None,
        require_signed: bool | None = None,
        allowed_signers: str | None = None,
        force: bool = False,
        ours: tuple[str, ...] = (),
        theirs: tuple[str, ...] = (),
    ) -> TransferReport:
        """Fetch tag or branch ``ref`` from a remote (a configured remote's name, a URL, a
        folder or an export zip); verify everything, and with ``require_signed`` its signature
        too. A diverged local branch is merged persona by persona (conflicts resolved by
        ``ours``/``theirs``), or reset with ``force``."""
        said = None if isinstance(remote, Store) else str(remote)
        named = said if said is not None and said in self.remotes() else None  # REMOTE/REF
        before = self.refs.get("branches", ref)
        rep = transfer.pull(self, self.remote_store(remote), ref, progress=progress,
                            require_signed=require_signed, allowed_signers=allowed_signers,
                            force=force, ours=ours, theirs=theirs, said=said,
                            record=named)  # fmt: skip
        if before is not None and rep.version and rep.version != before:
            # local bundles that held the old head do not change by themselves: say which
            rep.stale = sorted(p for p, v in self.worktrees().items()
                               if v == before and Path(p).is_dir())  # fmt: skip
        return rep

    def fetch(self, remote: str, ref: str | None = None, progress: Progress | None = None) -> dict:
        """Bring a configured remote's tags and branches (or only ``ref``) with their objects,
        recording the remote's heads under ``remotes/<name>/``; no local ref moves. Returns
        ``{ref: version id}``."""
        if remote not in self.remotes():
            raise MaskstoreError(
                f"no remote named {remote!r}: add it with maskstore remote add {remote} URL"
            )
        src = self.remote_store(remote)
        rrefs = Refs(src, src.url)
        names = [ref] if ref is not None else sorted({*rrefs.all("tags"), *rrefs.all("branches")})
        out = {}
        for name in names:
            rep = transfer.pull(self, src, name, progress=progress, tracking=remote)
            out[name] = rep.version
        return out

    def tracking(self, remote: str) -> dict[str, str]:
        """``{"branches/main": vid, "tags/v1": vid}``: the heads the last fetch recorded."""
        out = {}
        for key in self.store.list(f"remotes/{remote}/"):
            data = self.store.get(key, limit=256)
            if data is not None:
                out[key.split("/", 2)[2]] = data.decode("ascii", "replace").strip()
        return out

    # ---- named remotes
    def remotes(self) -> dict[str, dict]:
        """Configured remotes: ``{name: {"url", "endpoint_url"?, "region"?, "profile"?}}``."""
        got = self.config.get("remotes", {})
        return got if isinstance(got, dict) else {}

    def add_remote(
        self,
        name: str,
        url: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
    ) -> None:
        """Remember ``url`` as remote ``name`` (S3 options alongside), in ``config.json``."""
        check_ref_name(name)
        if name in self.remotes():
            raise MaskstoreError(f"remote {name!r} exists: remove it first to change it")
        if not isinstance(url, str) or not url or any(c in url for c in "\n\r\0"):
            raise MaskstoreError("give the remote's URL or folder")
        if "://" in url and not url.startswith(("s3://", "s3a://", "file://")):
            raise MaskstoreError(f"remote {url!r}: use a folder or an s3:// URL")
        if url.startswith(("s3://", "s3a://")):
            check_s3_url(url)
        entry = {"url": url if "://" in url else str(Path(url).resolve())}
        for k, v in (("endpoint_url", endpoint_url), ("region", region), ("profile", profile)):
            if v:
                entry[k] = v
        self._set_config("remotes", {**self.remotes(), name: entry})

    def remove_remote(self, name: str) -> None:
        remotes = self.remotes()
        if remotes.pop(name, None) is None:
            raise MaskstoreError(f"no remote named {name!r}")
        self._set_config("remotes", remotes)
        for key in self.store.list(f"remotes/{name}/"):
            self.store.delete(key)

    def remote_store(self, remote: str | Store, create: bool = False) -> Store:
        """A configured remote's store (with its S3 options), else ``remote`` as a URL;
        ``create``: a folder remote that does not exist yet is made (a first push)."""
        if isinstance(remote, Store):
            return remote
        entry = self.remotes().get(str(remote))
        if entry is None:
            return open_store(remote)
        url = entry["url"]
        if "://" not in url or url.startswith("file://"):
            return open_store(url, create=create)
        from ..store.stores import FsspecStore

        opts: dict = {}
        client = {k2: entry[k1] for k1, k2 in (("endpoint_url", "endpoint_url"),
                                                ("region", "region_name")) if entry.get(k1)}  # fmt: skip
        if client:
            opts["client_kwargs"] = client
        if entry.get("profile"):
            opts["profile"] = entry["profile"]
        return FsspecStore(url, **opts)

    def _set_config(self, key: str, value: object) -> None:
        doc = dict(self.config)
        doc[key] = value
        self.store.put("config.json", canonical_json(doc))

    def merge(
        self,
        ref: str,
        into: str = "main",
        ours: tuple[str, ...] = (),
        theirs: tuple[str, ...] = (),
    ) -> MergeResult | None:
        """Merge version ``ref`` into branch ``into`` persona by persona. Returns the merge's
        record (None when ``into`` already contains ``ref`` or fast-forwards to it)."""
        vid, cur = self.resolve(ref), self.refs.get("branches", into)
        if cur is None:
            raise MaskstoreError(f"no branch {into!r} to merge into")
        if vid in set(history.ancestors(self, cur)):
            return None
        with self.store.lock("gc", shared=True):
            if cur in set(history.ancestors(self, vid)):
                self.refs.set_branch(into, vid, cur)
                return None
            res = merge(
                self, cur, vid, f"merge {ref} into {into}", tuple(ours), tuple(theirs),
                advice=f"maskstore merge {ref} --into {into} --ours NAME or --theirs NAME",
            )  # fmt: skip
            self.refs.set_branch(into, res.version, cur)
        return res

    def export(self, ref: str, out: str | os.PathLike, force: bool = False) -> Path:
        return transfer.export(self, ref, out, force)

    def import_(
        self,
        path: str | os.PathLike,
        require_signed: bool | None = None,
        allowed_signers: str | None = None,
    ) -> list[str]:
        return transfer.import_(self, path, require_signed, allowed_signers)

    # ---- maintenance
    def gc(self, grace_seconds: float = 3600.0) -> tuple[int, int]:
        return maintenance.gc(self, grace_seconds)

    def verify(self, progress: Progress | None = None) -> list[str]:
        """Check every reachable object; one line per problem (empty when all verify).
        ``progress(done, total)`` follows the chunks."""
        return maintenance.verify(self, progress)

    def leftovers(self) -> list[str]:
        """Temporary files and stale ref locks left by interrupted writers."""
        return maintenance.leftovers(self)


def init_repo(path: str | os.PathLike) -> Repository:
    """Create (or open) a repository folder."""
    if Path(path).exists() and not Path(path).is_dir():
        raise MaskstoreError(f"{path} is a file: a repository is a folder (choose another `repo`)")
    store = open_store(path, create=True)
    store.create(REPO_MARKER, canonical_json({"format": REPO_FORMAT}))
    return Repository(store, str(path))


def find_repo(start: str | os.PathLike) -> Path | None:
    """The nearest ``.maskstore`` repository in ``start`` or a folder above it (None: none)."""
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        if (folder / ".maskstore" / REPO_MARKER).is_file():
            return folder / ".maskstore"
    return None


def open_repo(path: str | os.PathLike) -> Repository:
    """Open an existing repository (a folder, an ``s3://`` URL or an export zip)."""
    if "://" not in str(path) and not Path(path).exists():
        raise MaskstoreError(
            f"no repository at {path}: create one with maskstore init, or name one with `repo` "
            "(or $MASKSTORE_REPO)"
        )
    store = open_store(path)
    marker = store.get(REPO_MARKER, limit=4096)
    if marker is None:
        if store.list("versions/") or store.list("refs/"):
            raise MaskstoreError(
                f"{path} holds versions but no {REPO_MARKER}: restore it "
                f'(it holds {{"format": {REPO_FORMAT}}})'
            )
        raise MaskstoreError(
            f"{path} is not a maskstore repository: run maskstore init there, or pass `repo`"
        )
    try:
        fmt = json.loads(marker).get("format")
    except (ValueError, AttributeError):
        raise MaskstoreError(
            f"{path}/{REPO_MARKER} is damaged (not JSON): restore it "
            f'(it holds {{"format": {REPO_FORMAT}}})'
        ) from None
    if fmt != REPO_FORMAT:
        raise MaskstoreError(f"{path} has an unknown repository format: upgrade maskstore")
    return Repository(store, str(path))


def open_version(spec: str) -> Snapshot:
    """``"REPO@REF"`` -> that version (its ``.bundle`` reads like any bundle)."""
    path, ref = spec.rsplit("@", 1)
    return open_repo(path).snapshot(ref)


__all__ = [
    "MAX_DELTA_DEPTH",
    "MergeConflict",
    "MergeResult",
    "Repository",
    "Snapshot",
    "TransferReport",
    "find_repo",
    "init_repo",
    "open_repo",
    "open_version",
]
