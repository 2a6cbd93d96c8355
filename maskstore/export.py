"""A persona as a standalone Hugging Face checkpoint: the masks applied to the weights once.

The folder holds the model's config, its tokenizer and ``model.safetensors`` with the gated
weights ``W * G`` (``G = M + gamma (1 - M)``), so ``AutoModelForCausalLM.from_pretrained`` (and
any server that reads Hugging Face checkpoints) loads the persona with no maskstore at run time.
The safetensors metadata records where it came from: the persona, its digest, the bundle's,
gamma, and the base weights' hash.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ._version import __version__
from .format import Bundle
from .runtime import attach
from .writer import new_folder


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
) -> Path:
    """Write ``model`` with ``persona`` applied as a Hugging Face checkpoint folder at ``out``
    (written beside it, then renamed into place); the model is left as it was.

    Args:
        model: a transformers model (``save_pretrained`` is used for its config).
        tokenizer: saved alongside (None: no tokenizer files).
        check_weights: as :func:`maskstore.attach`.
    Returns:
        The folder.
    """
    from safetensors.torch import save_model

    out = Path(out)
    meta = bundle.persona(persona)  # unknown names fail before anything is written
    h = attach(model, bundle, check_weights=check_weights, untie=untie)
    try:
        with new_folder(out, force) as tmp:
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
            save_model(model, str(tmp / "model.safetensors"), metadata=metadata)
    finally:
        h.detach()
    return out
