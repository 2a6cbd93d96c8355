"""maskstore: store, compare, version and serve persona masks over LLM weights.

One import for the API::

    from maskstore import build, BuildConfig, load_model, attach, open, open_repo, overlap

The storage core (bundles, set algebra, repositories) needs numpy only; what touches a model
(``build``, ``load_model``, ``attach``, ...) imports torch on first use.
"""

from __future__ import annotations

from typing import Any

from . import _moved
from ._version import __version__
from .errors import IntegrityError, MaskstoreError, MergeConflict, RefConflict
from .store.format import Bundle
from .store.opener import open_bundle
from .store.stats import ChannelStats
from .store.writer import create_bundle, pack_zip

open = open_bundle
_moved.install()  # the import paths from before the job subpackages (maskstore.format, ...)

_LAZY = {
    "MaskHandle": "runtime",
    "attach": "runtime",
    "maskable_modules": "modules",
    "model_fingerprint": "modules",
    "BuildConfig": "build",
    "load_model": "models",
    "open_repo": "repo",
    "init_repo": "repo",
    "overlap": "compare.algebra",
    "serve": "serve",
}


def __getattr__(name: str) -> Any:
    """Torch-backed names, imported on first use so that storage-only users never load torch."""
    import importlib

    if name == "build":  # the module, callable as maskstore.build.build
        return importlib.import_module(".build", __name__)
    if name in _LAZY:
        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        return mod if name == _LAZY[name] else getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BuildConfig",
    "Bundle",
    "ChannelStats",
    "__version__",
    "IntegrityError",
    "MaskHandle",
    "MaskstoreError",
    "MergeConflict",
    "RefConflict",
    "attach",
    "build",
    "create_bundle",
    "init_repo",
    "load_model",
    "maskable_modules",
    "model_fingerprint",
    "open",
    "open_bundle",
    "open_repo",
    "overlap",
    "pack_zip",
]
