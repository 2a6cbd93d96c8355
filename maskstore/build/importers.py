"""The research code's layout: one ``torch.save``d bool tensor per module per persona.

Files are named ``M_{persona}_{module}.pt``. :func:`import_pt` reads them with
``torch.load(weights_only=True)`` only, so a file holding anything but plain tensors is refused
and nothing in it is executed; :func:`export_pt` writes them.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from ..errors import MaskstoreError
from ..files import open_regular
from ..store.writer import create_bundle

_FILE = re.compile(r"^M_(.+)\.pt$")


def split_name(stem: str) -> tuple[str, str]:
    """``"intro_vert_model.layers.0.mlp.up_proj"`` -> ``("intro_vert", "model.layers.0.mlp.up_proj")``.

    The module part is the suffix whose first dotted component has no underscore, or a final
    ``lm_head`` (``"seek_lm_head"`` -> ``("seek", "lm_head")``).
    """
    if stem.endswith("_lm_head") and len(stem) > len("_lm_head"):
        return stem[: -len("_lm_head")], "lm_head"
    for i, ch in enumerate(stem):
        if ch != "_" or i == 0:
            continue
        module = stem[i + 1 :]
        first = module.split(".", 1)[0]
        if "." in module and first and "_" not in first:
            return stem[:i], module
    raise MaskstoreError(f"cannot split {stem!r} into persona and dotted module name")


MAX_WEIGHTS = 1 << 34  # of one imported mask


def _load_tensor(path: Path) -> torch.Tensor:
    # a FIFO, device or link in a folder from elsewhere is refused before torch reads a byte
    fh = open_regular(path, "mask file", follow=False)
    try:
        with fh, warnings.catch_warnings():  # torch warns about the files it refuses
            warnings.simplefilter("ignore")
            obj = torch.load(fh, map_location="cpu", weights_only=True)
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
    if obj.layout != torch.strided:
        raise MaskstoreError(
            f"{path.name}: a {obj.layout} tensor; save a dense one (t.to_dense()) to import it"
        )
    if obj.device.type == "meta":
        raise MaskstoreError(f"{path.name}: a meta tensor holds no values; save the real mask")
    # bound the size before anything is materialised: an expanded (stride-0) view of a few
    # bytes can claim billions of elements
    need = obj.numel() * obj.element_size()
    if obj.numel() > MAX_WEIGHTS or obj.untyped_storage().nbytes() < need:
        raise MaskstoreError(
            f"{path.name}: shape {tuple(obj.shape)} is larger than the data the file holds "
            "(an expanded view?) or than 2^34 weights; save t.contiguous() of a real mask"
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
    fingerprint: dict | None = None,
    skip_lm_head: bool = False,
) -> tuple[list[str], int]:
    """Convert a folder of ``M_{persona}_{module}.pt`` files into a bundle at ``out``.

    Args:
        architecture: recorded when no ``fingerprint`` is given.
        fingerprint: the model's fingerprint (:func:`maskstore.modules.model_fingerprint`);
            then every file must name one of its modules, at its shape, and the bundle compares
            with bundles built on that model.
        skip_lm_head: leave out ``lm_head`` files (the reference's ``mask.py`` writes them).
    Returns:
        The persona names written, and how many ``lm_head`` files were skipped.
    """
    src = Path(src)
    if not src.is_dir():
        raise MaskstoreError(f"{src} is not a folder of M_*.pt files")
    files: dict[str, dict[str, Path]] = {}
    skipped = 0
    for f in sorted(src.iterdir()):
        m = _FILE.match(f.name)
        if m:
            persona, module = split_name(m.group(1))
            if skip_lm_head and module == "lm_head":
                skipped += 1
                continue
            files.setdefault(persona, {})[module] = f
    if not files:
        raise MaskstoreError(f"{src} holds no M_{{persona}}_{{module}}.pt files")
    known = None if fingerprint is None else fingerprint["modules"]
    # First pass: shapes only (each file loaded once more when written; tensors are small).
    shapes: dict[str, list[int]] = {}
    for _persona, mods in files.items():
        for module, f in mods.items():
            if known is not None and module not in known:
                hint = " (or pass skip_lm_head=True)" if module == "lm_head" else ""
                raise MaskstoreError(
                    f"{f.name}: the model has no masked module {module}: check --model{hint}"
                )
            t = _load_tensor(f)
            want = shapes.get(module) or (None if known is None else list(known[module]))
            if want is not None and want != list(t.shape):
                raise MaskstoreError(
                    f"{module}: shape {tuple(t.shape)} in {f.name} differs from {tuple(want)}"
                )
            shapes[module] = list(t.shape)
    if fingerprint is None:
        fingerprint = {"architecture": architecture, "modules": dict(sorted(shapes.items()))}
    else:
        order = [m for m in known if m in shapes]
        fingerprint = dict(fingerprint, modules={m: list(known[m]) for m in order})
        if len(order) != len(known):  # the weights hash covers modules the files leave out
            fingerprint.pop("weights_xxh3", None)
    with create_bundle(out, fingerprint, force=force) as bundle:
        for persona, mods in files.items():
            with bundle.persona_writer(
                persona,
                method="imported",
                params={"source": "research-pt"},
                provenance={"op": "import-pt", "operands": []},
            ) as w:
                for module in fingerprint["modules"]:
                    if module in mods:
                        w.write_mask(module, _load_tensor(mods[module]))
    return list(files), skipped


def export_pt(
    bundle,
    out: str | os.PathLike,
    personas: list[str] | None = None,
    force: bool = False,
) -> int:
    """Write ``personas`` (default: all) of ``bundle`` as ``M_{persona}_{module}.pt`` bool tensors
    into the new folder ``out`` (written beside it, then renamed into place).

    Returns:
        The number of files written.
    """
    from ..store.writer import new_folder

    # a blend is a soft gate, not a mask: the research layout has no place for it
    names = list(personas or [p for p in bundle.personas if bundle.persona(p)["method"] != "blend"])
    for p in names:
        if bundle.persona(p)["method"] == "blend":  # unknown names fail before any write
            raise MaskstoreError(
                f"{p!r} is a blend (a soft gate), not a mask: export-model applies it"
            )
    n = 0
    with new_folder(out, force, protect=_local(bundle)) as tmp:
        for p in names:
            for module in bundle.persona_modules(p):
                torch.save(bundle.read_mask(p, module, as_torch=True), tmp / f"M_{p}_{module}.pt")
                n += 1
    return n


def _local(bundle) -> tuple[str, ...]:
    """The bundle's own folder or file, when it is local (an output must never replace it)."""
    path = getattr(bundle, "path", None)
    return (str(path),) if path is not None and os.path.exists(str(path)) else ()
