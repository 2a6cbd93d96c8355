"""Import paths from before the modules were grouped by job (``maskstore.format`` is now
``maskstore.store.format``): each old name imports as the very module at the new one, so
existing imports, ``isinstance`` checks and monkeypatches keep working. Installed on
``sys.meta_path`` by ``maskstore/__init__.py``; nothing new should use the old names."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

MOVED = {
    **{m: f"store.{m}" for m in ("bits", "chunks", "codecs", "edit", "format", "gapcode",
                                 "hashing", "names", "opener", "stats", "stores", "writer")},
    **{m: f"compare.{m}" for m in ("algebra", "evaluate")},
    **{m: f"build.{m}" for m in ("calibration", "collect", "distributed", "importers",
                                 "methods", "offload", "pipeline", "scoring", "_select")},
    "export": "serve.export",
    "_switch": "runtime._switch",
    # the runtime left serve/ for its own package
    "serve.runtime": "runtime.handle",
    "serve._switch": "runtime._switch",
    "serve._mixed": "runtime._mixed",
}  # fmt: skip


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``maskstore.OLD`` and leaves the module at ``maskstore.NEW`` in its place."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        head, _, old = fullname.partition(".")  # old may be dotted: serve.runtime
        if head != "maskstore" or old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # a placeholder module, replaced in exec_module

    def exec_module(self, module: types.ModuleType) -> None:
        name = module.__name__
        real = importlib.import_module(f"maskstore.{MOVED[name.partition('.')[2]]}")
        # the import system returns what sys.modules holds under the name once this returns
        sys.modules[name] = real


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
