"""Import the research code's layout: one ``torch.save``d bool tensor per module per persona.

Files are named ``M_{persona}_{module}.pt``. They are read with ``torch.load(weights_only=True)``
only, so a file holding anything but plain tensors is refused and nothing in it is executed.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from .errors import MaskstoreError
from .writer import create_bundle

_FILE = re.compile(r"^M_(.+)\.pt$")


def split_name(stem: str) -> tuple[str, str]:
    """``"intro_vert_model.layers.0.mlp.up_proj"`` -> ``("intro_vert", "model.layers.0.mlp.up_proj")``.

    The module part is the suffix whose first dotted component has no underscore.
    """
    for i, ch in enumerate(stem):
        if ch != "_" or i == 0:
            continue
        module = stem[i + 1 :]
        first = module.split(".", 1)[0]
        if "." in module and first and "_" not in first:
            return stem[:i], module
    raise MaskstoreError(f"cannot split {stem!r} into persona and dotted module name")


def _load_tensor(path: Path) -> torch.Tensor:
    try:
        with warnings.catch_warnings():  # torch warns about the files it refuses
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever fails, the file is not a plain tensor file
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise MaskstoreError(
            f"{path.name}: refused, not a plain tensor file ({first}); only weights_only "
            "torch.save files of bool tensors are imported"
        ) from None
    if not isinstance(obj, torch.Tensor) or obj.ndim != 2:
        raise MaskstoreError(
            f"{path.name}: holds {type(obj).__name__}, expected one 2-D bool tensor"
        )
    if obj.dtype != torch.bool:
        if obj.dtype.is_floating_point or not bool(((obj == 0) | (obj == 1)).all()):
            raise MaskstoreError(f"{path.name}: dtype {obj.dtype} is not a 0/1 mask")
        obj = obj.bool()
    return obj


def import_pt(
    src: str | os.PathLike,
    out: str | os.PathLike,
    architecture: str = "imported",
    force: bool = False,
) -> list[str]:
    """Convert a folder of ``M_{persona}_{module}.pt`` files into a bundle at ``out``.

    Returns:
        The persona names written.
    """
    src = Path(src)
    if not src.is_dir():
        raise MaskstoreError(f"{src} is not a folder of M_*.pt files")
    files: dict[str, dict[str, Path]] = {}
    for f in sorted(src.iterdir()):
        m = _FILE.match(f.name)
        if m:
            persona, module = split_name(m.group(1))
            files.setdefault(persona, {})[module] = f
    if not files:
        raise MaskstoreError(f"{src} holds no M_{{persona}}_{{module}}.pt files")
    # First pass: shapes only (each file loaded once more when written; tensors are small).
    shapes: dict[str, list[int]] = {}
    for _persona, mods in files.items():
        for module, f in mods.items():
            t = _load_tensor(f)
            if module in shapes and shapes[module] != list(t.shape):
                raise MaskstoreError(
                    f"{module}: shape {tuple(t.shape)} in {f.name} differs from other personas"
                )
            shapes[module] = list(t.shape)
    fingerprint = {"architecture": architecture, "modules": dict(sorted(shapes.items()))}
    with create_bundle(out, fingerprint, force=force) as bundle:
        for persona, mods in files.items():
            with bundle.persona_writer(
                persona,
                method="imported",
                params={"source": "research-pt"},
                provenance={"op": "import-pt", "operands": []},
            ) as w:
                for module, f in mods.items():
                    w.write_mask(module, _load_tensor(f))
    return list(files)
