"""maskstore: store, compare, version and serve persona masks over LLM weights.

The storage core (bundles, set algebra, repositories) needs numpy only; what touches a model
(``attach``, ``maskable_modules``, ``model_fingerprint``) imports torch on first use.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__
from .errors import IntegrityError, MaskstoreError
from .format import Bundle
from .opener import open_bundle
from .stats import ChannelStats
from .writer import create_bundle, pack_zip

open = open_bundle

_LAZY = {
    "MaskHandle": "runtime",
    "attach": "runtime",
    "maskable_modules": "modules",
    "model_fingerprint": "modules",
}


def __getattr__(name: str) -> Any:
    """Torch-backed names, imported on first use so that storage-only users never load torch."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Bundle",
    "ChannelStats",
    "__version__",
    "IntegrityError",
    "MaskHandle",
    "MaskstoreError",
    "attach",
    "create_bundle",
    "maskable_modules",
    "model_fingerprint",
    "open",
    "open_bundle",
    "pack_zip",
]
