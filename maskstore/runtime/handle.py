"""Persona masks in a live model: attach a bundle, switch persona in place, never reload.

Switching writes ``W = W0 * G`` in place with ``G = M + gamma (1 - M)``, so the ``Parameter``
objects never change and their storage stays put from the first switch on (hooks, optimizers and
compiled graphs keep working), and the forward pass does no extra work.

Memory grows with what can be lost: each masked ``nn.Linear`` keeps the base values of only the
positions some persona used so far prunes (packed positions plus values, optionally on another
device with ``pristine="cpu"``), never a full copy. A switch rewrites only the weights whose gate
changes (``A xor B``), on CPU with a compiled kernel (:mod:`maskstore.runtime._switch`). Masks are read
lazily per module and cached packed, 1 bit a weight, in an LRU bounded by bytes.

On a GPU (any device but the CPU) the kernels are the device backend's
(:mod:`maskstore.runtime.kernels`: Triton, else torch ops) and the masks live in three tiers, as
vLLM keeps LoRA adapters: an LRU of packed masks in device memory (``device_cache_bytes``), the
host LRU behind it (pinned on CUDA), the bundle behind that. A switch is then one pass per module
from a pristine copy of its base weight on the device (``base * G``, no host copies, no host
syncs); ``pristine="cpu"`` keeps only the pruned positions' base values instead, in host memory.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import MaskstoreError
from ..modules import check_untied, weights_hash
from ..store.bits import packed_width, pad_mask, unpack, unpack_torch
from ..store.format import Bundle
from ..store.opener import open_bundle
from . import kernels


@dataclass
class CacheInfo:
    entries: int
    bytes: int
    limit: int
    hits: int
    misses: int
    evictions: int = 0


class _PackedCache:
    """LRU of packed masks ``(persona, module) -> uint8 tensor``, bounded by bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._d: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.bytes = self.hits = self.misses = self.evictions = 0

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._d

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
        self.bytes += t.numel()  # uint8: a byte an element
        while self.bytes > self.limit and len(self._d) > 1:
            _, old = self._d.popitem(last=False)
            self.bytes -= old.numel()
            self.evictions += 1

    def info(self) -> CacheInfo:
        return CacheInfo(len(self._d), self.bytes, self.limit, self.hits, self.misses,
                         self.evictions)  # fmt: skip


@dataclass
class _Saved:
    """What a masked module keeps to restore its base weight: the base values of the stored
    positions (every position a persona used so far prunes), packed like a mask, in row-major
    order with each row's offset into ``vals``."""

    stored: np.ndarray  # (out, ceil(in/8)) uint8
    off: np.ndarray  # (out + 1,) int64
    vals: torch.Tensor  # (n_stored,) in the weight's dtype, on the pristine device

    @property
    def nbytes(self) -> int:
        return self.stored.nbytes + self.off.nbytes + self.vals.numel() * self.vals.element_size()

    def raw(self) -> np.ndarray:
        """``vals`` as numpy (bfloat16 as its bits), made once."""
        if getattr(self, "_vals_np", None) is None:
            self._vals_np = _raw(self.vals)
        return self._vals_np


@dataclass
class _FileBase:
    """A masked module whose base values are all in one dense tensor: the checkpoint the model
    was loaded from, its ``(out, in)`` weight memory-mapped read-only (checked equal to the
    live weight before the first write; no RAM of its own: the pages are the page cache's), or
    with a device backend a pristine copy of the weight on its device (``owned``)."""

    base: torch.Tensor
    owned: bool = False

    @property
    def nbytes(self) -> int:
        return self.base.numel() * self.base.element_size() if self.owned else 0

    def raw(self) -> np.ndarray:
        if getattr(self, "_raw", None) is None:
            self._raw = _raw(self.base)
        return self._raw


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
_DEVICE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the device kernels' dtypes
_WEIGHTED = object()  # a module's gate is a weighted combination (not one packed mask)


