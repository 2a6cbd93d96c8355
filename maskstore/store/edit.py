"""Editing a bundle persona by persona: copy (from any bundle of the same model), rename,
remove. Each is atomic (a persona appears or goes by one rename) and keeps the persona's
metadata digest, which covers its masks, statistics, method, parameters and provenance but
not its name.
"""

from __future__ import annotations

import os
import shutil
import uuid

from ..errors import IntegrityError, MaskstoreError
from .format import STAGING, Bundle
from .writer import WritableBundle


def _users(bundle: Bundle, name: str) -> list[str]:
    """The blends of ``bundle`` that combine persona ``name``."""
    out = []
    for p in bundle.personas:
        meta = bundle.persona(p)
        if meta["method"] == "blend" and any(
            o.get("name") == name for o in meta["provenance"].get("operands", [])
        ):
            out.append(p)
    return out


def copy_persona(
    src: Bundle, name: str, dest: WritableBundle, as_: str | None = None, overwrite: bool = False
) -> dict:
    """Copy persona ``name`` of ``src`` into ``dest`` (a bundle of the same model) as ``as_``
    (default: the same name), masks and statistics; returns the copy's metadata, whose digest
    is the original's.

    Raises:
        MaskstoreError: another model, a blend or recipe (copy what it is made of), a name
            taken without ``overwrite``, a blend in ``dest`` that uses the persona replaced.
    """
    new = as_ or name
    meta = src.persona(name)
    if src.fingerprint_digest != dest.fingerprint_digest:
        raise MaskstoreError(
            f"{name!r} was built for another model than {dest.path}'s (fingerprints differ): "
            "copy between bundles of one model"
        )
    if meta["method"] == "blend":
        raise MaskstoreError(f"{name!r} is a blend: copy its operands, then blend them there")
    if getattr(src, "is_recipe", None) and src.is_recipe(name):
        raise MaskstoreError(
            f"{name!r} is a recipe (no mask bits): check the version out with a model first"
        )
    if overwrite and new in dest.personas and (users := _users(dest, new)):
        raise MaskstoreError(
            f"blend(s) {', '.join(users)} in {dest.path} use {new!r}: replacing it would change "
            "them; remove or re-blend them first"
        )
    keep = ("method", "params", "sparsity", "calibration", "provenance")
    with dest.persona_writer(new, overwrite=overwrite, **{f: meta[f] for f in keep}) as w:
        for module, entry in meta["modules"].items():
            w.write_packed_blocks(module, (b for _, b in src.iter_chunks(name, module)))
            if entry.get("stats"):
                w.write_stats(module, src.read_stats(name, module))
    got = dest.persona(new)
    if got["digest"] != meta["digest"]:  # never expected: the copy is bit for bit
        raise IntegrityError(f"the copy of {name!r} does not reproduce its digest: report it")
    return got


def remove_persona(bundle: WritableBundle, name: str) -> None:
    """Remove persona ``name`` (one rename out of ``personas/``, then the files).

    Raises:
        MaskstoreError: an unknown persona, or one a blend of the bundle combines.
    """
    bundle.persona(name)  # unknown names fail listing the known ones
    if users := _users(bundle, name):
        raise MaskstoreError(f"blend(s) {', '.join(users)} use {name!r}: remove them first")
    folder = bundle.path / "personas" / name
    # into the staging folder, named as a writer's: if this process dies before the files are
    # gone, the next writer reclaims them
    trash = bundle.path / STAGING / f"{os.getpid()}-rm-{uuid.uuid4().hex[:12]}"
    trash.parent.mkdir(exist_ok=True)
    os.rename(folder, trash)
    bundle._personas.pop(name, None)
    shutil.rmtree(trash, ignore_errors=True)


def rename_persona(bundle: WritableBundle, old: str, new: str) -> dict:
    """Rename persona ``old`` to ``new`` in place (its digest unchanged): the copy appears
    under the new name first, then the old name goes, so nothing is lost if it stops midway.

    Raises:
        MaskstoreError: an unknown persona, a taken name, one a blend combines.
    """
    if old == new:
        raise MaskstoreError(f"{old!r} is already its name")
    if new in bundle.personas:
        raise MaskstoreError(f"persona {new!r} already exists in {bundle.path}: pick another name")
    if users := _users(bundle, old):
        raise MaskstoreError(f"blend(s) {', '.join(users)} use {old!r}: re-blend after renaming")
    meta = copy_persona(bundle, old, bundle, new)
    remove_persona(bundle, old)
    return meta
