"""A persona as a standalone Hugging Face checkpoint: the masks applied to the weights once.

The folder holds the model's config, its tokenizer and ``model.safetensors`` with the gated
weights ``W * G`` (``G = M + gamma (1 - M)``), so ``AutoModelForCausalLM.from_pretrained`` (and
any server that reads Hugging Face checkpoints) loads the persona with no maskstore at run time.
The safetensors metadata records where it came from: the persona, its digest, the bundle's,
gamma, and the base weights' hash.

With ``format="compressed-tensors"`` each masked weight is stored in the ``sparse-bitmask``
format of the compressed-tensors library (its unstructured-sparsity format, removed from the
library in 0.15): ``<module>.shape``, ``.compressed`` (the kept values, row by row),
``.bitmask`` (the mask, each row packed little-endian into bytes) and ``.row_offsets``, and
``config.json`` gains the ``quantization_config`` that names the format. The bitmask is the
persona's mask itself, not ``W != 0``, so kept weights that are zero (or -0.0) come back bit
for bit; pruned weights come back as +0.0.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._version import __version__
from ..errors import MaskstoreError
from ..runtime import attach
from ..store.format import Bundle
from ..store.writer import new_folder


def export_model(
    model: nn.Module,
    tokenizer,
    bundle: Bundle,
    persona: str,
    out: str | os.PathLike,
    gamma: float = 0.0,
    check_weights: bool | None = None,
    untie: bool = False,
    force: bool = False,
    format: str = "safetensors",
    dtype: str | None = None,
    version: str | None = None,
) -> Path:
    """Write ``model`` with ``persona`` applied as a Hugging Face checkpoint folder at ``out``
    (written beside it, then renamed into place); the model is left as it was.

    Args:
        model: a transformers model (``save_pretrained`` is used for its config).
        tokenizer: saved alongside (None: no tokenizer files).
        check_weights: as :func:`maskstore.attach`.
        format: ``safetensors`` (dense weights) or ``compressed-tensors`` (the masked weights
            in the sparse-bitmask format; needs ``gamma=0``, as the format stores zeros
            implicitly).
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the written weights (default: the
            model's); the gate is applied in the model's dtype first.
        version: the repository version the bundle came from, recorded with the provenance.
    Returns:
        The folder.
    """
    from safetensors.torch import save_file, save_model

    if format not in FORMATS:
        raise MaskstoreError(f"unknown export format {format!r}: use {' or '.join(FORMATS)}")
    if format == "compressed-tensors" and gamma != 0:
        raise MaskstoreError(
            "the compressed-tensors sparse-bitmask format stores pruned weights as zeros: "
            "export it with `gamma`=0"
        )
    out = Path(out)
    meta = bundle.persona(persona)  # unknown names fail before anything is written
    cast = None
    if dtype is not None:
        from ..models import torch_dtype

        cast = torch_dtype(dtype)
    h = attach(model, bundle, check_weights=check_weights, untie=untie)
    try:
        with new_folder(out, force, protect=_local(bundle)) as tmp:
            h.use(persona, gamma)
            model.config.save_pretrained(tmp)
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            metadata = {
                "format": "pt",
                "maskstore.version": __version__,
                "maskstore.persona": persona,
                "maskstore.persona_digest": meta["digest"],
                "maskstore.bundle_digest": bundle.digest,
                "maskstore.gamma": repr(float(gamma)),
                "maskstore.base_weights_xxh3": str(bundle.fingerprint.get("weights_xxh3")),
            }
            if format == "safetensors" and cast is None:
                save_model(model, str(tmp / "model.safetensors"), metadata=metadata)
            elif format == "safetensors":
                state = _state(model, cast)
                save_file(state, str(tmp / "model.safetensors"), metadata=metadata)
            else:
                masked = list(meta["modules"])
                state = _bitmask_state(model, bundle, persona, masked, cast)
                metadata["maskstore.store.format"] = format
                save_file(state, str(tmp / "model.safetensors"), metadata=metadata)
                kept = sum(e["kept"] for e in meta["modules"].values())
                numel = sum(bundle.modules[m].numel for m in masked)
                _add_sparsity_config(tmp / "config.json", masked, 1 - kept / numel)
            written = str(cast or next(model.parameters()).dtype).removeprefix("torch.")
            prov = {
                "persona": persona,
                "persona_digest": meta["digest"],
                "bundle_digest": bundle.digest,
                "version": version,
                "method": meta["method"],
                "params": meta["params"],
                "sparsity": meta["sparsity"],
                "gamma": float(gamma),
                "base_model": (bundle.model_source or {}).get("model"),
                "base_weights_xxh3": bundle.fingerprint.get("weights_xxh3"),
                "maskstore_version": __version__,
            }
            _record(tmp, prov, written)
            _readable(tmp)
    finally:
        h.detach()
    return out


FORMATS = ("safetensors", "compressed-tensors")


def _state(model: nn.Module, cast: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict with floating tensors cast to ``cast`` (tied tensors stored once,
    under their first name, as ``save_model`` does)."""
    state: dict[str, torch.Tensor] = {}
    seen = set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.dtype)
        if key in seen:
            continue
        seen.add(key)
        t = t.detach()
        state[name] = (t.to(cast) if t.is_floating_point() else t).contiguous()
    return state


