"""maskstore: store, compare, version and serve persona masks over LLM weights."""

__version__ = "0.1.0"

from .errors import IntegrityError, MaskstoreError  # noqa: E402
from .format import Bundle, create_bundle, open_bundle, pack_zip  # noqa: E402
from .modules import maskable_modules, model_fingerprint  # noqa: E402
from .runtime import MaskHandle, attach  # noqa: E402
from .stats import ChannelStats  # noqa: E402

open = open_bundle  # noqa: A001 - ``maskstore.open(path)`` reads naturally

__all__ = [
    "Bundle",
    "ChannelStats",
    "IntegrityError",
    "MaskHandle",
    "attach",
    "MaskstoreError",
    "create_bundle",
    "maskable_modules",
    "model_fingerprint",
    "open",
    "open_bundle",
    "pack_zip",
]
