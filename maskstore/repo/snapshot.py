"""Reading a stored version: a :class:`Snapshot` composes a :class:`~maskstore.store.format.Bundle` whose
source is the version's manifest, so every reader (set algebra, runtime, verify, info) works on a
version unchanged. Mask arrays stored as xor deltas are resolved chunk by chunk.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import IntegrityError, MaskstoreError
from ..progress import Progress, counter
from ..store.chunks import ArrayMeta, ChunkSource
from ..store.format import Bundle, BundleSource
from ..store.hashing import ArrayHasher

if TYPE_CHECKING:
    from ._protocol import RepositoryLike as Repository

MAX_DELTA_DEPTH = 4


class ObjectArray(ChunkSource):
    """One array of a version, read chunk by chunk from repository objects (deltas resolved)."""

    def __init__(self, repo: Repository, entry: dict, base: ObjectArray | None, where: str) -> None:
        self.repo = repo
        self.entry = entry
        self.meta = ArrayMeta.parse(entry["zarr"], where)
        self.base = base
        self.where = where

    @property
    def is_recipe(self) -> bool:
        return bool(self.entry.get("recipe"))

    def chunks(self) -> Iterator[np.ndarray]:
        if self.is_recipe:
            raise MaskstoreError("this mask is stored as a recipe: materialize it with a model")
        m = self.meta
        if len(self.entry["chunks"]) != m.nchunks:
            raise IntegrityError(
                f"{self.where}: {len(self.entry['chunks'])} chunks for a grid of {m.nchunks}"
            )
        base_iter = self.base.chunks() if self.base is not None else None
        for i, (h, b) in enumerate(self.entry["chunks"]):
            need = m.rows_of(i) * m.row_bytes
            raw = self.repo.objects.read_chunk(h, limit=need, blake2b=b)
            if len(raw) != need:
                raise IntegrityError(f"chunk {h} holds {len(raw)} bytes, not {need}: damaged")
            block = np.frombuffer(raw, dtype=m.dtype).reshape(m.rows_of(i), *m.shape[1:])
            if base_iter is not None:
                block = np.bitwise_xor(block, next(base_iter))
            yield block


class VersionSource(BundleSource):
    """A bundle source over one version's manifest."""

    def __init__(self, repo: Repository, version: str) -> None:
        self.repo = repo
        self.version = version
        self.manifest = repo.objects.manifest(version)
        self.label = f"{repo.path}@{version[:12]}"

    def root_meta(self) -> dict:
        return self.manifest["root"]

    def persona_names(self) -> list[str]:
        return sorted(self.manifest["personas"])

    def persona_meta(self, name: str) -> dict:
        return self.manifest["personas"][name]["meta"]

    def entry(self, persona: str, key: str) -> dict:
        try:
            return self.manifest["personas"][persona]["arrays"][key]
        except KeyError:
            raise IntegrityError(
                f"{self.label}: {persona}/{key} is missing from the manifest"
            ) from None

    def object_array(self, persona: str, key: str, depth: int = 0) -> ObjectArray:
        """The array ``key`` of ``persona``, its xor-delta bases resolved (a chain deeper than
        ``MAX_DELTA_DEPTH``, or one that loops, is refused)."""
        if depth > MAX_DELTA_DEPTH:
            raise IntegrityError(
                f"{self.label}: the delta chain of {persona}/{key} is deeper than "
                f"{MAX_DELTA_DEPTH} or loops: the version is damaged or forged"
            )
        entry = self.entry(persona, key)
        base = None
        if "delta" in entry:
            d = entry["delta"]
            src = self if d["version"] in (None, self.version) else self.repo.source(d["version"])
            base = src.object_array(d["persona"], key, depth + 1)
        return ObjectArray(self.repo, entry, base, f"{self.label} {persona}/{key}")

    def array(self, persona: str, kind: str, module: str) -> ChunkSource:
        arr = self.object_array(persona, f"{kind}/{module}")
        if arr.is_recipe:
            raise MaskstoreError(
                f"persona {persona!r} is stored as a recipe: check it out with a model "
                "(maskstore checkout VERSION --out B --model PATH) or attach it to one"
            )
        return arr

    def is_recipe(self, persona: str) -> bool:
        arrays = self.manifest["personas"][persona]["arrays"]
        return any(e.get("recipe") for k, e in arrays.items() if k.startswith("masks/"))

    def depth(self, persona: str, module: str) -> int:
        """How many xor deltas lie under this persona's mask of ``module``."""
        d, src, entry = 0, self, self.entry(persona, f"masks/{module}")
        while "delta" in entry:
            d += 1
            if d > MAX_DELTA_DEPTH:
                raise IntegrityError(f"{self.label}: delta chain of {module} is too deep")
            ref = entry["delta"]
            src = src if ref["version"] in (None, src.version) else self.repo.source(ref["version"])
            entry = src.entry(ref["persona"], f"masks/{module}")
        return d

    def nbytes(self, persona: str | None, kind: str | None) -> int:
        total = 0
        for p in [persona] if persona else self.persona_names():
            for key, e in self.manifest["personas"][p]["arrays"].items():
                if kind is None or key.startswith(kind + "/"):
                    total += sum(self.repo.objects.size(h) for h, _ in e.get("chunks", []))
        return total

    def recipe_masks(
        self,
        persona: str,
        weights: Callable[[str], Any],
        progress: Progress | None = None,
        recompute: Callable[..., np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Recompute a recipe persona's packed masks from model weights; check every digest
        (``progress(done, total)`` in modules).

        Args:
            recompute: ``recompute(meta, module, weight, stats) -> packed mask``, the scoring
                that built the persona (:func:`maskstore.build.recompute_recipe`); injected, so
                the repository never imports the torch side.
        """
        if recompute is None:
            raise MaskstoreError(
                f"persona {persona!r} is a recipe: recomputing it needs "
                "recompute=maskstore.build.recompute_recipe"
            )
        bundle = Bundle(source=self)
        meta = bundle.persona(persona)
        p = meta["params"]
        names = [persona] + ([p["opposite"]] if "opposite" in p else [])
        tick = counter(progress, len(meta["modules"]))
        out = {}
        for module, entry in meta["modules"].items():
            stats = {n: bundle.read_stats(n, module) for n in names}
            packed = recompute(meta, module, weights(module), stats)
            h = ArrayHasher(packed.dtype, packed.shape)
            h.update(packed)
            if h.hexdigest() != entry["mask"]:
                raise IntegrityError(
                    f"recipe of {persona!r} gives a different mask for {module} than recorded: "
                    "the model's weights differ from the ones it was built on"
                )
            out[module] = packed
            tick(1)
        return out


def check_metadata(repo: Repository, version: str) -> None:
    """Check a version without reading a chunk: its bundle and persona metadata (digests), and
    every array's shape, type, chunk grid and digest against the fingerprint and the persona's
    record. Raises IntegrityError naming the first problem."""
    src = repo.source(version)
    b = Bundle(source=src)
    for p in b.personas:
        meta = b.persona(p)
        recipe = src.is_recipe(p)
        for module, entry in meta["modules"].items():
            if not recipe:
                b.array(p, "masks", module)
            if entry.get("stats"):
                b.array(p, "stats", module)


class Snapshot:
    """A version of a repository: its manifest, and a read-only :class:`Bundle` over it.

    ``maskstore.open("repo@tag")`` returns ``Snapshot.bundle``.
    """

    def __init__(self, repo: Repository, version: str) -> None:
        self.repo = repo
        self.version = version
        self.source = repo.source(version)
        self.manifest = self.source.manifest
        self.bundle = Bundle(source=self.source)

    @property
    def personas(self) -> list[str]:
        return self.bundle.personas

    def is_recipe(self, persona: str) -> bool:
        return self.source.is_recipe(persona)

    def checkout(
        self,
        out: str | os.PathLike,
        model: Any = None,
        force: bool = False,
        progress: Progress | None = None,
        recompute: Callable[..., np.ndarray] | None = None,
    ) -> Path:
        """Write this version as a plain bundle at ``out`` (recipes need ``model`` and
        ``recompute``, see :meth:`VersionSource.recipe_masks`); ``progress(done, total)`` as
        modules are written or recomputed (``progress(done, total)``)."""
        from ..store.writer import create_bundle

        b = self.bundle
        named = dict(model.named_modules()) if model is not None else {}
        tick = counter(progress, sum(len(b.persona(p)["modules"]) for p in b.personas))
        with create_bundle(out, b.fingerprint, force=force, source=b.model_source) as nb:
            for p in b.personas:
                meta = b.persona(p)
                recipe = {}
                if self.is_recipe(p):
                    if model is None:
                        raise MaskstoreError(
                            f"persona {p!r} is stored as a recipe: pass `model` to recompute it"
                        )
                    recipe = b.recipe_masks(p, lambda m: named[m].weight,
                                            lambda d, t: tick(1),
                                            recompute=recompute)  # fmt: skip
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
                        packed = recipe[module] if module in recipe else b.read_packed(p, module)
                        w.write_mask(module, packed, packed=True)
                        if entry.get("stats"):
                            w.write_stats(module, b.read_stats(p, module))
                        if not recipe:  # a recipe's modules counted as computed
                            tick(1)
                    w.meta["created"] = meta["created"]
                    w.meta["tool_version"] = meta["tool_version"]
                    if "model_digest" not in meta:  # written before personas recorded it
                        w.meta.pop("model_digest", None)
                if w.meta["digest"] != meta["digest"]:
                    raise IntegrityError(
                        f"checked-out persona {p!r} does not match its recorded digest"
                    )
        if Bundle(out).digest != self.manifest["bundle_digest"]:
            raise IntegrityError("checked-out bundle digest differs from the version's")
        return Path(out)
