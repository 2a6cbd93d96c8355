"""The bundle format, read side: a zarr v3 group of bit-packed persona masks and their statistics.

Layout (see ``schemas/FORMAT.md`` for the full specification)::

    bundle/zarr.json                          root group; attrs["maskstore"] = bundle metadata
    bundle/personas/<name>/zarr.json          persona group; attrs["maskstore"] = persona metadata
    bundle/personas/<name>/masks/<module>     uint8 (out, ceil(in/8)), little bit order
    bundle/personas/<name>/stats/<module>     float64 (rows, in): sum, sumsq, norm_mean, norm_m2, ...

A :class:`Bundle` reads through a :class:`BundleSource`: :class:`StoreSource` reads this layout from
any :class:`~maskstore.store.stores.Store` (a folder or a zip), and the repository's snapshot source
reads a stored version. Writing lives in :mod:`maskstore.store.writer`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IntegrityError, MaskstoreError
from ..progress import Progress, counter
from .bits import packed_width, unpack
from .chunks import MAX_META_BYTES, ArrayMeta, ChunkSource, StoreArray
from .hashing import ArrayHasher, metadata_digest, xxh3
from .names import check_persona_name
from .stats import ChannelStats
from .stores import LocalStore, Store, ZipStore

FORMAT_VERSION = 1
DEFAULT_CHUNK_BYTES = 2 << 20  # about 2 MiB of packed mask per chunk
STAGING = ".staging"
# Fields of persona metadata left out of its digest: they change run to run for identical content.
_VOLATILE = ("name", "created", "tool_version", "digest")

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "FORMAT_VERSION",
    "Bundle",
    "BundleSource",
    "ModuleInfo",
    "StoreSource",
    "bundle_digest",
    "check_persona_name",
    "persona_digest",
    "validate",
]


# --------------------------------------------------------------------------------------------
# Metadata helpers


def _schema(name: str) -> dict:
    # the package's folder, found without importing importlib.resources (and tempfile with it)
    spec = importlib.util.find_spec("maskstore.schemas")
    folder = Path(next(iter(spec.submodule_search_locations or [])))
    return json.loads((folder / f"{name}.schema.json").read_text())


_VALIDATORS: dict[str, Callable[[Any], Any]] = {}


def validate(kind: str, meta: Any, where: str) -> None:
    """Validate ``meta`` against ``schemas/<kind>.schema.json``; raise a one-line error."""
    import fastjsonschema

    if kind not in _VALIDATORS:
        _VALIDATORS[kind] = fastjsonschema.compile(_schema(kind))
    try:
        _VALIDATORS[kind](meta)
    except fastjsonschema.JsonSchemaException as err:
        raise MaskstoreError(
            f"{where}: metadata fails {kind}.schema.json: {err.message}; "
            "the bundle is damaged or was written by another tool"
        ) from None


def bundle_digest(fingerprint: dict, personas: dict[str, str]) -> str:
    """xxh3-128 over the format version, the fingerprint and each persona's digest."""
    return metadata_digest(
        {"format_version": FORMAT_VERSION, "model": fingerprint, "personas": personas}
    )


def persona_digest(meta: dict) -> str:
    """xxh3-128 of the canonical JSON of a persona's metadata without its volatile fields."""
    return metadata_digest({k: v for k, v in meta.items() if k not in _VOLATILE})


def group_attrs(
    data: bytes | None, what: str, error: type[MaskstoreError] = MaskstoreError
) -> dict:
    """The ``maskstore`` attributes of a zarr v3 group's ``zarr.json``.

    Args:
        data: the document's bytes (None: missing).
        what: names the group in the error, e.g. ``"path is not a readable maskstore bundle"``.
        error: what it raises: :class:`IntegrityError` for a group inside a bundle (damage).
    """
    try:
        if data is None:
            raise FileNotFoundError("zarr.json is missing")
        if len(data) > MAX_META_BYTES * 16:
            raise ValueError("metadata over 16 MiB")
        doc = json.loads(data)
        if doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
            raise ValueError("not a zarr v3 group")
        meta = (doc.get("attributes") or {}).get("maskstore")
        if not isinstance(meta, dict):
            raise ValueError("no maskstore metadata")
    except Exception as e:  # noqa: BLE001 - any malformed document is the same problem
        reason = str(e) if isinstance(e, FileNotFoundError | ValueError) else type(e).__name__
        raise error(f"{what} ({reason}): it may be truncated or half-written") from None
    return meta


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


