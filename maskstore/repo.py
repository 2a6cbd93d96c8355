"""Versioned, shareable bundles: a content-addressed repository of immutable snapshots.

Layout of a repository (a local folder, or the same keys on a remote)::

    maskstore-repo.json                 {"format": 1}
    chunks/<xx>/<xxh3-128>              zstd frame of one raw chunk, named by its xxh3-128
    versions/<blake2b-256>              zstd frame of a version manifest (canonical JSON)
    refs/tags/<name>, refs/branches/<name>   a version id

A **version** is a manifest naming every persona, array and chunk plus all metadata; its id is
the blake2b-256 of the manifest's canonical JSON, and the manifest records the blake2b of every
raw chunk next to its xxh3 name, so one trusted id pins every byte. The bundle digest (xxh3) is
recorded in the manifest too. A chunk identical across personas or versions is stored once.

A mask array may be stored as a **delta**: its chunks are the xor against the same module of a
base persona (an earlier persona of the same version, or the same persona in the parent version),
chosen when the xor is sparser (smaller entropy) than the mask itself; chains are at most
``MAX_DELTA_DEPTH`` deep. A persona may be stored as a **recipe**: statistics, method and mask
digests, no mask bits; loading it recomputes the masks from a model and checks the digests.

Writes are ordered chunks -> manifest -> ref, each atomic, so a killed commit or push leaves every
ref pointing at a complete version.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numcodecs
import numpy as np
import torch

from . import __version__
from .bits import pack, popcount
from .errors import IntegrityError, MaskstoreError
from .format import FORMAT_VERSION, Bundle, create_bundle, open_bundle, persona_digest, validate
from .hashing import ArrayHasher, blake2b_hex, canonical_json, xxh3
from .stores import RefConflict, Store, ZipStore, open_store

MAX_DELTA_DEPTH = 4
_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]{0,99}$")
_KILL_AFTER = int(os.environ.get("MASKSTORE_TEST_KILL_AFTER", "0") or 0)  # tests: die mid-write
_writes = 0


def _count_write() -> None:
    global _writes
    _writes += 1
    if _KILL_AFTER and _writes >= _KILL_AFTER:
        os._exit(137)


def _entropy(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))


def _zstd(level: int) -> numcodecs.Zstd:
    return numcodecs.Zstd(level=level)


def _encode(raw: np.ndarray | bytes, skewed: bool) -> bytes:
    return _zstd(16 if skewed else 3).encode(raw)


def _decode_chunk(h: str, data: bytes, where: str) -> bytes:
    """The raw bytes of chunk object ``h``, checked against its xxh3 name."""
    try:
        raw = bytes(_zstd(3).decode(data))
    except Exception:  # noqa: BLE001 - any decoding failure is damage
        raise IntegrityError(f"chunk {h} in {where} cannot be decoded: damaged") from None
    if xxh3(raw) != h:
        raise IntegrityError(f"chunk {h} in {where} fails its xxh3 digest: damaged")
    return raw


def _chunk_key(h: str) -> str:
    return f"chunks/{h[:2]}/{h[2:]}"


def check_ref_name(name: str) -> str:
    if not _REF_RE.match(name) or ".." in name:
        raise MaskstoreError(
            f"invalid tag or branch name {name!r}: use letters, digits and _ . + = -"
        )
    return name


# --------------------------------------------------------------------------------------------
# Reading a version as a bundle


class _ObjArray:
    """One array of a version, read chunk by chunk from objects (deltas resolved)."""

    def __init__(self, repo: Repository, entry: dict, base: _ObjArray | None) -> None:
        self.repo = repo
        self.entry = entry
        z = entry["zarr"]
        self.meta = z
        self.shape = tuple(z["shape"])
        self.chunk_shape = tuple(z["chunk_grid"]["configuration"]["chunk_shape"])
        self.dtype = np.dtype(z["data_type"])
        self.attrs = z.get("attributes", {})
        self.base = base

    @property
    def nchunks(self) -> int:
        return -(-self.shape[0] // self.chunk_shape[0]) if self.shape[0] else 0

    def chunks(self) -> Iterator[np.ndarray]:
        if self.entry.get("recipe"):
            raise MaskstoreError("this mask is stored as a recipe: materialize it with a model")
        r = self.chunk_shape[0]
        base_iter = self.base.chunks() if self.base is not None else None
        for i, (h, _b) in enumerate(self.entry["chunks"]):
            rows = min(r, self.shape[0] - i * r)
            raw = self.repo.read_chunk(h)
            block = np.frombuffer(raw, dtype=self.dtype).reshape(rows, *self.shape[1:])
            if base_iter is not None:
                block = np.bitwise_xor(block, next(base_iter))
            yield block


class Snapshot(Bundle):
    """A version of a repository, read lazily like a bundle (``maskstore.open("repo@tag")``)."""

    def __init__(self, repo: Repository, version: str) -> None:  # noqa: D107 - no Bundle.__init__
        self.repo = repo
        self.version = version
        self.manifest = repo.manifest(version)
        self.path = Path(f"{repo.path}@{version[:12]}")
        self.is_zip = False
        self.writable = False
        self.meta = self.manifest["root"]
        validate("bundle", self.meta, str(self.path))
        self._personas = {}

    @property
    def personas(self) -> list[str]:
        return sorted(self.manifest["personas"])

    def persona(self, name: str) -> dict:
        if name not in self.manifest["personas"]:
            known = ", ".join(self.personas) or "none"
            raise MaskstoreError(f"unknown persona {name!r} in {self.path}; known: {known}")
        meta = self.manifest["personas"][name]["meta"]
        if name not in self._personas:
            validate("persona", meta, f"{self.path} persona {name!r}")
            if persona_digest(meta) != meta["digest"]:
                raise IntegrityError(f"persona {name!r} in {self.path}: metadata digest mismatch")
            self._personas[name] = meta
        return meta

    def is_recipe(self, persona: str) -> bool:
        arrays = self.manifest["personas"][persona]["arrays"]
        return any(e.get("recipe") for k, e in arrays.items() if k.startswith("masks/"))

    def _obj_array(self, persona: str, key: str, version: str | None = None) -> _ObjArray:
        man = self.manifest if version in (None, self.version) else self.repo.manifest(version)
        try:
            entry = man["personas"][persona]["arrays"][key]
        except KeyError:
            raise IntegrityError(
                f"{self.path}: {persona}/{key} is missing from the manifest"
            ) from None
        base = None
        if "delta" in entry:
            d = entry["delta"]
            snap = (
                self if d["version"] in (None, self.version) else self.repo.snapshot(d["version"])
            )
            base = snap._obj_array(d["persona"], key)
        return _ObjArray(self.repo, entry, base)

    def _array(self, persona: str, kind: str, module: str):
        meta = self.persona(persona)
        if module not in meta["modules"]:
            raise MaskstoreError(f"persona {persona!r} has no module {module!r}")
        arr = self._obj_array(persona, f"{kind}/{module}")
        if arr.entry.get("recipe"):
            raise MaskstoreError(
                f"persona {persona!r} is stored as a recipe: check it out with a model "
                "(maskstore checkout VERSION --out B --model PATH) or attach it to one"
            )
        ameta = arr.attrs.get("maskstore")
        validate("array", ameta, f"{self.path} {kind}/{module}")
        return arr, ameta

    def nbytes_on_disk(self, persona: str | None = None, kind: str | None = None) -> int:
        total = 0
        for p in [persona] if persona else self.personas:
            for key, e in self.manifest["personas"][p]["arrays"].items():
                if kind is None or key.startswith(kind + "/"):
                    total += sum(self.repo.object_size(h) for h, _ in e.get("chunks", []))
        return total

    def recipe_masks(
        self, persona: str, weights: Callable[[str], torch.Tensor]
    ) -> dict[str, np.ndarray]:
        """Recompute a recipe persona's packed masks from model weights; check every digest."""
        from .build import BuildConfig, PersonaStats, masks_for_module

        meta = self.persona(persona)
        p = meta["params"]
        fields = {
            k: p[k]
            for k in ("selection", "n", "m", "phi", "eps", "tau", "damp", "blocksize")
            if k in p
        }
        config = BuildConfig(method=meta["method"], sparsity=meta["sparsity"], **fields)
        names = [persona] + ([p["opposite"]] if "opposite" in p else [])
        pairs = []
        if "opposite" in p:
            pairs = (
                [(persona, p["opposite"])] if p.get("role") == "+" else [(p["opposite"], persona)]
            )
        out = {}
        for module, entry in meta["modules"].items():
            stats = [PersonaStats(n, {module: self.read_stats(n, module)}) for n in names]
            masks = masks_for_module(weights(module), stats, pairs, module, config)
            packed = pack(masks[persona])
            h = ArrayHasher(packed.dtype, packed.shape)
            h.update(packed)
            if h.hexdigest() != entry["mask"]:
                raise IntegrityError(
                    f"recipe of {persona!r} gives a different mask for {module} than recorded: "
                    "the model's weights differ from the ones it was built on"
                )
            out[module] = packed
        return out

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# The repository


