"""Sequential onloading: calibrate a model that does not fit, one decoder block at a time.

The model is built on the meta device (no weight memory). The embeddings run over every
calibration batch once, and a forward pre-hook on the first decoder block records what the block
receives (hidden states and the keyword arguments the model computes: causal mask, rotary
position embeddings, ...). Then each block in turn is loaded from the safetensors files, runs over
all batches of all personas while the statistics hooks watch its ``nn.Linear`` inputs, and goes
back to the meta device; its outputs are the next block's inputs. Hidden states stay in RAM up
to a budget and are spilled to a temp folder past it.

Every module sees the same batches in the same order, through the same modules, as in a
whole-model forward pass, so the statistics (and the masks and digests) are bit for bit those
of the whole-model path. Works for Hugging Face decoder-only models that keep their blocks in
``model.layers`` (Llama, Qwen2, Mistral, Gemma, SmolLM2, ...).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..errors import MaskstoreError
from ..progress import Progress, counter
from .collect import Batch, StatsCollector


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed blocks under 32 MiB in its heap,
    so a process that loads and frees block after block would otherwise hold them all)."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


class _Stop(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def parse_bytes(text: str) -> int:
    """``"8GiB"``, ``"500MB"``, ``"1.5G"`` or a plain number of bytes."""
    units = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
             "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}  # fmt: skip
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    try:
        value = float(num) * units[s[len(num) :]]
    except (ValueError, KeyError):
        raise MaskstoreError(f"`max_memory` {text!r}: write it as e.g. 8GiB or 500MB") from None
    if value <= 0:
        raise MaskstoreError(f"`max_memory` must be positive, got {text!r}")
    return int(value)


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Size of a model folder's safetensors files (its weights as stored)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


class LayerwiseModel:
    """A model on the meta device whose decoder blocks are loaded one at a time.

    Args:
        folder: a Hugging Face model folder with safetensors weights.
        dtype: the dtype the model runs in (as ``from_pretrained(dtype=...)``).
        device: where each block runs.
        budget: bytes of hidden states kept in RAM before spilling to disk.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        budget: int = 1 << 30,
    ) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = Path(folder)
        self.dtype = dtype
        self.device = torch.device(device)
        self.budget = budget
        config = AutoConfig.from_pretrained(self.folder)
        with init_empty_weights():  # parameters on meta, buffers (rotary inv_freq) real
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        self.weights = Checkpoint(self.folder)
        inner = getattr(self.model, "model", None)
        layers = getattr(inner, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            raise MaskstoreError(
                f"`offload` needs a decoder-only model with a model.layers list; "
                f"{type(self.model).__name__} has none: build without `offload`"
            )
        self.inner, self.layers = inner, layers
        rotary = getattr(inner, "rotary_emb", None)
        if rotary is not None:  # buffers only (inv_freq), made for real by init_empty_weights
            rotary.to(self.device)
        self._prefix = {id(m): n for n, m in self.model.named_modules()}

    # ---- weights
    def weight(self, name: str) -> torch.Tensor:
        """Module ``name``'s weight in the model's dtype, loaded from the checkpoint (a head
        tied to the embeddings reads theirs)."""
        key = f"{name}.weight"
        if key not in self.weights and name == "lm_head":
            key = f"{self._prefix[id(self.model.get_input_embeddings())]}.weight"
        release_memory()  # the previous module's weight and scores are free by now
        return self.weights.get(key).to(self.dtype)

    def _load(self, module: nn.Module) -> None:
        """Materialise ``module``'s parameters from the checkpoint on the run device."""
        prefix = self._prefix[id(module)]
        for pname, p in list(module.named_parameters()):
            full = f"{prefix}.{pname}" if prefix else pname
            t = self.weights.get(full)
            if tuple(t.shape) != tuple(p.shape):
                raise MaskstoreError(
                    f"the checkpoint's {full} is {tuple(t.shape)} but the config makes it "
                    f"{tuple(p.shape)}: the weights and config.json do not belong together"
                )
            t = t.to(device=self.device, dtype=p.dtype)
            owner = module.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else module
            setattr(owner, pname.rsplit(".", 1)[-1], nn.Parameter(t, requires_grad=False))
        module.to(self.device)

    def _unload(self, module: nn.Module) -> None:
        module.to("meta")
        release_memory()

    # ---- calibration
    def collect(
        self,
        collectors: Mapping[str, StatsCollector],
        batches: Mapping[str, list[tuple[int, Batch]]],
        progress: Progress | None = None,
        after_block: Callable[[nn.Module], None] | None = None,
    ) -> None:
        """Run every persona's ``(index, batch)`` pairs through the model block by block; each
        persona's ``collector`` sees its own batches' inputs of the watched modules (see
        :func:`collect_by_block`)."""
        embed = self.model.get_input_embeddings()
        self._load(embed)
        collect_by_block(self.model, self.layers, collectors, batches, progress,
                         budget=self.budget, load=self._load, unload=self._unload,
                         after_block=after_block, first_unload=lambda: self._unload(embed))  # fmt: skip


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """A Hugging Face decoder-only model's blocks (``model.layers``), None if it keeps none."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


@torch.inference_mode()
def collect_by_block(
    model: nn.Module,
    layers: nn.ModuleList,
    collectors: Mapping[str, StatsCollector],
    batches: Mapping[str, list[tuple[int, Batch]]],
    progress: Progress | None = None,
    budget: int = 1 << 30,
    load: Callable[[nn.Module], None] | None = None,
    unload: Callable[[nn.Module], None] | None = None,
    after_block: Callable[[nn.Module], None] | None = None,
    first_unload: Callable[[], None] | None = None,
) -> None:
    """The calibration pass one decoder block at a time, over every persona's batches.

    The model runs up to its first block once per batch (a pre-hook records what the block
    receives, then stops the pass); then each block in turn (``load``-ed first and
    ``unload``-ed after, for weights that live on disk) runs over all batches while the
    collectors' hooks watch its ``nn.Linear`` inputs, its outputs becoming the next block's
    inputs; ``after_block(block)`` runs once a block has seen every batch (SparseGPT releases
    that block's Gram matrices there). Hidden states stay in RAM up to ``budget`` bytes and
    spill to a temp folder past it. Each module sees the batches of the whole-model pass, in
    its order, so the statistics are bit for bit those of :meth:`StatsCollector.run`.
    """
    inputs: list[tuple[str, int, torch.Tensor | None, tuple, dict]] = []  # per batch
    tick = counter(progress, len(layers))
    dev = model.get_input_embeddings().weight.device
    first = layers[0]

    def capture(_mod, args, kwargs):
        raise _Stop(args, kwargs)

    handle = first.register_forward_pre_hook(capture, with_kwargs=True)
    states = _States(budget)
    try:
        for persona, bs in batches.items():
            for index, batch in bs:
                if isinstance(batch, torch.Tensor):
                    ids, mask = batch, None
                else:
                    ids, mask = batch["input_ids"], batch.get("attention_mask")
                kw = {} if mask is None else {"attention_mask": mask.to(dev)}
                try:
                    model(input_ids=ids.to(dev), use_cache=False, **kw)
                except _Stop as stop:
                    args, kwargs = stop.args
                    states.put(len(inputs), args[0])  # hidden states: RAM or disk
                    inputs.append((persona, index, mask, args[1:], kwargs))
                else:  # pragma: no cover - the hook always fires
                    raise MaskstoreError("the first decoder block never ran")
    except BaseException:
        states.close()
        raise
    finally:
        handle.remove()
        if first_unload is not None:
            first_unload()
    try:
        watched = {}
        for c in collectors.values():
            watched.update(c.modules)
        current: list[StatsCollector | None] = [None]
        hooks = [
            mod.register_forward_pre_hook(
                lambda _m, a, n=name: (
                    current[0].observe(n, a[0]) if n in current[0].modules else None
                )  # fmt: skip
            )
            for name, mod in watched.items()
        ]
        try:
            for layer in layers:
                if load is not None:
                    load(layer)
                dev = next(layer.parameters()).device
                for i, (persona, index, mask, args, kwargs) in enumerate(inputs):
                    coll = collectors[persona]
                    current[0] = coll
                    with coll.batch(mask, index):
                        out = layer(states.get(i).to(dev), *args, **kwargs)
                    states.put(i, out[0] if isinstance(out, tuple) else out)
                if unload is not None:
                    unload(layer)
                if after_block is not None:
                    after_block(layer)
                tick(1)
        finally:
            for h in hooks:
                h.remove()
    finally:
        states.close()


class _States:
    """Hidden states by batch index: in RAM up to ``budget`` bytes, then in a temp folder."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.ram: dict[int, torch.Tensor] = {}
        self.used = 0
        self.folder: Path | None = None
        self.on_disk: set[int] = set()

    def put(self, i: int, t: torch.Tensor) -> None:
        t = t.detach()
        size = t.numel() * t.element_size()
        old = self.ram.pop(i, None)
        if old is not None:
            self.used -= old.numel() * old.element_size()
        if self.used + size <= self.budget:
            self.ram[i] = t
            self.used += size
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="maskstore-states-"))
        path = self.folder / f"{i}.pt"
        try:
            torch.save(t.cpu(), path)
        except (OSError, RuntimeError) as e:  # a full disk: torch says so as a RuntimeError
            path.unlink(missing_ok=True)
            msg = " ".join(str(e).split())[:160]
            raise MaskstoreError(
                f"spilling hidden states to {self.folder} failed ({msg}): free space there "
                "(or set TMPDIR elsewhere), or raise `max_memory`"
            ) from None
        self.on_disk.add(i)

    def get(self, i: int) -> torch.Tensor:
        if i in self.ram:
            return self.ram[i]
        return torch.load(self.folder / f"{i}.pt", weights_only=True)

    def close(self) -> None:
        self.ram.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