# --------------------------------------------------------------------------------------------
# Sources: where a bundle's metadata and arrays come from


class BundleSource(ABC):
    """What a :class:`Bundle` reads from. Implement it to read bundles from somewhere new.

    Attributes:
        label: a path or ``repo@version`` for messages.
    """

    label: str

    @abstractmethod
    def root_meta(self) -> dict:
        """The bundle metadata (unvalidated)."""

    @abstractmethod
    def persona_names(self) -> list[str]:
        """Names of the complete personas, sorted."""

    @abstractmethod
    def persona_meta(self, name: str) -> dict:
        """A persona's metadata (unvalidated); MaskstoreError when unreadable."""

    @abstractmethod
    def array(self, persona: str, kind: str, module: str) -> ChunkSource:
        """One stored array (``kind`` is ``masks`` or ``stats``); IntegrityError when missing."""

    @abstractmethod
    def nbytes(self, persona: str | None, kind: str | None) -> int:
        """Bytes stored for one persona (or all), one kind (or both)."""

    def is_recipe(self, persona: str) -> bool:
        """True when the persona's masks must be recomputed from a model (repository recipes)."""
        return False

    def problems(self) -> list[str]:
        """Damage that no persona's metadata names (verify reports it)."""
        return []

    def leftovers(self) -> list[str]:
        """Debris of interrupted writes (verify reports it without failing)."""
        return []

    def close(self) -> None:  # noqa: B027 - optional: most sources hold nothing open
        """Release what the source holds open (a zip file); nothing by default."""


class StoreSource(BundleSource):
    """The zarr v3 bundle layout in a :class:`~maskstore.store.stores.Store` (a folder or a zip)."""

    def __init__(self, store: Store, label: str | None = None) -> None:
        self.store = store
        self.label = label or store.url

    def root_meta(self) -> dict:
        # bounded before it is read or inflated (a zip member may inflate a thousandfold)
        data = self.store.get("zarr.json", limit=MAX_META_BYTES * 16)
        if data is None and hasattr(self.store, "check_bucket"):
            self.store.check_bucket()  # say so when the whole bucket is missing
        return group_attrs(data, f"{self.label} is not a readable maskstore bundle")

    def persona_names(self) -> list[str]:
        names = []
        for n in self.store.children("personas/"):
            try:
                check_persona_name(n)
            except MaskstoreError:
                continue  # not a persona maskstore wrote: verify reports it
            if self.store.has(f"personas/{n}/zarr.json"):
                names.append(n)
        return names

    def problems(self) -> list[str]:
        out = []
        for n in self.store.children("personas/"):
            if n == "zarr.json":
                continue
            try:
                check_persona_name(n)
            except MaskstoreError:
                out.append(
                    f"{self.label}: personas/{n!r} is not a valid persona name: not maskstore's"
                )
                continue
            if not self.store.has(f"personas/{n}/zarr.json"):
                out.append(
                    f"{self.label}: persona {n!r} has no zarr.json: it is damaged; restore it"
                )
        return out

    def leftovers(self) -> list[str]:
        found = [f"{STAGING}/{n}" for n in self.store.children(f"{STAGING}/")]
        return [f"{self.label}: {k} is left from an interrupted write" for k in found]

    def persona_meta(self, name: str) -> dict:
        return group_attrs(
            self.store.get(f"personas/{name}/zarr.json", limit=MAX_META_BYTES * 16),
            f"persona {name!r} in {self.label} has unreadable metadata",
            IntegrityError,  # the bundle opened: its persona's document is damaged
        )

    def array(self, persona: str, kind: str, module: str) -> ChunkSource:
        path = f"personas/{persona}/{kind}/{module}"
        raw = self.store.get(f"{path}/zarr.json", limit=MAX_META_BYTES)
        if raw is None:
            raise IntegrityError(
                f"{path} in {self.label} is missing or unreadable: the bundle is truncated; restore it"
            )
        return StoreArray(self.store, path, ArrayMeta.parse(raw, f"{self.label} {path}"))

    def nbytes(self, persona: str | None, kind: str | None) -> int:
        if persona is None and kind is None:
            return sum(self.store.sizes("").values())
        totals = self._totals if self.store.read_only else self._walk_totals()
        return sum(
            n
            for (p, k), n in totals.items()
            if (persona is None or p == persona) and (kind is None or k == kind)
        )

    def _walk_totals(self) -> dict[tuple[str, str], int]:
        """(persona, kind) -> stored bytes, from one listing of ``personas/``."""
        out: dict[tuple[str, str], int] = {}
        for key, n in self.store.sizes("personas/").items():
            parts = key.split("/", 3)
            if len(parts) == 4:
                out[(parts[1], parts[2])] = out.get((parts[1], parts[2]), 0) + n
        return out

    @cached_property
    def _totals(self) -> dict[tuple[str, str], int]:
        return self._walk_totals()

    def close(self) -> None:
        self.store.close()


