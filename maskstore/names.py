"""Names that reach the filesystem or a remote: one rule each, checked with ``re.fullmatch``.

Persona names and ref names (tags, branches) become path components, so they allow no ``/``, no
``..``, no leading dot and no control characters. Module names are dotted Python attribute paths.
Object names are lowercase hex of a fixed length.
"""

from __future__ import annotations

import re

from .errors import MaskstoreError

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