class MaskHandle:
    """Personas of a bundle attached to a live model. Create with :func:`attach`.

    One live handle per model: a second :func:`attach` to the same model is refused, naming the
    live one, until that one is detached. After :meth:`detach` every switching call raises.

    Threads: ``use``, ``persona``, ``mixed`` and ``detach`` are serialised by the handle's
    re-entrant lock, and a ``with handle.persona(...)`` or ``with handle.mixed(...)`` block
    holds it for the whole block, so forward passes inside a block see that block's persona
    while other threads' switches wait. A forward pass outside any block may race with another
    thread's switch: run concurrent inference inside blocks (or from one thread).
    :meth:`read_masks` takes no lock (it only reads the bundle), so masks can be loaded on
    other threads while a block runs.
    """

    def __init__(
        self,
        model: nn.Module,
        bundle: Bundle,
        cache_bytes: int = 512 << 20,
        check_weights: bool | None = None,
        untie: bool = False,
        pristine: str | torch.device | None = None,
        base: str | os.PathLike = "auto",
        device_cache_bytes: int = 2 << 30,
    ) -> None:
        """See :func:`attach`."""
        if not isinstance(model, nn.Module):
            raise MaskstoreError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
        for what, v in (("cache_bytes", cache_bytes), ("device_cache_bytes", device_cache_bytes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise MaskstoreError(f"`{what}` must be an integer >= 0, got {v!r}")
        self.model = model
        self.bundle = bundle
        _claim(model, None)  # refuse a second live handle before the weights check
        self.modules = _match(model, bundle, check_weights)
        check_untied(model, self.modules, untie)
        first = next(iter(self.modules.values()), None)
        self._backend = kernels.select(first.weight.device if first is not None else "cpu")
        self.pristine_device = None if pristine is None else torch.device(pristine)
        self._checkpoint = _checkpoint_of(model, base) if pristine is None else None
        self._saved: dict[str, _Saved | _FileBase] = {}
        self._gate: dict[str, np.ndarray | None] = {}  # each module's current packed mask
        self._covered: set[tuple[str, str]] = set()  # (persona, module) whose pruned are stored
        self._cache = _PackedCache(cache_bytes)
        self._dcache = _PackedCache(device_cache_bytes)  # packed masks on the weights' device
        self._gate_dev: dict[str, tuple[np.ndarray, torch.Tensor]] = {}  # _gate's device copy
        self._cache_lock = threading.Lock()
        self._lock = threading.RLock()
        self._mixing = False
        self._mix: _Mix | None = None  # the mixed() block's state, inside one
        self._detached = False
        self.active: str | dict[str, float] | None = None
        self.gamma: float = 0.0
        _claim(model, self)

    @property
    def lock(self) -> threading.RLock:
        """The re-entrant lock that serialises switching (hold it to keep a persona on)."""
        return self._lock

    @property
    def detached(self) -> bool:
        return self._detached

    @property
    def backend(self) -> str:
        """The kernels that switch and mix this model's weights: ``numba`` (CPU), ``triton``
        or ``torch`` (see :mod:`maskstore.runtime.kernels`; ``MASKSTORE_BACKEND`` forces one)."""
        return self._backend

    @property
    def fused_mixing(self) -> bool:
        """Whether :meth:`mixed` blocks gate weights as they read them, with no weight copies:
        the fused CPU kernel (every masked weight on the CPU, contiguous, float32 or bfloat16),
        or a device backend's masked segmented product (contiguous float32, float16 or
        bfloat16 weights). Otherwise they make a gated weight copy per persona."""
        return _Mix.fusable(self.modules) or _Mix.device_fusable(self.modules, self._backend)

    @torch.no_grad()
    def mixing_speedup(self, rows: int = 16, personas: int = 2, repeats: int = 3) -> float:
        """How much faster a decode step of ``rows`` rows over ``personas`` personas runs as one
        mixed step than in place, one step per persona of ``rows / personas`` rows each (what
        one-persona batches do), measured on this machine: whole forward passes of the model
        (one token a row), the mixed one with random masks. Above 1, mixing wins here.
        Switches between the in-place steps are not counted (they would only favour mixing).
        Fastest of ``repeats`` each, after a warm-up (which compiles the kernel). Touches no
        weight; the handle's lock is held for one timed step at a time (a mixed step swaps the
        Linears' forwards), so other threads may switch and decode between them."""
        if rows < personas or personas < 2:
            raise MaskstoreError("mixing_speedup needs rows >= personas >= 2")
        import time

        gen, shapes = np.random.default_rng(0), {}
        mix = _Mix(self.modules, 0.0, self._backend)
        for p in range(personas):
            masks = {}
            for name, mod in self.modules.items():  # one random mask a shape and persona
                out, cols = mod.weight.shape
                if (out, cols, p) not in shapes:
                    width = packed_width(cols)
                    shapes[out, cols, p] = gen.integers(0, 256, (out, width), dtype=np.uint8)
                masks[name] = shapes[out, cols, p]
            mix.add(str(p), masks)
        mix.group([str(r % personas) for r in range(rows)])
        device = next(self.model.parameters()).device
        vocab = int(getattr(self.model.config, "vocab_size", 2))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (rows, 1), generator=g).to(device)
        parts = [ids[p::personas].contiguous() for p in range(personas)]

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        def in_place() -> None:
            for part in parts:
                self.model(input_ids=part, use_cache=False)

        def mixed() -> None:
            with self._forwards_through(mix):
                self.model(input_ids=ids, use_cache=False)

        def fastest(step) -> float:
            best = float("inf")
            for _ in range(repeats + 1):  # the first is the warm-up
                with self._lock:  # no switch or mixed block of another thread meanwhile
                    self._live("mixing_speedup")
                    t0 = time.perf_counter()
                    step()
                    sync()
                    best = min(best, time.perf_counter() - t0)
            return best

        return fastest(in_place) / fastest(mixed)

    @contextlib.contextmanager
    def _forwards_through(self, mix: _Mix) -> Iterator[None]:
        """Inside the block every masked Linear forwards through ``mix``; its own after."""
        for name, mod in self.modules.items():
            mod.forward = mix.forward(name, mod)
        try:
            yield
        finally:
            for mod in self.modules.values():
                mod.__dict__.pop("forward", None)

    def _live(self, what: str) -> None:
        if self._detached:
            raise MaskstoreError(f"{what}: this handle was detached; attach the bundle again")
        if self._mixing:
            raise MaskstoreError(
                f"{what} inside a mixed() block: leave the block first (blocks do not nest)"
            )

    # ---- introspection
    @property
    def personas(self) -> list[str]:
        return self.bundle.personas

    def cache_info(self) -> CacheInfo:
        return self._cache.info()

    def device_cache_info(self) -> CacheInfo:
        """The LRU of packed masks on the weights' device (device backends only)."""
        return self._dcache.info()

    def memory_overhead(self) -> int:
        """Bytes held beyond the model: the packed-mask caches (host and device), plus, for
        modules whose base values are not read back from the model's checkpoint file, the
        base values of the positions some persona used so far prunes (with their packed
        positions), or a device backend's pristine copy of the weight."""
        return sum(v.nbytes for v in self._saved.values()) + self._cache.bytes + self._dcache.bytes

    def base_weight(self, name: str) -> torch.Tensor:
        """Module ``name``'s base weight (a new tensor when a persona is active)."""
        if name not in self.modules:
            raise MaskstoreError(f"{name!r} is not a masked module of this model")
        w = self.modules[name].weight.detach()
        saved = self._saved.get(name)
        if saved is None or self._gate.get(name) is None:  # the module holds its base weight
            return w
        if isinstance(saved, _FileBase):
            self._check_checkpoint()
            return saved.base.to(w.device, copy=True)
        base = w.clone()
        where = unpack_torch(torch.from_numpy(saved.stored), w.shape[1]).to(w.device)
        base[where] = saved.vals.to(w.device)
        return base

    # ---- switching
    def prepare(self) -> None:
        """Give every masked weight its own storage now (a copy when it is memory-mapped from
        the checkpoint) and load the compiled switching kernels, so that the first switch costs
        what later ones do; a server calls this at start-up instead of making its first
        request wait."""
        with self._lock:
            self._live("prepare")
            with torch.no_grad():
                self._privatize([n for n in self.modules if n not in self._saved])
            if self._backend == "numba":
                from . import _switch

                _switch.warm()  # and load the compiled kernels now

    def read_masks(self, persona: str) -> dict[str, np.ndarray]:
        """Every packed mask of ``persona`` for the attached modules, read and verified
        (``(out, ceil(in/8))`` uint8 each). Takes no switching lock: call it from a loader
        thread, then pass the result to :meth:`use` or :meth:`mixed` as ``masks=``.

        Raises:
            MaskstoreError: an unknown persona, a blend (no mask of its own), damage.
        """
        if self._detached:
            raise MaskstoreError("read_masks: this handle was detached; attach the bundle again")
        self._check_known(persona)
        if self._blend_weights(persona) is not None:
            raise MaskstoreError(f"{persona!r} is a blend (a soft gate), not a mask")
        if getattr(self.bundle, "is_recipe", None) and self.bundle.is_recipe(persona):
            with self._lock:  # recomputed from the base weights: no switch may run meanwhile
                return self._load(persona)
        return self._load(persona)

    def _check_known(self, persona: str) -> None:
        if persona not in self.bundle.personas:
            raise MaskstoreError(
                f"unknown persona {persona!r}; known: {', '.join(self.bundle.personas) or 'none'}"
            )

    def _load(self, persona: str) -> dict[str, np.ndarray]:
        """Every packed mask of ``persona`` for the attached modules (verified; may raise)."""
        if getattr(self.bundle, "is_recipe", None) and self.bundle.is_recipe(persona):
            # a recipe persona: recompute its masks from this model's base weights (digests
            # are checked against the recorded ones)
            from ..build import recompute_recipe

            packed = self.bundle.recipe_masks(persona, self.base_weight,
                                              recompute=recompute_recipe)  # fmt: skip
            return {n: p for n, p in packed.items() if n in self.modules}
        masks = {}
        for name in self.bundle.persona_modules(persona):
            if name not in self.modules:
                continue
            with self._cache_lock:
                t = self._cache.get((persona, name))
            if t is None:
                t = torch.from_numpy(self.bundle.read_packed(persona, name))
            masks[name] = t.numpy()
        return masks

    def use(
        self,
        persona: str | Mapping[str, float] | None,
        gamma: float = 0.0,
        masks: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Switch to ``persona`` (None: the base model) with soft gate ``gamma`` in [0, 1].

        A mapping ``{"a": 0.7, "b": 0.3}`` (weights summing to 1) applies the weighted soft
        combination ``G = sum_p w_p G_p`` (as PEFT's ``add_weighted_adapter``, at switch time).

        Only the weights whose gate changes are written (between related personas, a few
        percent of them). The masks are all read and verified before any weight changes: on an
        error the model is left exactly as it was. ``masks``: the persona's masks as
        :meth:`read_masks` returned them (else they are read here).
        """
        with self._lock:
            self._live("use")
            self._use(persona, gamma, masks)
            _mark(self)

    set_adapter = use  # PEFT-style name

    def _use(
        self,
        persona: str | Mapping[str, float] | None,
        gamma: float,
        masks: Mapping[str, np.ndarray] | None,
    ) -> None:
        if not (isinstance(gamma, int | float) and 0.0 <= gamma <= 1.0):
            raise MaskstoreError(f"gamma must be in [0, 1], got {gamma!r}")
        if isinstance(persona, Mapping):
            self._use_weighted(dict(persona), float(gamma))
            return
        if persona is not None:
            self._check_known(persona)
        if persona is not None and (weights := self._blend_weights(persona)) is not None:
            self._use_weighted(weights, float(gamma))
            self.active = persona
            return
        if persona is None:
            masks = {}
        elif masks is None:
            masks = self._load(persona)
        else:
            masks = {n: m for n, m in masks.items() if n in self.modules}
        gamma = 0.0 if persona is None else float(gamma)
        self._check_checkpoint()
        try:
            with torch.no_grad():
                # every first write's copy at once (gated on the way where it can be)
                new = [n for n in masks if n in self.modules and n not in self._saved]
                done = self._privatize(new, masks, _rounded(gamma, torch.float32))
                jobs: list[tuple] = []
                for name, mod in self.modules.items():
                    if name not in done:
                        self._switch(name, mod, masks.get(name), gamma, persona or "", jobs)
                if jobs:
                    from . import _switch

                    _switch.run(jobs)
                elif done and self._backend == "numba":
                    _warm_switching()  # the next switch will want the compiled kernels
        except BaseException:
            self._restore_all()
            raise
        if persona is not None:
            pin = self._backend != "numba" and any(  # pinned: copied to the GPU without waiting
                m.weight.device.type == "cuda" for m in self.modules.values()
            )
            with self._cache_lock:
                for name, t in masks.items():
                    if (persona, name) not in self._cache:
                        h = torch.from_numpy(t)
                        self._cache.put((persona, name), h.pin_memory() if pin else h)
        self.active, self.gamma = persona, gamma

    def _check_checkpoint(self) -> None:
        """Refuse to switch when the checkpoint that base values are read back from changed
        on disk since attach (before any weight is touched)."""
        if self._checkpoint is not None and any(
            isinstance(v, _FileBase) for v in self._saved.values()
        ):
            self._checkpoint.check_unchanged()

    def _blend_weights(self, persona: str) -> dict[str, float] | None:
        """The weights of a stored blend (:func:`maskstore.compare.algebra.blend`), None for a mask."""
        meta = self.bundle.persona(persona)
        if meta["method"] != "blend":
            return None
        weights = meta["params"].get("weights")
        if not isinstance(weights, dict):
            raise MaskstoreError(f"blend {persona!r} records no weights: rebuild it")
        # a blend applies exactly the operands it recorded: one replaced since is refused
        recorded = {o.get("name"): o.get("digest") for o in meta["provenance"].get("operands", [])}
        for p in weights:
            now = self.bundle.persona(p)["digest"] if p in self.bundle.personas else None
            if recorded.get(p) is None or now != recorded[p]:
                raise MaskstoreError(
                    f"blend {persona!r} was made from another {p!r} than this bundle holds "
                    f"(operand replaced or removed): blend again (maskstore blend ... --as "
                    f"{persona} --force)"
                )
        return dict(weights)

    def _use_weighted(self, weights: dict[str, float], gamma: float) -> None:
        """``W = W0 * sum_p w_p G_p`` at every position some of the personas prune."""
        from ..compare.algebra import check_blend_weights

        check_blend_weights(self.bundle, weights)
        masks = {p: self._load(p) for p in weights}
        self._use(None, 0.0, None)
        try:
            with torch.no_grad():
                # every first write's copy at once (one look at the process's maps)
                self._privatize([n for n in self.modules if n not in self._saved
                                 and any(n in m for m in masks.values())])  # fmt: skip
                for name, mod in self.modules.items():
                    w = mod.weight
                    saved = self._saved.get(name)
                    for p in weights:
                        if name in masks[p]:
                            saved = self._cover(name, mod, masks[p][name], p)
                    width = w.shape[1]
                    if isinstance(saved, _FileBase):  # where any operand prunes
                        where = torch.zeros(w.shape, dtype=torch.bool)
                        for p in weights:
                            if name in masks[p]:
                                where |= ~unpack_torch(torch.from_numpy(masks[p][name]), width)
                        where = where.to(w.device)
                        vals = saved.base.to(w.device)[where]
                    elif saved is None or not saved.vals.numel():
                        continue
                    else:
                        where = unpack_torch(torch.from_numpy(saved.stored), width).to(w.device)
                        vals = saved.vals.to(w.device)
                    if not vals.numel():
                        continue
                    gate = torch.zeros(vals.numel(), dtype=torch.float32, device=w.device)
                    for p, wt in weights.items():
                        if name in masks[p]:
                            keep = unpack_torch(torch.from_numpy(masks[p][name]), width)
                            g = torch.where(keep.to(w.device)[where], 1.0, gamma)
                        else:
                            g = torch.ones_like(gate)
                        gate += float(wt) * g
                    w[where] = (vals.float() * gate).to(w.dtype)
                    self._gate[name] = _WEIGHTED
        except BaseException:
            self._restore_all()
            raise
        self.active, self.gamma = dict(weights), gamma

    def _switch(
        self,
        name: str,
        mod: nn.Linear,
        new: np.ndarray | None,
        gamma: float,
        key: str,
        jobs: list[tuple],
    ) -> None:
        """Module ``name`` from its current gate to ``new`` (None: all kept) with ``gamma``;
        ``key`` names the persona whose gate ``new`` is. Compiled switches are appended to
        ``jobs`` (run together after the loop); others happen here."""
        cur = self._gate.get(name)
        if cur is _WEIGHTED:  # back to the base values first (the gate was not binary)
            self._restore_generic(mod.weight, self._saved[name])
            self._gate[name] = cur = None
        if cur is None and new is None:
            return  # base to base
        w = mod.weight
        saved = self._cover(name, mod, new, key)
        # positions to rewrite: where the kept bit changes, or, when gamma changes, every
        # position either gate prunes
        same_gamma = cur is None or new is None or self.gamma == gamma
        if isinstance(saved, _FileBase):
            self._switch_file(w, saved, cur, new, gamma, same_gamma, jobs, name, key)
        elif self._fast(w, saved):
            from . import _switch

            jobs.append(
                _switch.job(
                    _raw(w.data),
                    saved.stored,
                    saved.off,
                    saved.raw(),
                    cur,
                    new,
                    _rounded(gamma, w.dtype),
                    same_gamma,
                    w.dtype == torch.bfloat16,
                )
            )
        else:
            where = unpack_torch(torch.from_numpy(saved.stored).to(w.device), w.shape[1])
            vals = saved.vals.to(w.device)
            if new is None:
                w[where] = vals
            else:
                keep = unpack_torch(torch.from_numpy(new).to(w.device), w.shape[1])[where]
                w[where] = vals * torch.where(keep, 1.0, gamma).to(w.dtype)
        self._gate[name] = new
        held = self._gate_dev.get(name)
        if held is not None and held[0] is not new:  # a device copy of a gate no longer held
            del self._gate_dev[name]

    def _on_device(
        self, name: str, persona: str | None, packed: np.ndarray, device: torch.device
    ) -> torch.Tensor:
        """``packed`` (module ``name``'s mask; ``persona``'s when given, else the gate the
        module holds now) on ``device``: from the device LRU, else copied there (from pinned
        host memory when the host cache pinned it, without waiting) and cached. The module's
        current gate stays on the device too, so a switch away from it copies nothing."""
        held = self._gate_dev.get(name)
        if held is not None and held[0] is packed:
            return held[1]
        t = self._device_mask(persona, name, packed, device)
        self._gate_dev[name] = (packed, t)
        return t

    def _device_mask(
        self, persona: str | None, name: str, packed: np.ndarray, device: torch.device
    ) -> torch.Tensor:
        """``persona``'s packed mask of module ``name`` on ``device``, through the device LRU."""
        with self._cache_lock:
            t = None if not persona else self._dcache.get((persona, name))
            host = None if not persona else self._cache.get((persona, name))
        if t is not None and t.shape == packed.shape:
            return t
        if host is None or host.numpy().ctypes.data != packed.ctypes.data:
            host = torch.from_numpy(np.ascontiguousarray(packed))
        t = host.to(device, non_blocking=host.is_pinned())
        if persona:
            with self._cache_lock:
                self._dcache.put((persona, name), t)
        return t

    def _switch_file(
        self,
        w: torch.Tensor,
        saved: _FileBase,
        cur: np.ndarray | None,
        new: np.ndarray | None,
        gamma: float,
        same_gamma: bool,
        jobs: list[tuple],
        name: str = "",
        key: str = "",
    ) -> None:
        """:meth:`_switch` for a module whose base values are one dense tensor (its checkpoint,
        or a device backend's pristine copy)."""
        if (
            self._backend != "numba"
            and w.dtype in _DEVICE_DTYPES
            and w.is_contiguous()
            and saved.base.device == w.device
            and saved.base.is_contiguous()
        ):
            kernels.get(self._backend).gate(
                w.data,
                saved.base,
                None if cur is None else self._on_device(name, None, cur, w.device),
                None if new is None else self._on_device(name, key, new, w.device),
                _rounded(gamma, w.dtype),
                same_gamma,
            )
            return
        if self._backend == "numba" and w.dtype in _BITS and w.is_contiguous():
            from . import _switch

            jobs.append(
                _switch.job_file(
                    _raw(w.data),
                    saved.raw(),
                    cur,
                    new,
                    pad_mask(w.shape[1]),
                    _rounded(gamma, w.dtype),
                    same_gamma,
                    w.dtype == torch.bfloat16,
                )  # fmt: skip
            )
            return
        width = w.shape[1]
        c = None if cur is None else unpack_torch(torch.from_numpy(cur), width)
        n = None if new is None else unpack_torch(torch.from_numpy(new), width)
        if c is None or n is None:
            where = ~(c if n is None else n)
        else:
            where = (c ^ n) if same_gamma else ~(c & n)
        vals = saved.base[where]
        if n is None:
            w[where] = vals
        else:
            w[where] = vals * torch.where(n[where], 1.0, gamma).to(w.dtype)

    def _cover(
        self, name: str, mod: nn.Linear, new: np.ndarray | None, key: str
    ) -> _Saved | _FileBase:
        """Module ``name``'s base values: read back from the checkpoint file, or stored,
        grown to every position ``new`` prunes."""
        w = mod.weight
        if name not in self._saved:
            self._privatize([name])
        saved = self._saved[name]
        if isinstance(saved, _FileBase):
            return saved
        if new is not None and (key, name) not in self._covered:
            # every position the new gate prunes must have its base value kept
            extra = np.bitwise_and(np.invert(new), pad_mask(w.shape[1]))
            np.bitwise_and(extra, np.invert(saved.stored), out=extra)
            if extra.any():
                saved = self._grow(w, saved, extra)
            self._covered.add((key, name))
        self._saved[name] = saved
        return saved

    def _privatize(
        self,
        names: list[str],
        masks: Mapping[str, np.ndarray] | None = None,
        gamma: float = 0.0,
    ) -> set[str]:
        """Give modules ``names`` their own weight memory before the first write, and pick
        where each one's base values come from: the checkpoint, when its file holds exactly the
        live weight, or RAM, stored as personas prune positions.

        A weight that is a never-written map of its checkpoint (how ``from_pretrained`` leaves
        it) and has a mask in ``masks`` is gated on the way: its new memory is written once with
        ``base * gate`` read from the file (returned among the names done). Others are copied
        on plain threads (writing into a private map would fault page by page, about 3x
        slower), compared byte for byte with their checkpoint on the way when they were written
        since loading.
        """
        if not names:
            return set()
        from .. import _threads

        weights = {n: self.modules[n].weight for n in names}
        maps: dict[str, torch.Tensor] = {}
        untouched: set[str] = set()
        if self._checkpoint is not None:
            for n, w in weights.items():
                if w.device.type == "cpu" and w.is_contiguous():
                    t = self._checkpoint.map(f"{n}.weight")
                    if t is not None and t.dtype == w.dtype and t.shape == w.shape:
                        maps[n] = t
            keyed = {f"{n}.weight": weights[n] for n in maps}
            untouched = {k[: -len(".weight")] for k in self._checkpoint.untouched(keyed)}
        gated = {n for n in untouched if masks is not None and n in masks}
        local = [n for n, w in weights.items()
                 if w.device.type == "cpu" and w.is_contiguous() and n not in gated]  # fmt: skip
        fresh = {n: torch.empty_like(weights[n].data) for n in local}
        checks = [maps.get(n) if n not in untouched else None for n in local]
        same = _threads.copy([(_bytes(fresh[n]), _bytes(weights[n].data),
                               None if c is None else _bytes(c))
                              for n, c in zip(local, checks, strict=True)])  # fmt: skip
        same = dict(zip(local, same, strict=True))
        for n in gated:  # one pass from the file: W = W0 * G
            w = weights[n]
            out = torch.empty_like(w.data)
            # gates unpacked a few rows at a time: a whole module's would be fresh memory too
            step = max(1, (1 << 18) // w.shape[1])
            for r in range(0, w.shape[0], step):
                keep = unpack_torch(torch.from_numpy(masks[n][r : r + step]), w.shape[1])
                gate = keep if gamma == 0.0 else torch.where(keep, 1.0, gamma).to(w.dtype)
                torch.mul(maps[n][r : r + step], gate, out=out[r : r + step])
            w.data = out
            self._gate[n] = masks[n]
        for n, w in weights.items():
            saved: _Saved | _FileBase
            pristine = self._backend != "numba" and self.pristine_device is None
            if n not in gated and (n in fresh or not pristine):
                w.data = fresh[n] if n in fresh else w.data.clone()
            if n in gated or (n in maps and same.get(n, False)):
                saved = _FileBase(maps[n])
            elif pristine and _room_for_copy(w):  # a device backend: W0 on the device
                saved = _FileBase(w.data.clone(), owned=True)
            else:
                rows, width = w.shape[0], packed_width(w.shape[1])
                saved = _Saved(
                    np.zeros((rows, width), np.uint8),
                    np.zeros(rows + 1, np.int64),
                    torch.empty(0, dtype=w.dtype, device=self.pristine_device or w.device),
                )
            self._saved[n] = saved
        return gated

    def _restore_generic(self, w: torch.Tensor, saved: _Saved | _FileBase) -> None:
        if isinstance(saved, _FileBase):
            w.copy_(saved.base)
            return
        where = unpack_torch(torch.from_numpy(saved.stored).to(w.device), w.shape[1])
        w[where] = saved.vals.to(w.device)

    def _fast(self, w: torch.Tensor, saved: _Saved) -> bool:
        return (
            w.device.type == "cpu"
            and saved.vals.device.type == "cpu"
            and w.dtype in _BITS
            and w.is_contiguous()
        )

    def _grow(self, w: torch.Tensor, saved: _Saved, extra: np.ndarray) -> _Saved:
        """Store the base values of ``extra`` positions too (they hold base values now)."""
        if self._fast(w, saved):
            from . import _switch

            stored, off, vals = _switch.grow(
                _raw(w.data), saved.stored, saved.off, _raw(saved.vals), extra
            )
            return _Saved(stored, off, torch.from_numpy(vals).view(w.dtype))
        base = w.detach().clone()
        width = w.shape[1]
        if saved.vals.numel():
            base[unpack_torch(torch.from_numpy(saved.stored).to(w.device), width)] = saved.vals.to(
                w.device
            )
        stored = saved.stored | extra
        where = unpack_torch(torch.from_numpy(stored).to(w.device), width)
        counts = torch.from_numpy(unpack(stored, width)).sum(dim=1)
        off = np.zeros(w.shape[0] + 1, np.int64)
        np.cumsum(counts.numpy(), out=off[1:])
        vals = base[where].to(saved.vals.device)
        return _Saved(stored, off, vals)

    def _restore_all(self) -> None:
        """Every module back to its base weight, bit for bit."""
        jobs: list[tuple] = []
        with torch.no_grad():
            for name, mod in self.modules.items():
                if self._gate.get(name) is not None:
                    self._switch(name, mod, None, 0.0, "", jobs)
            if jobs:
                from . import _switch

                _switch.run(jobs)
        self.active, self.gamma = None, 0.0

    @contextlib.contextmanager
    def persona(self, name: str | None, gamma: float = 0.0) -> Iterator[MaskHandle]:
        """Use ``name`` inside the block (holding the lock), then switch back to what was
        active."""
        with self._lock:
            self._live("persona")
            prev, prev_gamma = self.active, self.gamma
            self.use(name, gamma)
            try:
                yield self
            finally:
                if not self._detached:
                    self.use(prev, prev_gamma)

    @contextlib.contextmanager
    def mixed(
        self,
        personas: list[str | None],
        gamma: float = 0.0,
        masks: Mapping[str, Mapping[str, np.ndarray]] | None = None,
        restore: bool = True,
    ) -> Iterator[MaskHandle]:
        """One forward pass in which row ``i`` of every batch uses ``personas[i]`` (None: the
        base model), PEFT's ``adapter_names=``: inside the block, ``model(...)`` and
        ``model.generate(...)`` group each masked Linear's rows by persona and apply that
        persona's gated weight to them. Each distinct persona's gated weights are made once
        for the block (memory: one weight copy per persona besides the base); the model is
        at its base weights inside and returns to what was active after.

        The block holds the handle's lock; blocks do not nest, and ``use`` inside one raises.
        :meth:`regroup` changes which row uses which persona (rows leaving or joining a
        batch, personas new to the block included). ``masks``: preloaded masks by persona
        (:meth:`read_masks`). ``restore=False`` leaves the model at its base weights after
        the block (a caller that switches next anyway saves the switch back).
        """
        if not personas or not all(p is None or isinstance(p, str) for p in personas):
            raise MaskstoreError(
                "mixed() needs a list with one persona name (or None) per row of the batch"
            )
        with self._lock:
            self._live("mixed")
            for p in dict.fromkeys(p for p in personas if p is not None):
                self._check_mixable(p)  # before any switch
            prev, prev_gamma = self.active, self.gamma
            self.use(None)
            self._mix = _Mix(self.modules, gamma, self._backend)
            self._mixing = True
            try:
                self.regroup(personas, masks)
                with self._forwards_through(self._mix):
                    yield self
            finally:
                self._mixing = False
                self._mix = None
                if not self._detached and restore:
                    self.use(prev, prev_gamma)

    def regroup(
        self,
        personas: list[str | None],
        masks: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        """Inside a :meth:`mixed` block: row ``i`` now uses ``personas[i]`` (None: the base
        model), e.g. after finished rows left the batch or new ones joined it. A persona new
        to the block is added (``masks``: its preloaded masks, else they are read now)."""
        if not personas or not all(p is None or isinstance(p, str) for p in personas):
            raise MaskstoreError("regroup() needs one persona name (or None) per row")
        with self._lock:
            if not self._mixing:
                raise MaskstoreError("regroup() works inside a mixed() block only")
            new = [p for p in dict.fromkeys(personas) if p is not None and p not in self._mix]
            for p in new:
                self._check_mixable(p)
            given = masks or {}
            for p in new:
                self._mix.add(p, given[p] if p in given else self._load(p), self._device_mask)
            self._mix.group(personas)

    def _check_mixable(self, persona: str) -> None:
        self._check_known(persona)
        if self._blend_weights(persona) is not None:
            raise MaskstoreError(
                f"{persona!r} is a blend (a soft gate): mixed batches take mask personas only"
            )

    def disable_adapter(self) -> contextlib.AbstractContextManager[MaskHandle]:
        """PEFT-style: the base model inside the block."""
        return self.persona(None)

    def detach(self) -> None:
        """Restore the base weights and drop the stored values and the cache; the handle is
        spent after (every switching call raises) and the model can be attached again."""
        with self._lock:
            if self._detached:
                return
            if self._mixing:
                raise MaskstoreError("detach() inside a mixed() block: leave the block first")
            self._check_checkpoint()
            self._restore_all()
            self._saved.clear()
            self._gate.clear()
            self._gate_dev.clear()
            self._covered.clear()
            with self._cache_lock:
                self._cache = _PackedCache(self._cache.limit)
                self._dcache = _PackedCache(self._dcache.limit)
            self._detached = True
            _mark(self)
            _release(self.model, self)

    def __repr__(self) -> str:
        state = "detached, " if self._detached else ""
        return (
            f"MaskHandle({state}active={self.active!r}, gamma={self.gamma}, "
            f"personas={self.personas})"
        )


# One live handle per model, and the persona each model's weights hold (so a later attach can
# say why the weights check fails): kept beside the models, weakly, never on them (a model
# stays picklable and deep-copyable).
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> weakref(handle)
_MASKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> persona label


def _claim(model: nn.Module, handle: MaskHandle | None) -> None:
    """Make ``handle`` the model's handle (None: only check that no other one is live)."""
    ref = _OWNERS.get(model)
    live = ref() if ref is not None else None
    if live is not None and live is not handle and not live.detached:
        raise MaskstoreError(
            f"this model already has a live handle ({live!r}): use it, or call its detach() "
            "before attaching again"
        )
    if handle is not None:
        _OWNERS[model] = weakref.ref(handle)


def _release(model: nn.Module, handle: MaskHandle) -> None:
    ref = _OWNERS.get(model)
    if ref is not None and ref() is handle:
        del _OWNERS[model]


def _mark(handle: MaskHandle) -> None:
    """Record which persona the model's weights hold (None: the base weights)."""
    active = None if handle.detached else handle.active
    label = None if active is None else (active if isinstance(active, str) else "a blend")
    if label is None:
        _MASKED.pop(handle.model, None)
    else:
        _MASKED[handle.model] = label


class _Mix:
    """A :meth:`MaskHandle.mixed` block: its personas' masks, which rows use which persona, and
    each masked Linear's forward over them. ``fused`` (CPU, float32 or bfloat16 weights): the
    kernel of :mod:`._mixed` gates each weight from the packed masks as it reads it; ``device``
    (a device backend): its masked segmented product over a stack of the personas' packed masks
    on the weights' device (rows sorted by persona, put back after); else each persona's gated
    weights are made once, when it joins the block."""

    def __init__(self, modules: dict[str, nn.Linear], gamma: float, backend: str = "numba") -> None:
        self.modules, self.gamma = modules, float(gamma)
        self.fused = backend == "numba" and self.fusable(modules)
        self.device = kernels.get(backend) if self.device_fusable(modules, backend) else None
        self.stacks: dict[str, torch.Tensor] = {}  # module -> (slots, out, ceil(in/8)) uint8
        self._idx: dict[int, torch.Tensor] = {}  # tokens per row -> sorted row order, on device
        self.kernel = None
        if self.fused:
            from . import _mixed

            self.kernel = _mixed
            self.lists = {n: _mixed.mask_list([]) for n in modules}  # module -> packed masks
        self.index: dict[str, dict[str, int]] = {n: {} for n in modules}  # -> persona -> slot
        self.gated: dict[str, dict] = {n: {} for n in modules}  # copies: module -> persona -> W*G
        self.personas: set[str] = set()
        self.batch = 0
        self.rows: list[tuple[str | None, torch.Tensor]] = []
        self.order = self.start = np.zeros(0, np.int64)
        self.sel: dict[str, np.ndarray] = {}

    @staticmethod
    def fusable(modules: dict[str, nn.Linear]) -> bool:
        return all(
            m.weight.device.type == "cpu" and m.weight.dtype in (torch.float32, torch.bfloat16)
            and m.weight.is_contiguous() for m in modules.values()
        )  # fmt: skip

    @staticmethod
    def device_fusable(modules: dict[str, nn.Linear], backend: str) -> bool:
        return backend != "numba" and all(
            m.weight.dtype in _DEVICE_DTYPES and m.weight.is_contiguous() for m in modules.values()
        )

    def __contains__(self, persona: str) -> bool:
        return persona in self.personas

    @torch.no_grad()
    def add(self, persona: str, masks: Mapping[str, np.ndarray], upload=None) -> None:
        """``persona`` joins the block; ``upload(persona, module, packed, device)`` brings a
        packed mask to the device (the handle's device LRU)."""
        for name, mod in self.modules.items():
            if name not in masks:
                continue
            if self.fused:
                self.index[name][persona] = len(self.lists[name])
                self.lists[name].append(np.ascontiguousarray(masks[name], dtype=np.uint8))
            elif self.device is not None:
                w = mod.weight
                packed = np.ascontiguousarray(masks[name], dtype=np.uint8)
                t = (upload(persona, name, packed, w.device) if upload is not None
                     else torch.from_numpy(packed).to(w.device))[None]  # fmt: skip
                old = self.stacks.get(name)
                self.index[name][persona] = 0 if old is None else old.shape[0]
                self.stacks[name] = t if old is None else torch.cat([old, t])
            else:
                w = mod.weight.detach()
                keep = unpack_torch(torch.from_numpy(masks[name]), w.shape[1])
                gate = torch.where(keep.to(w.device), 1.0, self.gamma).to(w.dtype)
                self.gated[name][persona] = torch.mul(w, gate)
        self.personas.add(persona)

    def group(self, personas: list[str | None]) -> None:
        groups = list(dict.fromkeys(personas))
        self.batch = len(personas)
        self.rows = [
            (p, torch.tensor([i for i, q in enumerate(personas) if q == p], dtype=torch.long))
            for p in groups
        ]
        self.order = np.array([i for _, idx in self.rows for i in idx.tolist()], np.int64)
        self.start = np.cumsum([0] + [len(idx) for _, idx in self.rows], dtype=np.int64)
        self._idx = {}
        self.sel = {
            name: np.array([-1 if p is None else slots.get(p, -1) for p in groups], np.int64)
            for name, slots in self.index.items()
        }

    def forward(self, name: str, mod: nn.Linear):
        """``mod``'s forward inside the block."""
        weight, bias = mod.weight, mod.bias

        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] != self.batch:
                raise MaskstoreError(
                    f"mixed() was given {self.batch} personas but the batch has {x.shape[0]} rows"
                )
            if self.fused and x.device.type == "cpu":
                return self._fused(name, mod, x)
            if self.device is not None:
                return self._segmented(name, mod, x)
            gated = self.gated[name]
            if len(self.rows) == 1:
                return nn.functional.linear(x, gated.get(self.rows[0][0], weight), bias)
            out = x.new_empty((*x.shape[:-1], mod.out_features))
            for p, idx in self.rows:
                idx = idx.to(x.device)
                out[idx] = nn.functional.linear(x[idx], gated.get(p, weight), bias)
            return out

        return forward

    def _segmented(self, name: str, mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, *tokens, in) -> rows sorted by persona -> the device backend's sgmv
        per = x[0].numel() // x.shape[-1]
        w = mod.weight.detach()
        idx = self._idx.get(per)
        if idx is None:
            order = self.order if per == 1 else (self.order[:, None] * per + np.arange(per))
            idx = self._idx[per] = torch.from_numpy(order.reshape(-1)).to(x.device)
        stack = self.stacks.get(name)
        if stack is None:
            stack = torch.zeros((0, *w.shape[:1], (w.shape[1] + 7) // 8), dtype=torch.uint8,
                                device=w.device)  # fmt: skip
        flat = x.detach().reshape(-1, x.shape[-1]).index_select(0, idx).to(w.dtype)
        ys = self.device.sgmv(flat, w, stack, _rounded(self.gamma, w.dtype),
                              (self.start * per).tolist(), self.sel[name].tolist())  # fmt: skip
        y = torch.empty_like(ys).index_copy_(0, idx, ys)
        y = y.reshape(*x.shape[:-1], mod.out_features)
        if mod.bias is not None:
            y = y + mod.bias.detach()
        return y.to(x.dtype)

    def _fused(self, name: str, mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, *tokens, in) -> (batch * tokens, in); a batch row's tokens are its rows
        per = x[0].numel() // x.shape[-1]
        flat = x.detach().reshape(-1, x.shape[-1]).float().contiguous().numpy()
        w = mod.weight.detach()
        raw = w.numpy() if w.dtype == torch.float32 else w.view(torch.uint16).numpy()
        order, start = self.order, self.start
        if per > 1:
            order = (order[:, None] * per + np.arange(per)).reshape(-1)
            start = start * per
        out = self.kernel.linear(flat, raw, self.lists[name], self.gamma, self.sel[name],
                                 order, start)  # fmt: skip
        y = torch.from_numpy(out).reshape(*x.shape[:-1], mod.out_features)
        if mod.bias is not None:
            y = y + mod.bias.detach().float()
        return y.to(x.dtype)


_WARMING = threading.Lock()


def _warm_switching() -> None:
    """Import and load the compiled switching kernels on a background thread, once a process
    (a first switch gated from the checkpoint needs none; the next switch will)."""
    import sys

    if "maskstore.runtime._switch" in sys.modules or not _WARMING.acquire(blocking=False):
        return

    def warm() -> None:
        try:
            from . import _switch

            _switch.warm()
        except Exception:  # noqa: BLE001 - only a head start: the switch loads them itself
            pass

    threading.Thread(target=warm, name="maskstore-warm-kernels").start()


def _room_for_copy(w: torch.Tensor) -> bool:
    """Whether ``w``'s device has room for a pristine copy of it and a margin (a quarter of
    what is free stays free); otherwise the pruned positions' base values are kept instead."""
    if w.device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(w.device)
    return w.numel() * w.element_size() <= 0.75 * free


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous 2-D CPU tensor's memory as a uint8 array (rows kept), sharing it."""
    return t.detach().view(torch.uint8).numpy()  # (out, in * itemsize) for a weight


def _checkpoint_of(model: nn.Module, base: str | os.PathLike):
    """The safetensors checkpoint base values are read back from: ``base`` a folder, or
    ``"auto"``: the folder the model was loaded from when it holds safetensors (None when
    not, or for ``"memory"``)."""
    from ..checkpoint import Checkpoint

    if base == "memory":
        return None
    if base != "auto":
        return Checkpoint(Path(base))
    folder = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(folder, str) or not folder or not Path(folder).is_dir():
        return None
    if not any(Path(folder).glob("*.safetensors")):
        return None
    try:
        return Checkpoint(Path(folder))
    except MaskstoreError:
        return None  # not a readable checkpoint: base values are stored instead


def _raw(t: torch.Tensor) -> np.ndarray:
    """A CPU float32 or bfloat16 tensor as numpy (bfloat16 as its uint16 bits), sharing memory."""
    return t.numpy() if t.dtype == torch.float32 else t.view(torch.int16).numpy().view(np.uint16)


@functools.lru_cache(maxsize=64)
def _rounded(gamma: float, dtype: torch.dtype) -> float:
    """``gamma`` as the weight's dtype holds it (torch rounds the gate to that dtype)."""
    return float(torch.tensor(gamma, dtype=torch.float32).to(dtype).float())


def _match(model: nn.Module, bundle: Bundle, check_weights: bool | None) -> dict[str, nn.Linear]:
    """The model's modules named by the bundle, after checking names and shapes match."""
    named = dict(model.named_modules())
    rec = (bundle.model_source or {}).get("model")
    wrong = f"wrong model (the bundle was built on {rec})" if rec else "wrong model"
    out = {}
    for name, info in bundle.modules.items():
        mod = named.get(name)
        if mod is None:
            raise MaskstoreError(f"the model has no module {name!r} that the bundle masks: {wrong}")
        if not isinstance(mod, nn.Linear):
            raise MaskstoreError(f"{name} is a {type(mod).__name__} in the model, not nn.Linear")
        if (mod.out_features, mod.in_features) != (info.out_features, info.in_features):
            raise MaskstoreError(
                f"{name} is {(mod.out_features, mod.in_features)} in the model but "
                f"{(info.out_features, info.in_features)} in the bundle: {wrong}"
            )
        out[name] = mod
    # the hash runs in model order, as at build time (a version's fingerprint is key-sorted)
    order = {n: i for i, n in enumerate(named)}
    out = dict(sorted(out.items(), key=lambda kv: order[kv[0]]))
    want = bundle.fingerprint.get("weights_xxh3")
    if check_weights and not want:
        raise MaskstoreError("the bundle records no weights hash: attach without check_weights")
    if (check_weights or check_weights is None) and want and weights_hash(out) != want:
        half = {m.weight.dtype for m in out.values()} - {torch.float32}
        if check_weights is None and half:
            # a float32 build attached in lower precision hashes differently too: say so
            warnings.warn(
                f"the model's weights do not hash as at build time; expected if the bundle was "
                f"built in another dtype (these are {', '.join(sorted(map(str, half)))}), else "
                "this is another model; check_weights=False silences this",
                WeightsWarning,
                stacklevel=3,
            )
        elif _MASKED.get(model) is not None:
            raise MaskstoreError(
                f"the model's weights hold persona {_MASKED.get(model)!r} of a handle that "
                "was dropped without detach(): detach handles before attaching again, or "
                "reload the model"
            )
        else:
            raise MaskstoreError(
                "the model's weights differ from those the bundle was built on: load the model "
                "it was built on, or pass check_weights=False"
            )
    return out


class WeightsWarning(UserWarning):
    """A half-precision model whose weights do not hash as the bundle recorded."""


def attach(
    model: nn.Module,
    bundle: Bundle | str,
    cache_bytes: int = 512 << 20,
    check_weights: bool | None = None,
    untie: bool = False,
    pristine: str | torch.device | None = None,
    base: str | os.PathLike = "auto",
    device_cache_bytes: int = 2 << 30,
) -> MaskHandle:
    """Attach a bundle's personas to ``model`` (reads metadata only).

    Args:
        model: any module whose ``nn.Linear`` names and shapes match the bundle's fingerprint
            (the bundle may mask only some of them).
        bundle: a :class:`Bundle` or a path.
        cache_bytes: bound of the packed-mask cache.
        check_weights: compare the model's weights with the hash recorded at build time (one
            streaming pass, a module at a time); None (default): when the bundle records one
            (a float32 mismatch is refused; a half-precision one only warns, since a float32
            build hashes differently once rounded); True: refuse any mismatch and bundles
            without a hash; False: skip.
        untie: give a masked module whose weight another module shares (a tied ``lm_head``)
            its own copy; without it such a bundle is refused.
        pristine: device for the base values that switching overwrites (default: the
            weight's), e.g. ``"cpu"`` for a model on a GPU.
        base: where restoring reads base values from. ``"auto"`` (default): a CPU model
            loaded from a safetensors folder reads them back from its files, memory-mapped
            (each weight is first checked equal to the file's, bit for bit; any that is not,
            and every other model, stores the base values of pruned positions in RAM as
            personas are used); ``"memory"``: always store them; a folder: that checkpoint.
            Keep the files in place while attached (rewriting them in place breaks the map).
            With a device backend (a model on a GPU), the default keeps a pristine copy of
            each masked weight on its device (while a quarter of the free memory stays free;
            else the pruned positions' values are kept, as with ``pristine``).
        device_cache_bytes: bound of the LRU of packed masks on the weights' device (device
            backends only; a persona costs its packed bits, 1 bit a masked weight).
    Returns:
        A :class:`MaskHandle` with the base model active.
    """
    if not isinstance(bundle, Bundle):
        bundle = open_bundle(bundle)
    return MaskHandle(model, bundle, cache_bytes, check_weights, untie, pristine, base,
                      device_cache_bytes)  # fmt: skip