def _record(folder: Path, prov: dict, dtype: str) -> None:
    """Provenance under ``maskstore`` in ``config.json`` (with the written dtype) and a model
    card ``README.md`` saying what the checkpoint is and where it came from."""
    import json

    cfg = folder / "config.json"
    doc = json.loads(cfg.read_text())
    doc["maskstore"] = prov
    doc["torch_dtype"] = doc["dtype"] = dtype
    cfg.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    rows = "\n".join(f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |"
                     for k, v in prov.items())  # fmt: skip
    card = f"""---
library_name: transformers
tags:
- maskstore
- persona-mask
base_model: {json.dumps(str(prov.get("base_model") or "unrecorded"))}
---

# {prov["persona"]}: a persona mask applied to {prov.get("base_model") or "its base model"}

The weights are the base model's with the persona's binary mask applied once
(`W * G`, `G = M + gamma (1 - M)`), stored as {dtype}: load it with
`AutoModelForCausalLM.from_pretrained` like any checkpoint. Made by maskstore from a persona
mask (arXiv 2602.07164, "Your Language Model Secretly Contains Personality Subnetworks").

| field | value |
| --- | --- |
{rows}
"""
    (folder / "README.md").write_text(card)


def _readable(folder: Path) -> None:
    """Files as ``open`` creates them (0666 less the umask), whatever the writers chose."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~umask)


def _bitmask_state(
    model: nn.Module,
    bundle: Bundle,
    persona: str,
    masked: list[str],
    cast: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The model's state dict with each masked weight in the sparse-bitmask layout (tied
    tensors stored once, under their first name, as ``save_model`` does)."""
    state: dict[str, torch.Tensor] = {}
    seen = set()
    targets = {f"{m}.weight": m for m in masked}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.dtype)
        if key in seen and name not in targets:
            continue
        seen.add(key)
        if cast is not None and t.is_floating_point():
            t = t.to(cast)
        if name not in targets:
            state[name] = t.detach().contiguous()
            continue
        m = targets[name]
        mask = bundle.read_mask(persona, m)  # (out, in) bool
        keep = torch.from_numpy(mask)
        counts = keep.sum(dim=1)
        state[f"{m}.shape"] = torch.tensor(list(t.shape))
        state[f"{m}.compressed"] = t.detach()[keep].contiguous()  # row-major: row by row
        state[f"{m}.bitmask"] = torch.from_numpy(np.packbits(mask, axis=-1, bitorder="little"))
        state[f"{m}.row_offsets"] = torch.cumsum(counts, 0) - counts
    return state


def _add_sparsity_config(config_json: Path, masked: list[str], sparsity: float) -> None:
    """``quantization_config`` naming the sparse-bitmask format for the masked modules."""
    import json

    doc = json.loads(config_json.read_text())
    doc["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "sparsity_config": {
            "format": "sparse-bitmask",
            "targets": masked,
            "ignore": [],
            "global_sparsity": sparsity,
            "sparsity_structure": "unstructured",
        },
    }
    config_json.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _local(bundle) -> tuple[str, ...]:
    """The bundle's own folder or file, when it is local (an output must never replace it)."""
    path = getattr(bundle, "path", None)
    return (str(path),) if path is not None and os.path.exists(str(path)) else ()
