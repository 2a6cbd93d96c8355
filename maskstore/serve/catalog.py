"""The personas a server offers: several sources as one bundle-like catalog, and an LRU of
loaded masks bounded by bytes.

A :class:`Catalog` joins bundles of one model (folders, zips, ``REPO@REF``, ...) under unique
names (``NAME``, or ``SOURCE#NAME`` where two sources share a name) and answers what
:class:`~maskstore.runtime.MaskHandle` asks a bundle. Blends are left out: a server applies one
binary mask per row. :class:`PersonaCache` holds whole personas' packed masks, least recently
used first out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np

from ..errors import MaskstoreError
from ..store.format import Bundle


class Catalog:
    """Several bundles of one model, read as one (only the parts a ``MaskHandle`` reads)."""

    def __init__(self, sources: Iterable[tuple[str, Bundle]]) -> None:
        """Args:
        sources: ``(label, bundle)`` pairs; the first fixes the model fingerprint.
        """
        self._sources: list[tuple[str, Bundle]] = []
        self._where: dict[str, tuple[Bundle, str]] = {}  # served name -> (bundle, its name)
        self._lock = threading.Lock()
        sources = list(sources)
        seen: dict[str, int] = {}
        for _, bundle in sources:
            for p in _masks_of(bundle):
                seen[p] = seen.get(p, 0) + 1
        clash = {p for p, k in seen.items() if k > 1}
        for label, bundle in sources:
            self.add(label, bundle, clash)
        if not self._sources:
            raise MaskstoreError("serve needs at least one bundle")

    # ---- what a MaskHandle reads
    @property
    def first(self) -> Bundle:
        return self._sources[0][1]

    @property
    def modules(self):
        return self.first.modules

    @property
    def fingerprint(self) -> dict:
        return self.first.fingerprint

    @property
    def model_source(self) -> dict | None:
        return self.first.model_source

    @property
    def personas(self) -> list[str]:
        with self._lock:
            return list(self._where)

    def persona(self, name: str) -> dict:
        b, n = self._locate(name)
        return b.persona(n)

    def persona_modules(self, name: str) -> list[str]:
        b, n = self._locate(name)
        return b.persona_modules(n)

    def read_packed(self, name: str, module: str) -> np.ndarray:
        b, n = self._locate(name)
        return b.read_packed(n, module)

    def is_recipe(self, name: str) -> bool:
        b, n = self._locate(name)
        return bool(getattr(b, "is_recipe", None) and b.is_recipe(n))

    def recipe_masks(self, name: str, base_weight: Callable, **kw) -> dict[str, np.ndarray]:
        b, n = self._locate(name)
        return b.recipe_masks(n, base_weight, **kw)

    # ---- the catalog itself
    def source_of(self, name: str) -> str:
        b, _ = self._locate(name)
        return next(label for label, s in self._sources if s is b)

    def add(self, label: str, bundle: Bundle, clash: set[str] | None = None) -> list[str]:
        """Serve ``bundle``'s mask personas too, as ``NAME``, or ``LABEL#NAME`` when the name
        is taken or in ``clash``; returns the names they are served under.

        Raises:
            MaskstoreError: a bundle of another model.
        """
        with self._lock:
            if self._sources and bundle.fingerprint_digest != self.first.fingerprint_digest:
                raise MaskstoreError(
                    f"{label} is a bundle of another model than {self._sources[0][0]}: "
                    "serve bundles of one model together"
                )
            self._sources.append((label, bundle))
            taken = set(self._where) | (clash or set())
            added = []
            for p in _masks_of(bundle):
                name = f"{label}#{p}" if p in taken else p
                if name in self._where:
                    raise MaskstoreError(f"{name} is served twice: give each source once")
                self._where[name] = (bundle, p)
                added.append(name)
            return added

    def remove(self, name: str) -> None:
        with self._lock:
            if self._where.pop(name, None) is None:
                raise MaskstoreError(f"unknown persona {name!r}")

    def _locate(self, name: str) -> tuple[Bundle, str]:
        with self._lock:
            hit = self._where.get(name)
        if hit is None:
            raise MaskstoreError(f"unknown persona {name!r}")
        return hit


def _masks_of(bundle: Bundle) -> list[str]:
    """The personas of ``bundle`` that are masks (blends are soft gates over other personas)."""
    return [p for p in bundle.personas if bundle.persona(p).get("method") != "blend"]


Masks = dict[str, np.ndarray]


class PersonaCache:
    """Whole personas' packed masks, bounded by bytes, least recently used evicted first (the
    persona being added always fits, even past the bound). Thread-safe."""

    def __init__(self, limit: int, on_evict: Callable[[str], None] | None = None) -> None:
        self.limit = limit
        self.on_evict = on_evict
        self._d: OrderedDict[str, tuple[Masks, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0

    def get(self, persona: str) -> Masks | None:
        with self._lock:
            hit = self._d.get(persona)
            if hit is None:
                return None
            self._d.move_to_end(persona)
            return hit[0]

    def put(self, persona: str, masks: Masks) -> None:
        size = sum(m.nbytes for m in masks.values())
        evicted = []
        with self._lock:
            if persona in self._d:
                self.bytes -= self._d.pop(persona)[1]
            self._d[persona] = (masks, size)
            self.bytes += size
            while self.bytes > self.limit and len(self._d) > 1:
                old, (_, n) = self._d.popitem(last=False)
                self.bytes -= n
                evicted.append(old)
        for old in evicted:
            if self.on_evict is not None:
                self.on_evict(old)

    def drop(self, persona: str) -> bool:
        with self._lock:
            hit = self._d.pop(persona, None)
            if hit is not None:
                self.bytes -= hit[1]
            return hit is not None

    def __contains__(self, persona: str) -> bool:
        with self._lock:
            return persona in self._d

    def names(self) -> list[str]:
        with self._lock:
            return list(self._d)
