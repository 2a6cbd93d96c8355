"""Which modules a persona masks, what kind and layer each one is, and the model fingerprint.

Naming rules (kind, layer) need no torch; torch is imported when a model is inspected.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import xxhash

from .errors import MaskstoreError

if TYPE_CHECKING:
    from torch import nn

from .store.names import module_kind, module_layer  # noqa: F401 - module_layer re-exported

_NEVER = re.compile(r"(^|\.)(embed_tokens|embed_out|wte|wpe|embeddings?)($|\.)")
_HEAD = re.compile(r"(^|\.)lm_head$")


def maskable_modules(
    model: nn.Module,
    only: str | None = None,
    pattern: str | None = None,
    include_lm_head: bool = False,
) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules to mask: never embeddings, and the LM head only if asked.

    Args:
        model: any torch module.
        only: ``"attn"`` or ``"mlp"`` to keep one kind (the LM head is neither).
        pattern: a regex that module names must match (``re.search``).
        include_lm_head: also mask ``lm_head`` (the reference's ``mask.py`` masks it; see
            :func:`check_untied` for models whose head shares the embeddings).
    Returns:
        name -> module, in model order.
    """
    if only not in (None, "attn", "mlp"):
        raise MaskstoreError(f"`only` must be 'attn' or 'mlp', got {only!r}")
    try:
        rx = re.compile(pattern) if pattern else None
    except re.error as e:
        raise MaskstoreError(f"invalid `pattern` regex {pattern!r}: {e}") from None
    from torch import nn

    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or _NEVER.search(name):
            continue
        if _HEAD.search(name):
            if include_lm_head and (rx is None or rx.search(name)):
                out[name] = mod
            continue
        if only and module_kind(name) != only:
            continue
        if rx and not rx.search(name):
            continue
        out[name] = mod
    if not out:
        what = f"regex {pattern!r}" if pattern else "the selection"
        raise MaskstoreError(f"{what} matches no maskable nn.Linear module: check `pattern`/`only`")
    return out


def tied_to(model: nn.Module, name: str) -> str | None:
    """The other module whose weight is the same tensor as module ``name``'s (tied input and
    output embeddings), or None."""
    target = dict(model.named_modules())[name].weight
    for other, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if other == name or w is None:
            continue
        if w is target or (w.device.type != "meta" and w.data_ptr() == target.data_ptr()):
            return other
    return None


def check_untied(model: nn.Module, names, untie: bool = False) -> list[str]:
    """Refuse to mask a weight another module shares (a tied ``lm_head`` would mask the input
    embeddings too), unless ``untie``: then give each such module its own copy of the weight
    (``config.tie_word_embeddings`` becomes False) and return their names."""
    import torch

    done = []
    named = dict(model.named_modules())
    owners: dict[object, list[str]] = {}  # weight (or its storage address) -> module names
    for n, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            key = id(w) if w.device.type == "meta" else w.data_ptr()
            owners.setdefault(key, []).append(n)
    for name in names:
        w = named[name].weight
        key = id(w) if w.device.type == "meta" else w.data_ptr()
        others = [n for n in owners.get(key, []) if n != name]
        if not others:
            continue
        other = others[0]
        if not untie:
            raise MaskstoreError(
                f"{name} shares its weight with {other} (tied embeddings), so masking it would "
                "mask that too: pass untie=True to give it its own copy"
            )
        mod = named[name]
        mod.weight = torch.nn.Parameter(
            mod.weight.detach().clone(), requires_grad=mod.weight.requires_grad
        )
        cfg = getattr(model, "config", None)
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
        done.append(name)
    return done


def weights_hash(modules: dict[str, nn.Linear], weight_of=None) -> str:
    """xxh3-128 over the masked weights: names, shapes and float32 values, in model order
    (the same value for a model in any dtype that holds the same float32 numbers).

    Args:
        weight_of: ``name -> weight`` for modules whose weights are elsewhere (offloaded).
    """
    import torch

    x = xxhash.xxh3_128()
    for name, mod in modules.items():
        w = mod.weight if weight_of is None else weight_of(name)
        w = w.detach().to("cpu", torch.float32).contiguous()
        x.update(f"{name}:{tuple(w.shape)}".encode())
        x.update(w.view(torch.uint8).numpy().data)
    return x.hexdigest()


def model_fingerprint(
    model: nn.Module,
    modules: dict[str, nn.Linear] | None = None,
    hash_weights: bool = False,
    weight_of=None,
) -> dict:
    """The fingerprint stored in a bundle: architecture, masked module names and shapes."""
    modules = modules if modules is not None else maskable_modules(model)
    fp = {
        "architecture": type(model).__name__,
        "modules": {n: [m.out_features, m.in_features] for n, m in modules.items()},
    }
    if hash_weights:
        fp["weights_xxh3"] = weights_hash(modules, weight_of)
    return fp


def vocab_size(model: nn.Module) -> int | None:
    """How many token embeddings ``model`` has (None when it does not say)."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    n = getattr(emb, "num_embeddings", None)
    return n if isinstance(n, int) else None
