"""Persona masks in a live model: attach a bundle, switch persona in place, never reload.

Each masked ``nn.Linear`` keeps one pristine copy of its weight (the first time a persona touches
it, the original storage becomes the pristine copy and the Parameter gets a fresh one). Switching
writes ``W = W0 * G`` in place with ``G = M + gamma (1 - M)``, so the ``Parameter`` objects never
change and their storage stays put from the first switch on (hooks, optimizers and compiled graphs
keep working), and the forward pass does no extra work. Masks are read lazily per module and cached packed, 1 bit a
weight, in an LRU bounded by bytes.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .bits import unpack_torch
from .errors import MaskstoreError
from .format import Bundle
from .modules import check_untied, weights_hash
from .opener import open_bundle


@dataclass
class CacheInfo:
    entries: int
    bytes: int
    limit: int
    hits: int
    misses: int


class _PackedCache:
    """LRU of packed masks ``(persona, module) -> uint8 tensor``, bounded by bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._d: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    def get(self, key: tuple[str, str]) -> torch.Tensor | None:
        t = self._d.get(key)
        if t is None:
            self.misses += 1
            return None
        self.hits += 1
        self._d.move_to_end(key)
        return t

    def put(self, key: tuple[str, str], t: torch.Tensor) -> None:
        if key in self._d:
            return
        self._d[key] = t
        self.bytes += t.numel()
        while self.bytes > self.limit and len(self._d) > 1:
            _, old = self._d.popitem(last=False)
            self.bytes -= old.numel()

    def info(self) -> CacheInfo:
        return CacheInfo(len(self._d), self.bytes, self.limit, self.hits, self.misses)


class MaskHandle:
    """Personas of a bundle attached to a live model. Create with :func:`attach`."""

    def __init__(
        self,
        model: nn.Module,
        bundle: Bundle,
        cache_bytes: int = 512 << 20,
        check_weights: bool = False,
        untie: bool = False,
    ) -> None:
        self.model = model
        self.bundle = bundle
        self.modules = _match(model, bundle, check_weights)
        check_untied(model, self.modules, untie)
        self._pristine: dict[str, torch.Tensor] = {}
        self._cache = _PackedCache(cache_bytes)
        self.active: str | None = None
        self.gamma: float = 0.0

    # ---- introspection
    @property
    def personas(self) -> list[str]:
        return self.bundle.personas

    def cache_info(self) -> CacheInfo:
        return self._cache.info()

    def memory_overhead(self) -> int:
        """Bytes held beyond the model: pristine weight copies plus the packed cache."""
        return (
            sum(t.numel() * t.element_size() for t in self._pristine.values()) + self._cache.bytes
        )

    # ---- switching
    def _load(self, persona: str) -> dict[str, torch.Tensor]:
        """Every packed mask of ``persona`` for the attached modules (verified; may raise)."""
        if getattr(self.bundle, "is_recipe", None) and self.bundle.is_recipe(persona):
            # a recipe persona: recompute its masks from this model's pristine weights (digests
            # are checked against the recorded ones)
            def weights(name: str) -> torch.Tensor:
                return self._pristine.get(name, self.modules[name].weight)

            packed = self.bundle.recipe_masks(persona, weights)
            return {n: torch.from_numpy(p) for n, p in packed.items() if n in self.modules}
        masks = {}
        for name in self.bundle.persona_modules(persona):
            if name not in self.modules:
                continue
            t = self._cache.get((persona, name))
            if t is None:
                t = torch.from_numpy(self.bundle.read_packed(persona, name))
            masks[name] = t
        return masks

    def use(self, persona: str | None, gamma: float = 0.0) -> None:
        """Switch to ``persona`` (None: the base model) with soft gate ``gamma`` in [0, 1].

        The masks are all read and verified before any weight changes: on an error the model is
        left exactly as it was.
        """
        if not (isinstance(gamma, int | float) and 0.0 <= gamma <= 1.0):
            raise MaskstoreError(f"gamma must be in [0, 1], got {gamma!r}")
        if persona is None:
            self._restore_all()
            self.active, self.gamma = None, 0.0
            return
        if persona not in self.bundle.personas:
            raise MaskstoreError(
                f"unknown persona {persona!r}; known: {', '.join(self.bundle.personas) or 'none'}"
            )
        masks = self._load(persona)
        try:
            with torch.no_grad():
                for name, mod in self.modules.items():
                    w = mod.weight
                    if name not in self._pristine:
                        # Keep the original storage as the pristine copy and give the Parameter
                        # (the same object) a fresh one: weights loaded from safetensors are
                        # often memory-mapped, and writing into them page-faults copy-on-write
                        # page by page (about 1 s for 106M weights).
                        self._pristine[name] = w.data
                        w.data = w.data.clone()
                    base = self._pristine[name]
                    packed = masks.get(name)
                    if packed is None:
                        w.copy_(base)
                        continue
                    keep = unpack_torch(packed.to(w.device, non_blocking=True), mod.in_features)
                    if gamma == 0.0:
                        torch.mul(base, keep, out=w)
                    else:
                        gate = torch.where(keep, 1.0, gamma).to(w.dtype)
                        torch.mul(base, gate, out=w)
        except BaseException:
            self._restore_all()
            self.active, self.gamma = None, 0.0
            raise
        for name, t in masks.items():
            self._cache.put((persona, name), t)
        self.active, self.gamma = persona, float(gamma)

    set_adapter = use  # PEFT-style name

    def _restore_all(self) -> None:
        with torch.no_grad():
            for name, base in self._pristine.items():
                self.modules[name].weight.copy_(base)

    @contextlib.contextmanager
    def persona(self, name: str | None, gamma: float = 0.0) -> Iterator[MaskHandle]:
        """Use ``name`` inside the block, then switch back to what was active."""
        prev, prev_gamma = self.active, self.gamma
        self.use(name, gamma)
        try:
            yield self
        finally:
            self.use(prev, prev_gamma)

    def disable_adapter(self) -> contextlib.AbstractContextManager[MaskHandle]:
        """PEFT-style: the base model inside the block."""
        return self.persona(None)

    def detach(self) -> None:
        """Restore the base weights and drop the pristine copies and the cache."""
        self._restore_all()
        self._pristine.clear()
        self._cache = _PackedCache(self._cache.limit)
        self.active, self.gamma = None, 0.0

    def __repr__(self) -> str:
        return f"MaskHandle(active={self.active!r}, gamma={self.gamma}, personas={self.personas})"


