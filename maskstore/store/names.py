"""Names that reach the filesystem or a remote: one rule each, checked with ``re.fullmatch``.

Persona names and ref names (tags, branches) become path components, so they allow no ``/``, no
``..``, no leading dot and no control characters. Module names are dotted Python attribute paths.
Object names are lowercase hex of a fixed length.
"""

from __future__ import annotations

import re

from ..errors import MaskstoreError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")
_MODULE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_HEX = re.compile(r"[0-9a-f]+")

PERSONA_MAX = 128
REF_MAX = 100
MODULE_MAX = 256


def _check(name: object, limit: int, what: str) -> str:
    """The one rule for names that become path components."""
    if not (
        isinstance(name, str)
        and 0 < len(name) <= limit
        and _NAME.fullmatch(name) is not None
        and ".." not in name
    ):
        raise MaskstoreError(
            f"invalid {what} {name!r}: use 1-{limit} letters, digits and _ . + = - "
            "(starting with a letter or digit, no '..', no '/')"
        )
    return name


def check_persona_name(name: str) -> str:
    """Return ``name`` if it is a valid persona name, else raise a one-line error."""
    return _check(name, PERSONA_MAX, "persona name")


def check_ref_name(name: str) -> str:
    """Return ``name`` if it is a valid tag or branch name, else raise a one-line error."""
    return _check(name, REF_MAX, "tag or branch name")


def check_module_name(name: str) -> str:
    """Return ``name`` if it is a dotted module path (``model.layers.0.mlp.up_proj``)."""
    if not isinstance(name, str) or len(name) > MODULE_MAX or not _MODULE.fullmatch(name):
        raise MaskstoreError(
            f"invalid module name {name!r}: a dotted path of letters, digits and _"
        )
    return name


def is_hex(name: str, length: int) -> bool:
    """True when ``name`` is ``length`` lowercase hex digits (an object name)."""
    return isinstance(name, str) and len(name) == length and _HEX.fullmatch(name) is not None


# ---- what a module name says: attention or MLP, and its layer

_ATTN_LEAF = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "query",
    "key",
    "value",
    "out_proj",
    "c_attn",
    "query_key_value",
    "wqkv",
    "wo",
    "wq",
    "wk",
    "wv",
    "dense",
}
_MLP_LEAF = {
    "gate_proj",
    "up_proj",
    "down_proj",
    "fc1",
    "fc2",
    "c_fc",
    "w1",
    "w2",
    "w3",
    "gate_up_proj",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "fc_in",
    "fc_out",
}
_ATTN_PART = re.compile(r"attn|attention", re.I)
_MLP_PART = re.compile(r"mlp|feed_forward|ffn|experts", re.I)


def module_kind(name: str) -> str:
    """``"attn"``, ``"mlp"`` or ``"other"`` from a module name of a common architecture."""
    parts = name.split(".")
    for part in reversed(parts[:-1]):
        if _ATTN_PART.search(part):
            return "attn"
        if _MLP_PART.search(part):
            return "mlp"
    leaf = parts[-1].lower()
    if leaf in _MLP_LEAF:
        return "mlp"
    if leaf in _ATTN_LEAF:
        return "attn"
    return "other"


def module_layer(name: str) -> int | None:
    """The first integer path component (``model.layers.12.mlp.up_proj`` -> 12), if any."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None