@dataclass
class TransferReport:
    objects: int
    bytes: int
    skipped: int


class Repository:
    """A local repository of versions. Create with :func:`init_repo` or open with :func:`open_repo`."""

    def __init__(self, store: Store, path: str) -> None:
        self.store = store
        self.path = path
        self._manifests: dict[str, dict] = {}

    # ---- objects
    def read_chunk(self, h: str, store: Store | None = None) -> bytes:
        src = store or self.store
        data = src.get(_chunk_key(h))
        if data is None:
            raise IntegrityError(f"chunk {h} is missing from {src.url}: the repository is damaged")
        return _decode_chunk(h, data, src.url)

    def object_size(self, h: str) -> int:
        return self.store.size(_chunk_key(h))

    def _put_chunk(self, raw: np.ndarray, skewed: bool) -> tuple[str, str]:
        raw = np.ascontiguousarray(raw)
        h, b = xxh3(raw), blake2b_hex(raw.tobytes())
        key = _chunk_key(h)
        if not self.store.has(key):
            self.store.put(key, _encode(raw, skewed))
            _count_write()
        return h, b

    def manifest(self, version: str, store: Store | None = None) -> dict:
        if store is None and version in self._manifests:
            return self._manifests[version]
        src = store or self.store
        data = src.get(f"versions/{version}")
        if data is None:
            raise MaskstoreError(f"unknown version {version} in {src.url}")
        try:
            text = bytes(_zstd(3).decode(data))
        except Exception:  # noqa: BLE001
            raise IntegrityError(
                f"version {version} in {src.url} cannot be decoded: damaged"
            ) from None
        if blake2b_hex(text) != version:
            raise IntegrityError(
                f"version {version} in {src.url} fails its blake2b digest: damaged or forged"
            )
        man = json.loads(text)
        if store is None:
            self._manifests[version] = man
        return man

    def _put_manifest(self, man: dict) -> str:
        text = canonical_json(man)
        vid = blake2b_hex(text)
        if not self.store.has(f"versions/{vid}"):
            self.store.put(f"versions/{vid}", _zstd(3).encode(text))
            _count_write()
        return vid

    # ---- refs
    def _ref_key(self, name: str) -> str | None:
        for kind in ("tags", "branches"):
            if self.store.has(f"refs/{kind}/{name}"):
                return f"refs/{kind}/{name}"
        return None

    def refs(self, kind: str) -> dict[str, str]:
        out = {}
        for key in self.store.list(f"refs/{kind}/"):
            out[key.split("/", 2)[2]] = self.store.get(key).decode().strip()
        return out

    def resolve(self, ref: str) -> str:
        """A tag, a branch, or a (unique prefix of a) version id -> the full version id."""
        key = self._ref_key(ref)
        if key:
            return self.store.get(key).decode().strip()
        if re.fullmatch(r"[0-9a-f]{6,64}", ref):
            hits = [
                k.split("/", 1)[1]
                for k in self.store.list("versions/")
                if k.split("/", 1)[1].startswith(ref)
            ]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise MaskstoreError(f"version prefix {ref!r} is ambiguous: give more digits")
        raise MaskstoreError(f"unknown version, tag or branch {ref!r} in {self.path}")

    def tag(self, name: str, ref: str) -> str:
        """Create tag ``name`` at ``ref`` (tags never move: an existing different tag is an error)."""
        check_ref_name(name)
        vid = self.resolve(ref)
        if self.store.has(f"refs/branches/{name}"):
            raise MaskstoreError(f"{name!r} is a branch: pick another tag name")
        if not self.store.create(f"refs/tags/{name}", vid.encode()):
            have = self.store.get(f"refs/tags/{name}").decode().strip()
            if have != vid:
                raise RefConflict(f"tag {name!r} already points at {have[:12]}: tags never move")
        return vid

    def set_branch(self, name: str, vid: str, expected: str | None) -> None:
        check_ref_name(name)
        self.store.swap(
            f"refs/branches/{name}", vid.encode(), expected.encode() if expected else None
        )

    def delete_branch(self, name: str) -> None:
        """Remove a branch ref (its versions stay until ``gc`` finds them unreachable)."""
        if name == "main":
            raise MaskstoreError("the main branch cannot be deleted")
        if self.branch_head(name) is None:
            raise MaskstoreError(f"no branch {name!r}")
        self.store.delete(f"refs/branches/{name}")

    def branch_head(self, name: str) -> str | None:
        data = self.store.get(f"refs/branches/{name}")
        return data.decode().strip() if data else None

    # ---- history
    def ancestors(self, vid: str, store: Store | None = None) -> Iterator[str]:
        """``vid`` and every version before it (first parents first)."""
        seen, todo = set(), [vid]
        while todo:
            v = todo.pop(0)
            if v in seen:
                continue
            seen.add(v)
            yield v
            todo.extend(self.manifest(v, store)["parents"])

    def log(self, ref: str = "main") -> list[dict]:
        out = []
        for v in self.ancestors(self.resolve(ref)):
            m = self.manifest(v)
            out.append(
                {
                    "version": v,
                    "created": m["created"],
                    "message": m["message"],
                    "bundle_digest": m["bundle_digest"],
                    "personas": sorted(m["personas"]),
                    "parents": m["parents"],
                }
            )
        return out

    def snapshot(self, ref: str) -> Snapshot:
        return Snapshot(self, self.resolve(ref))

    # ---- commit
    def commit(
        self,
        bundle: Bundle | str,
        message: str,
        branch: str = "main",
        delta: bool = True,
        recipes: tuple[str, ...] = (),
        progress: Callable[[int], None] | None = None,
    ) -> str:
        """Snapshot a bundle as a new version on ``branch``; returns the version id."""
        b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        check_ref_name(branch)
        parent = self.branch_head(branch)
        parent_snap = Snapshot(self, parent) if parent else None
        personas: dict[str, dict] = {}
        depth: dict[tuple[str, str], int] = {}
        for p in b.personas:
            meta = b.persona(p)
            if p in recipes:
                self._check_recipe(b, p)
            arrays = {}
            for module in meta["modules"]:
                kinds = ["masks"] + (["stats"] if meta["modules"][module].get("stats") else [])
                for kind in kinds:
                    arr, _ameta = b._array(p, kind, module)  # noqa: SLF001
                    key = f"{kind}/{module}"
                    if kind == "masks" and p in recipes:
                        arrays[key] = {"zarr": arr.meta, "recipe": True}
                        continue
                    base = None
                    if kind == "masks" and delta:
                        base = self._pick_base(b, p, module, personas, parent_snap, depth)
                    arrays[key] = self._store_array(b, p, kind, module, arr.meta, base)
                    if base is not None:
                        depth[(p, module)] = base[2] + 1
                if progress:
                    progress(1)
            personas[p] = {"meta": meta, "arrays": arrays}
        man = {
            "format": 1,
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "parents": [parent] if parent else [],
            "message": message,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "bundle_digest": b.digest,
            "root": b.meta,
            "personas": personas,
        }
        vid = self._put_manifest(man)
        self.set_branch(branch, vid, parent)
        _count_write()
        return vid

    def _check_recipe(self, b: Bundle, p: str) -> None:
        meta = b.persona(p)
        if meta["provenance"]["op"] != "build" or not b.has_stats(p):
            raise MaskstoreError(
                f"persona {p!r} cannot be a recipe: it was not built from statistics"
            )
        opp = meta["params"].get("opposite")
        if opp and (opp not in b.personas or not b.has_stats(opp)):
            raise MaskstoreError(
                f"recipe {p!r} needs its opposite {opp!r} with statistics in the bundle"
            )

    def _pick_base(self, b, p, module, done, parent_snap, depth):
        """(snapshot-or-None, persona, depth) of the sparsest xor base, or None."""
        mine = b.read_packed(p, module)
        my_chunks = tuple(b._array(p, "masks", module)[0].chunk_shape)  # noqa: SLF001
        info = b.modules[module]
        best, best_bits = None, popcount(mine)  # storing the mask itself costs ~H(density)
        own_h = _entropy(best_bits / info.numel) * info.numel
        cands = [
            (None, q)
            for q in done
            if module in done[q]["meta"]["modules"]
            and f"masks/{module}" in done[q]["arrays"]
            and not done[q]["arrays"][f"masks/{module}"].get("recipe")
        ]
        if (
            parent_snap is not None
            and p in parent_snap.personas
            and module in parent_snap.persona(p)["modules"]
        ):
            pe = parent_snap.manifest["personas"][p]["arrays"].get(f"masks/{module}", {})
            if not pe.get("recipe") and "chunks" in pe:
                cands.append((parent_snap, p))
        for snap, q in cands:
            d = depth.get((q, module), 0) if snap is None else self._depth(snap, q, module)
            if d >= MAX_DELTA_DEPTH:
                continue
            src = b if snap is None else snap
            if tuple(src._array(q, "masks", module)[0].chunk_shape) != my_chunks:  # noqa: SLF001
                continue
            other = src.read_packed(q, module)
            x = popcount(np.bitwise_xor(mine, other))
            h = _entropy(x / info.numel) * info.numel
            if h < 0.9 * own_h and (best is None or h < best[3]):
                best = (snap, q, d, h)
        return best

    def _depth(self, snap: Snapshot, p: str, module: str) -> int:
        d, entry, s = 0, snap.manifest["personas"][p]["arrays"][f"masks/{module}"], snap
        while "delta" in entry:
            d += 1
            ref = entry["delta"]
            s = s if ref["version"] in (None, s.version) else self.snapshot(ref["version"])
            entry = s.manifest["personas"][ref["persona"]]["arrays"][f"masks/{module}"]
        return d

    def _store_array(self, b, p, kind, module, zmeta, base) -> dict:
        entry: dict = {"zarr": zmeta, "chunks": []}
        base_iter = None
        if base is not None:
            snap, q, _d, _h = base
            src = b if snap is None else snap
            base_iter = src.iter_chunks(q, module)
            entry["delta"] = {"persona": q, "version": None if snap is None else snap.version}
        for _r0, block in b.iter_chunks(p, module, kind):
            data = block
            if base_iter is not None:
                _, other = next(base_iter)
                if other.shape != block.shape:
                    raise MaskstoreError(f"{module}: delta base has another chunk grid")
                data = np.bitwise_xor(block, other)
            skewed = kind == "masks" and abs(popcount(data) / max(data.size * 8, 1) - 0.5) > 0.15
            entry["chunks"].append(list(self._put_chunk(data, skewed)))
        return entry

    # ---- checkout
    def checkout(self, ref: str, out: str | os.PathLike, model=None, force: bool = False) -> Path:
        """Write version ``ref`` as a plain bundle at ``out`` (recipes need ``model``)."""
        snap = self.snapshot(ref)
        named = dict(model.named_modules()) if model is not None else {}
        with create_bundle(out, snap.fingerprint, force=force) as nb:
            for p in snap.personas:
                meta = snap.persona(p)
                recipe = {}
                if snap.is_recipe(p):
                    if model is None:
                        raise MaskstoreError(
                            f"persona {p!r} is stored as a recipe: pass --model to recompute it"
                        )
                    recipe = snap.recipe_masks(p, lambda m: named[m].weight)
                w = nb.persona_writer(
                    p,
                    method=meta["method"],
                    params=meta["params"],
                    sparsity=meta["sparsity"],
                    calibration=meta["calibration"],
                    provenance=meta["provenance"],
                )
                with w:
                    for module, entry in meta["modules"].items():
                        if module in recipe:
                            w.write_mask(module, recipe[module], packed=True)
                        else:
                            w.write_mask(module, snap.read_packed(p, module), packed=True)
                        if entry.get("stats"):
                            w.write_stats(module, snap.read_stats(p, module))
                    w.meta["created"] = meta["created"]
                    w.meta["tool_version"] = meta["tool_version"]
                if w.meta["digest"] != meta["digest"]:
                    raise IntegrityError(
                        f"checked-out persona {p!r} does not match its recorded digest"
                    )
        if open_bundle(out).digest != snap.manifest["bundle_digest"]:
            raise IntegrityError("checked-out bundle digest differs from the version's")
        return Path(out)

    # ---- diff between versions
    def diff(self, a: str, b: str) -> dict:
        from . import algebra

        sa, sb = self.snapshot(a), self.snapshot(b)
        out = {
            "a": sa.version,
            "b": sb.version,
            "added": sorted(set(sb.personas) - set(sa.personas)),
            "removed": sorted(set(sa.personas) - set(sb.personas)),
            "changed": {},
            "unchanged": [],
        }
        for p in sorted(set(sa.personas) & set(sb.personas)):
            ma, mb = sa.persona(p), sb.persona(p)
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
                refs = [algebra.Ref(sa, p), algebra.Ref(sb, p)]
                counts = [algebra.count_module(refs, m) for m in mods]
                allc = algebra.pairs_report(refs, counts, by="module")[0]
                rec["diff_ratio_changed_modules"] = allc["diff_ratio"]
                rec["modules"] = {m: g["diff_ratio"] for m, g in allc["groups"].items()}
            out["changed"][p] = rec
        return out

    # ---- transfers
    def _needed(self, vids: list[str], store: Store) -> tuple[list[str], list[tuple[str, str]]]:
        """Versions reachable from ``vids`` (in ``store``) and their chunks (xxh3, blake2b)."""
        versions, chunks, seen = [], {}, set()
        todo = list(vids)
        while todo:
            v = todo.pop()
            if v in seen:
                continue
            seen.add(v)
            versions.append(v)
            man = self.manifest(v, store)
            todo.extend(man["parents"])
            for pe in man["personas"].values():
                for e in pe["arrays"].values():
                    for h, bl in e.get("chunks", []):
                        chunks[h] = bl
                    if "delta" in e and e["delta"]["version"]:
                        todo.append(e["delta"]["version"])
        return versions, list(chunks.items())

    def _copy(self, src: Store, dst: Store, vids: list[str], progress=None) -> TransferReport:
        """Copy what ``dst`` lacks; every object is verified (xxh3 and blake2b) before it lands."""
        versions, chunks = self._needed(vids, src)
        have = set(dst.list("chunks/")) | set(dst.list("versions/"))
        moved = nbytes = skipped = 0
        for h, bl in chunks:
            key = _chunk_key(h)
            if key in have:
                skipped += 1
                continue
            data = src.get(key)
            if data is None:
                raise IntegrityError(f"chunk {h} is missing from {src.url}: it is damaged")
            raw = _decode_chunk(h, data, src.url)
            if blake2b_hex(raw) != bl:
                raise IntegrityError(
                    f"chunk {h} from {src.url} does not match its manifest's blake2b: refused"
                )
            dst.put(key, data)
            _count_write()
            moved, nbytes = moved + 1, nbytes + len(data)
            if progress:
                progress(1)
        for v in reversed(versions):  # parents before children
            key = f"versions/{v}"
            if key in have:
                skipped += 1
                continue
            self.manifest(v, src)  # verifies blake2b
            data = src.get(key)
            dst.put(key, data)
            _count_write()
            moved, nbytes = moved + 1, nbytes + len(data)
        return TransferReport(moved, nbytes, skipped)

    def _update_ref(
        self, src_repo_store: Store, dst: Store, name: str, vid: str, kind: str
    ) -> None:
        if kind == "tags":
            if not dst.create(f"refs/tags/{name}", vid.encode()):
                have = dst.get(f"refs/tags/{name}").decode().strip()
                if have != vid:
                    raise RefConflict(
                        f"tag {name!r} is {have[:12]} on {dst.url}, not {vid[:12]}: tags never move"
                    )
            return
        cur = dst.get(f"refs/branches/{name}")
        cur_v = cur.decode().strip() if cur else None
        if cur_v == vid:
            return
        if cur_v and cur_v not in set(self.ancestors(vid, src_repo_store)):
            raise RefConflict(
                f"branch {name!r} on {dst.url} is at {cur_v[:12]}, which {vid[:12]} does not contain: "
                "pull first, then push"
            )
        dst.swap(f"refs/branches/{name}", vid.encode(), cur)

    def push(self, remote: str | Store, ref: str = "main", progress=None) -> TransferReport:
        """Send ``ref`` (a tag or branch) and what it needs; only missing objects move."""
        dst = remote if isinstance(remote, Store) else open_store(remote, create=True)
        kind = "tags" if self.store.has(f"refs/tags/{ref}") else "branches"
        vid = self.resolve(ref)
        dst.create("maskstore-repo.json", canonical_json({"format": 1}))
        rep = self._copy(self.store, dst, [vid], progress)
        self._update_ref(self.store, dst, ref, vid, kind)
        return rep

    def pull(self, remote: str | Store, ref: str = "main", progress=None) -> TransferReport:
        """Fetch ``ref`` from a remote (or an export zip) with what it needs; verify everything."""
        src = remote if isinstance(remote, Store) else open_store(remote)
        if src.get(f"refs/tags/{ref}") is not None:
            kind = "tags"
        elif src.get(f"refs/branches/{ref}") is not None:
            kind = "branches"
        else:
            raise MaskstoreError(f"{src.url} has no tag or branch {ref!r}")
        vid = src.get(f"refs/{kind}/{ref}").decode().strip()
        rep = self._copy(src, self.store, [vid], progress)
        self._update_ref(self.store, self.store, ref, vid, kind)
        return rep

    def export(self, ref: str, out: str | os.PathLike, force: bool = False) -> Path:
        """A single ``.zip`` with version ``ref``, what it needs, and its tag or branch."""
        import uuid
        import zipfile

        out = Path(out)
        if out.exists() and not force:
            raise MaskstoreError(f"{out} already exists: choose another name or pass --force")
        vid = self.resolve(ref)
        kind = "tags" if self.store.has(f"refs/tags/{ref}") else "branches"
        name = ref if self._ref_key(ref) else f"v-{vid[:12]}"
        versions, chunks = self._needed([vid], self.store)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
                zf.writestr("maskstore-repo.json", canonical_json({"format": 1}))
                for h, _ in chunks:
                    self.read_chunk(h)
                    zf.writestr(_chunk_key(h), self.store.get(_chunk_key(h)))
                for v in versions:
                    self.manifest(v)
                    zf.writestr(f"versions/{v}", self.store.get(f"versions/{v}"))
                zf.writestr(f"refs/{kind if self._ref_key(ref) else 'tags'}/{name}", vid)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return out

    def import_(self, path: str | os.PathLike) -> list[str]:
        """Bring in every ref of an export zip (verified). Returns the ref names."""
        src = ZipStore(path)
        names = []
        for key in src.list("refs/"):
            names.append(key.split("/", 2)[2])
            self.pull(src, names[-1])
        return names

    # ---- maintenance
    def reachable(self) -> tuple[set[str], set[str]]:
        heads = list(self.refs("tags").values()) + list(self.refs("branches").values())
        versions, chunks = self._needed(heads, self.store)
        return set(versions), {h for h, _ in chunks}

    def gc(self, grace_seconds: float = 3600.0) -> tuple[int, int]:
        """Delete objects no tag or branch reaches (older than ``grace_seconds``, so a commit in
        flight keeps its fresh chunks). Returns (objects removed, bytes freed)."""
        versions, chunks = self.reachable()
        now = time.time()
        removed = freed = 0
        for key in self.store.list("chunks/") + self.store.list("versions/"):
            name = key.split("/", 1)[1].replace("/", "")
            live = name in versions if key.startswith("versions/") else name in chunks
            if live or now - self.store.mtime(key) < grace_seconds:
                continue
            data = self.store.get(key)
            self.store.delete(key)
            removed, freed = removed + 1, freed + len(data or b"")
        return removed, freed

    def verify(self) -> list[str]:
        """Check every reachable object (blake2b of manifests, xxh3 and blake2b of chunks)."""
        problems = []
        try:
            heads = list(self.refs("tags").values()) + list(self.refs("branches").values())
            _versions, chunks = self._needed(heads, self.store)
        except MaskstoreError as e:
            return [str(e)]
        for h, bl in chunks:
            try:
                if blake2b_hex(self.read_chunk(h)) != bl:
                    problems.append(f"chunk {h} does not match its manifest's blake2b")
            except MaskstoreError as e:
                problems.append(str(e))
        return problems


def init_repo(path: str | os.PathLike) -> Repository:
    """Create (or open) a repository folder."""
    store = open_store(path, create=True)
    store.create("maskstore-repo.json", canonical_json({"format": 1}))
    return Repository(store, str(path))


def open_repo(path: str | os.PathLike) -> Repository:
    store = open_store(path)
    marker = store.get("maskstore-repo.json")
    if marker is None:
        raise MaskstoreError(f"{path} is not a maskstore repository: run maskstore init")
    if json.loads(marker).get("format") != 1:
        raise MaskstoreError(f"{path} has an unknown repository format: upgrade maskstore")
    return Repository(store, str(path))


def open_version(spec: str) -> Snapshot:
    """``"REPO@REF"`` -> that version as a read-only bundle."""
    path, ref = spec.rsplit("@", 1)
    return open_repo(path).snapshot(ref)


__all__ = [
    "MAX_DELTA_DEPTH",
    "Repository",
    "Snapshot",
    "TransferReport",
    "init_repo",
    "open_repo",
    "open_version",
]
