"""Refs: tags (never move) and branches (move by compare-and-swap), each a file holding a version id.

``refs/tags/<name>`` and ``refs/branches/<name>``; names follow :func:`maskstore.store.names.check_ref_name`.
"""

from __future__ import annotations

import re

from ..errors import IntegrityError, MaskstoreError
from ..store.names import check_ref_name, is_hex
from ..store.stores import RefConflict, Store

KINDS = ("tags", "branches")
SINGULAR = {"tags": "tag", "branches": "branch"}
_PREFIX = re.compile(r"[0-9a-f]{6,64}")


class Refs:
    """The tags and branches of one store."""

    def __init__(self, store: Store, label: str) -> None:
        self.store = store
        self.label = label

    def kind_of(self, name: str) -> str | None:
        """``"tags"``, ``"branches"`` or None when ``name`` is neither (a name that is both,
        which maskstore never writes, is refused rather than read as either)."""
        found = [kind for kind in KINDS if self.store.has(f"refs/{kind}/{name}")]
        if len(found) > 1:
            raise IntegrityError(
                f"{name!r} is both a tag and a branch in {self.label}: ambiguous; delete "
                f"refs/tags/{name} or rename the branch"
            )
        return found[0] if found else None

    def get(self, kind: str, name: str) -> str | None:
        """The version id ``name`` points at (None when absent); a ref that holds anything but
        a version id is refused."""
        data = self.store.get(f"refs/{kind}/{name}", limit=256)
        if data is None:
            return None
        vid = data.decode("ascii", "replace").strip()
        if not is_hex(vid, 64):
            raise IntegrityError(
                f"{SINGULAR[kind]} {name!r} in {self.label} does not hold a version id: it is damaged"
            )
        return vid

    def all(self, kind: str) -> dict[str, str]:
        """name -> version id of every tag (or branch)."""
        out = {}
        for key in self.store.list(f"refs/{kind}/"):
            name = key.split("/", 2)[2]
            vid = self.get(kind, name)
            if vid is not None:
                out[name] = vid
        return out

    def heads(self) -> list[str]:
        """Every version a tag, a branch or a fetched remote head points at (what gc keeps)."""
        out = [v for kind in KINDS for v in self.all(kind).values()]
        for key in self.store.list("remotes/"):
            data = self.store.get(key, limit=256)
            vid = data.decode("ascii", "replace").strip() if data else ""
            if is_hex(vid, 64):
                out.append(vid)
        return out

    def resolve(self, ref: str) -> str:
        """A tag, a branch, or a (unique prefix of a) version id -> the full version id."""
        kind = self.kind_of(ref)
        if kind:
            return self.get(kind, ref)  # type: ignore[return-value]
        if "/" in ref:  # REMOTE/REF: the head the last push, pull or fetch saw on that remote
            remote, _, name = ref.partition("/")
            for kind in KINDS:
                try:
                    data = self.store.get(f"remotes/{remote}/{kind}/{name}", limit=256)
                except MaskstoreError:
                    data = None  # not a name a key can hold
                vid = data.decode("ascii", "replace").strip() if data else ""
                if is_hex(vid, 64):
                    return vid
        if _PREFIX.fullmatch(ref):
            hits = [k.split("/", 1)[1] for k in self.store.list("versions/")]
            hits = [h for h in hits if h.startswith(ref)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise MaskstoreError(f"version prefix {ref!r} is ambiguous: give more digits")
        raise MaskstoreError(f"unknown version, tag or branch {ref!r} in {self.label}")

    def tag(self, name: str, vid: str) -> None:
        """Create tag ``name`` at ``vid``; an existing different tag is an error (tags never move)."""
        check_ref_name(name)
        if self.store.has(f"refs/branches/{name}"):
            raise MaskstoreError(f"{name!r} is a branch: pick another tag name")
        if not self.store.create(f"refs/tags/{name}", vid.encode()):
            have = self.get("tags", name)
            if have != vid:
                raise RefConflict(
                    f"tag {name!r} already points at {(have or '')[:12]}: tags never move; "
                    f"choose another name (maskstore tag NEW_NAME {vid[:12]})"
                )

    def set_branch(self, name: str, vid: str, expected: str | None) -> None:
        """Move branch ``name`` to ``vid`` if it is still at ``expected`` (None: absent)."""
        check_ref_name(name)
        if expected is None and self.store.has(f"refs/tags/{name}"):
            raise MaskstoreError(f"{name!r} is a tag: pick another branch name")
        self.store.swap(
            f"refs/branches/{name}", vid.encode(), expected.encode() if expected else None
        )

    def delete_branch(self, name: str) -> None:
        if name == "main":
            raise MaskstoreError("the main branch cannot be deleted")
        if self.get("branches", name) is None:
            raise MaskstoreError(f"no branch {name!r}")
        self.store.delete(f"refs/branches/{name}")