# --------------------------------------------------------------------------------------------
# Reading


class Bundle:
    """A lazily opened bundle: only metadata is read until an array is asked for.

    Args:
        path: a bundle directory or a ``.zip`` of one.
        writable: open a directory bundle's store for writing (see
            :class:`maskstore.store.writer.WritableBundle`, which adds personas).
        source: read from this source instead of ``path`` (a stored version, say).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        writable: bool = False,
        source: BundleSource | None = None,
    ) -> None:
        if source is None:
            if path is None:
                raise MaskstoreError("Bundle needs a path or a source")
            p = Path(path)
            if not p.exists():
                raise MaskstoreError(f"no bundle at {p}: check the path")
            if p.is_file():
                if writable:
                    raise MaskstoreError(
                        f"{p} is a zip bundle and read-only: unzip it to modify it"
                    )
                store: Store = ZipStore(p)
            else:
                store = LocalStore(p, read_only=not writable)
            source = StoreSource(store, str(p))
        elif writable:
            raise MaskstoreError(f"{source.label} is read-only")
        self.source = source
        self.path = Path(path) if path is not None else Path(source.label)
        self.writable = writable
        try:
            meta = source.root_meta()
            version = meta.get("format_version")
            if version != FORMAT_VERSION:
                raise MaskstoreError(
                    f"{self.path} has format version {version!r}; this maskstore reads version "
                    f"{FORMAT_VERSION}: upgrade maskstore"
                )
            validate("bundle", meta, str(self.path))
        except BaseException:
            source.close()  # a refused bundle keeps nothing open (a zip's file descriptor)
            raise
        self.meta = meta
        self._personas: dict[str, dict] = {}

    @property
    def store(self) -> Store | None:
        """The store of a bundle read from one (None for stored versions)."""
        return getattr(self.source, "store", None)

    # ---- model and modules
    @property
    def fingerprint(self) -> dict:
        return self.meta["model"]

    @property
    def model_source(self) -> dict | None:
        """Where the base model came from (``model``, ``revision``, ``dtype``), if recorded."""
        return self.meta.get("source")

    @cached_property
    def fingerprint_digest(self) -> str:
        """xxh3-128 of the fingerprint; each persona records the one it was written for."""
        return metadata_digest(self.fingerprint)

    @cached_property
    def modules(self) -> dict[str, ModuleInfo]:
        return {n: ModuleInfo(n, *s) for n, s in self.fingerprint["modules"].items()}

    # ---- personas
    @property
    def personas(self) -> list[str]:
        """Names of complete personas, sorted."""
        return self.source.persona_names()

    def persona(self, name: str) -> dict:
        """A persona's metadata (validated, digest checked), read once and cached."""
        if name not in self._personas:
            if name not in self.personas:
                known = ", ".join(self.personas) or "none"
                raise MaskstoreError(f"unknown persona {name!r} in {self.path}; known: {known}")
            meta = self.source.persona_meta(name)
            validate("persona", meta, f"{self.path} persona {name!r}")
            if persona_digest(meta) != meta["digest"]:
                raise IntegrityError(
                    f"persona {name!r} in {self.path}: metadata digest mismatch (edited or damaged); "
                    "rebuild or restore it"
                )
            if meta.get("model_digest", self.fingerprint_digest) != self.fingerprint_digest:
                raise IntegrityError(
                    f"persona {name!r} in {self.path} was written for another model fingerprint: "
                    "the bundle's zarr.json was edited or damaged; restore it"
                )
            self._personas[name] = meta
        return self._personas[name]

    def persona_modules(self, name: str) -> list[str]:
        return list(self.persona(name)["modules"])

    def is_recipe(self, persona: str) -> bool:
        """True when the persona stores no mask bits (a repository recipe)."""
        return self.source.is_recipe(persona)

    def recipe_masks(
        self,
        persona: str,
        weights: Callable[[str], Any],
        progress: Progress | None = None,
        recompute: Callable[..., np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """A recipe persona's packed masks, recomputed from model weights by ``recompute``
        (:func:`maskstore.build.recompute_recipe`); ``progress(done, total)`` in modules."""
        fn = getattr(self.source, "recipe_masks", None)
        if fn is None:
            raise MaskstoreError(f"persona {persona!r} in {self.path} is not a recipe")
        return fn(persona, weights, progress, recompute)

    @property
    def digest(self) -> str:
        """Bundle digest: xxh3-128 over format version, fingerprint and persona digests."""
        return bundle_digest(
            self.fingerprint, {p: self.persona(p)["digest"] for p in self.personas}
        )

    # ---- arrays
    def array(self, persona: str, kind: str, module: str) -> tuple[ChunkSource, dict]:
        """One array and its validated maskstore attributes (``kind``: masks or stats).

        Before a byte of data is read, the array's shape, type and chunk grid are checked
        against the model fingerprint, and its digest against the persona's record, so a
        shortened, swapped or edited array is refused here.
        """
        meta = self.persona(persona)
        entry = meta["modules"].get(module)
        if entry is None:
            raise MaskstoreError(f"persona {persona!r} has no module {module!r}")
        where = f"{self.path}: personas/{persona}/{kind}/{module}"
        info = self.modules.get(module)
        if info is None:
            raise IntegrityError(f"{where} is not in the model fingerprint: the bundle is damaged")
        if kind == "masks":
            shape, dtype, want = (
                (info.out_features, packed_width(info.in_features)),
                "uint8",
                entry["mask"],
            )
        elif kind == "stats" and entry.get("stats"):
            st = entry["stats"]
            shape, dtype, want = (len(st["rows"]), info.in_features), "float64", st["digest"]
        else:
            raise MaskstoreError(f"persona {persona!r} stores no {kind} for {module!r}")
        arr = self.source.array(persona, kind, module)
        am = arr.meta
        if am.shape != shape or am.dtype.newbyteorder("=") != np.dtype(dtype):
            raise IntegrityError(
                f"{where} is {am.dtype} {list(am.shape)} where the model fingerprint says "
                f"{dtype} {list(shape)}: the bundle is damaged or edited; restore it"
            )
        ameta = am.maskstore
        validate("array", ameta, where)
        if ameta["digest"] != want:
            raise IntegrityError(
                f"{where} is not the array the persona records (swapped or edited): restore it"
            )
        if len(ameta["chunk_digests"]) != am.nchunks:
            raise IntegrityError(f"{where}: chunk digest list does not match the chunk grid")
        return arr, ameta

    def iter_chunks(
        self, persona: str, module: str, kind: str = "masks"
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, block)`` chunk by chunk, each verified against its xxh3 digest.

        A block is a view into a reused buffer, valid until the next step: copy it to keep it.

        Raises:
            IntegrityError: naming the chunk, when its bytes do not match.
        """
        arr, ameta = self.array(persona, kind, module)
        return self._verified_chunks(arr, ameta, f"personas/{persona}/{kind}/{module}")

    def _verified_chunks(
        self, arr: ChunkSource, ameta: dict, where: str
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Chunks checked one by one against their xxh3, and the whole array against its digest
        once the last chunk is read (a reader that stops early has read verified chunks)."""
        digests = ameta["chunk_digests"]
        m = arr.meta
        hasher = ArrayHasher(m.dtype, m.shape)
        blocks = arr.chunks()
        for i in range(m.nchunks):
            try:
                block = next(blocks)
            except MaskstoreError:
                raise
            except Exception as e:  # noqa: BLE001 - any decoding failure is damage
                raise IntegrityError(
                    f"{self.path}: chunk {i} of {where} cannot be decoded ({type(e).__name__}); "
                    "the bundle is damaged: restore it"
                ) from None
            if block.shape != (m.rows_of(i), *m.shape[1:]) or xxh3(block) != digests[i]:
                raise IntegrityError(
                    f"{self.path}: chunk {i} of {where} fails its xxh3 digest; "
                    "the bundle is damaged: restore it"
                )
            hasher.update(block)
            if i == m.nchunks - 1 and hasher.hexdigest() != ameta["digest"]:
                raise IntegrityError(
                    f"{self.path}: {where} fails its array digest; the bundle is damaged: restore it"
                )
            yield i * m.chunk_rows, block
        if m.nchunks == 0 and hasher.hexdigest() != ameta["digest"]:
            raise IntegrityError(f"{self.path}: {where} fails its array digest: restore it")

    def read_packed(self, persona: str, module: str) -> np.ndarray:
        """One module's mask as packed ``uint8`` rows ``(out, ceil(in/8))``, verified."""
        if module not in self.persona(persona)["modules"]:  # metadata checked before allocating
            raise MaskstoreError(f"persona {persona!r} has no module {module!r}")
        info = self.modules[module]
        out = np.empty((info.out_features, packed_width(info.in_features)), dtype=np.uint8)
        filled = 0
        for r0, block in self.iter_chunks(persona, module):
            out[r0 : r0 + block.shape[0]] = block
            filled += block.shape[0]
        if filled != info.out_features:  # never hand back memory that was not filled
            raise IntegrityError(
                f"{self.path}: {persona}/{module} holds {filled} rows, not {info.out_features}"
            )
        return out

    def read_mask(self, persona: str, module: str, as_torch: bool = False) -> Any:
        """One module's mask unpacked to bool ``(out, in)`` (numpy, or torch with ``as_torch``)."""
        m = unpack(self.read_packed(persona, module), self.modules[module].in_features)
        if as_torch:
            import torch

            return torch.from_numpy(m)
        return m

    def read_stats(self, persona: str, module: str) -> ChannelStats:
        """The calibration statistics stored with a persona's module."""
        entry = self.persona(persona)["modules"].get(module, {}).get("stats")
        if not entry:
            raise MaskstoreError(
                f"persona {persona!r} stores no statistics for {module!r}: rebuild it from a model"
            )
        blocks = [b.copy() for _, b in self.iter_chunks(persona, module, kind="stats")]
        arr = np.concatenate(blocks) if blocks else np.empty((0, 0))
        return ChannelStats.from_array(arr, entry["rows"], entry["tokens"], entry["samples"])

    def has_stats(self, persona: str) -> bool:
        mods = self.persona(persona)["modules"].values()
        return bool(mods) and all(m.get("stats") for m in mods)

    def nbytes_on_disk(self, persona: str | None = None, kind: str | None = None) -> int:
        """Bytes stored for one persona (or the whole bundle); ``kind`` = masks or stats only."""
        return self.source.nbytes(persona, kind)

    # ---- verification
    def verify(self, progress: Progress | None = None) -> list[str]:
        """Recompute every digest; return one line per problem (empty when all match).

        Args:
            progress: ``progress(done, total)`` in personas.
        """
        problems: list[str] = []
        tick = counter(progress, len(self.personas))
        for p in self.personas:
            tick(1)
            try:
                meta = self.persona(p)
            except MaskstoreError as e:
                problems.append(str(e))
                continue
            if meta.get("method") == "blend":  # its operands must be the ones it recorded
                for o in meta.get("provenance", {}).get("operands", []):
                    name = o.get("name")
                    have = self.persona(name)["digest"] if name in self.personas else None
                    if have != o.get("digest"):
                        problems.append(
                            f"blend {p!r}: operand {name!r} is not the one it was made from "
                            "(replaced or removed); blend again"
                        )
            for module, entry in meta["modules"].items():
                kinds = [("masks", entry["mask"])]
                if entry.get("stats"):
                    kinds.append(("stats", entry["stats"]["digest"]))
                for kind, _want in kinds:
                    try:
                        for _ in self.iter_chunks(p, module, kind):
                            pass
                    except MaskstoreError as e:
                        problems.append(str(e))
        problems.extend(self.source.problems())
        return problems

    def leftovers(self) -> list[str]:
        """What interrupted writes left behind (staging folders, temporary files)."""
        return self.source.leftovers()

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, personas={self.personas})"