def _match(model: nn.Module, bundle: Bundle, check_weights: bool) -> dict[str, nn.Linear]:
    """The model's modules named by the bundle, after checking names and shapes match."""
    named = dict(model.named_modules())
    out = {}
    for name, info in bundle.modules.items():
        mod = named.get(name)
        if mod is None:
            raise MaskstoreError(
                f"the model has no module {name!r} that the bundle masks: wrong model"
            )
        if not isinstance(mod, nn.Linear):
            raise MaskstoreError(f"{name} is a {type(mod).__name__} in the model, not nn.Linear")
        if (mod.out_features, mod.in_features) != (info.out_features, info.in_features):
            raise MaskstoreError(
                f"{name} is {(mod.out_features, mod.in_features)} in the model but "
                f"{(info.out_features, info.in_features)} in the bundle: wrong model"
            )
        out[name] = mod
    want = bundle.fingerprint.get("weights_xxh3")
    if check_weights:
        if not want:
            raise MaskstoreError("the bundle records no weights hash: attach without check_weights")
        if weights_hash(out) != want:
            raise MaskstoreError("the model's weights differ from those the bundle was built on")
    return out


def attach(
    model: nn.Module,
    bundle: Bundle | str,
    cache_bytes: int = 512 << 20,
    check_weights: bool = False,
    untie: bool = False,
) -> MaskHandle:
    """Attach a bundle's personas to ``model`` (reads metadata only).

    Args:
        model: any module whose ``nn.Linear`` names and shapes match the bundle's fingerprint
            (the bundle may mask only some of them).
        bundle: a :class:`Bundle` or a path.
        cache_bytes: bound of the packed-mask cache.
        check_weights: also compare the weights hash recorded at build time.
        untie: give a masked module whose weight another module shares (a tied ``lm_head``)
            its own copy; without it such a bundle is refused.
    Returns:
        A :class:`MaskHandle` with the base model active.
    """
    if not isinstance(bundle, Bundle):
        bundle = open_bundle(bundle)
    return MaskHandle(model, bundle, cache_bytes, check_weights, untie)
