"""The bundle format, write side: new bundles and personas appear whole or not at all.

A persona is written into ``bundle/.staging/<random>`` and renamed into place when complete, and
a new bundle is written next to its destination and renamed into place: a reader sees a persona
(or a bundle) whole or not at all. Arrays in maskstore's zarr profile (zstd or raw) are written
directly; zarr writes the others (gzip, blosc), imported only then.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import stat
import uuid
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import MaskstoreError
from . import codecs
from .bits import pack, packed_width, popcount
from .format import (
    DEFAULT_CHUNK_BYTES,
    FORMAT_VERSION,
    STAGING,
    Bundle,
    ModuleInfo,
    StoreSource,
    persona_digest,
    validate,
)
from .hashing import ArrayHasher, xxh3
from .names import check_module_name, check_persona_name
from .stats import ChannelStats
from .stores import LocalStore

__all__ = ["PersonaWriter", "WritableBundle", "compressor", "create_bundle", "pack_zip"]


class WritableBundle(Bundle):
    """A directory bundle opened for adding personas (``open_bundle(path, writable=True)``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path, writable=True)

    def persona_writer(self, name: str, **meta: Any) -> PersonaWriter:
        """Start writing a new persona into this bundle; see :class:`PersonaWriter`."""
        return PersonaWriter(self, name, **meta)


def compressor(
    name: str = "zstd",
    level: int | None = None,
    kept_share: float | None = None,
    sample: np.ndarray | None = None,
) -> Any:
    """A stock zarr v3 codec by name: zstd (default), blosc, gzip or none.

    With zstd and no explicit level the codec follows the data (:mod:`maskstore.store.codecs`): level
    16 for a skewed mask, else level 3, or raw bytes when a trial compression of ``sample``
    saves under 2% (the bits are incompressible and reads skip a decode).
    """
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    if name == "zstd":
        if level is None:
            level = codecs.zstd_level(kept_share)
            if not codecs.is_skewed(kept_share) and sample is not None:
                if codecs.incompressible(sample):
                    return None
        return ZstdCodec(level=level)
    if name == "blosc":
        return BloscCodec(cname="zstd", clevel=5 if level is None else level, shuffle="bitshuffle")
    if name == "gzip":
        return GzipCodec(level=6 if level is None else level)
    if name == "none":
        return None
    raise MaskstoreError(f"unknown compressor {name!r}: use zstd, blosc, gzip or none")


def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False))


def _group(attrs: dict | None = None) -> dict:
    """A zarr v3 group's ``zarr.json``."""
    return {"attributes": attrs or {}, "zarr_format": 3, "node_type": "group"}


def _array_meta(
    shape: tuple[int, ...], chunk_rows: int, dtype: np.dtype, level: int | None
) -> dict:
    """A zarr v3 array's ``zarr.json`` in maskstore's profile: regular row chunks, the default
    chunk key encoding, little-endian bytes, then zstd or nothing."""
    codecs_ = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if dtype.itemsize == 1:
        codecs_ = [{"name": "bytes"}]
    if level is not None:
        codecs_.append({"name": "zstd", "configuration": {"level": level, "checksum": False}})
    return {
        "shape": list(shape),
        "data_type": dtype.name,
        "chunk_grid": {
            "name": "regular",
            "configuration": {"chunk_shape": [chunk_rows, *shape[1:]]},
        },
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0.0 if dtype.kind == "f" else 0,
        "codecs": codecs_,
        "attributes": {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def _write_root(path: Path, fingerprint: dict, source: dict | None = None) -> None:
    meta = {"format_version": FORMAT_VERSION, "model": fingerprint}
    if source:
        meta["source"] = source
    validate("bundle", meta, "new bundle")
    _write_json(path / "zarr.json", _group({"maskstore": meta}))
    _write_json(path / "personas" / "zarr.json", _group())


class create_bundle:
    """Create a new directory bundle atomically.

    Use as a context manager; the bundle appears at ``path`` only when the block exits without an
    error. With ``force``, an existing bundle at ``path`` is replaced only at that moment.

    Args:
        path: destination directory (must not exist unless ``force``).
        fingerprint: the model fingerprint (see :func:`maskstore.model_fingerprint`).
        force: replace an existing bundle on success.
        source: where the base model came from: ``model`` (id or path), ``revision``, ``dtype``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fingerprint: dict,
        force: bool = False,
        source: dict | None = None,
    ) -> None:
        self.path = Path(path)
        mods = fingerprint.get("modules") if isinstance(fingerprint, dict) else None
        for name in mods if isinstance(mods, dict) else ():
            check_module_name(name)  # the one name rule, at write time: nothing unreadable
        if self.path.is_symlink():
            raise MaskstoreError(f"{self.path} is a symlink: choose another output")
        if self.path.exists() and not force:
            raise MaskstoreError(
                f"{self.path} already exists: choose another output or pass force=True"
            )
        if self.path.exists() and not (self.path / "zarr.json").exists():
            raise MaskstoreError(f"{self.path} exists and is not a bundle: refusing to replace it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_sibling(self.path)
        _write_root(self._tmp, fingerprint, source)
        self.bundle = WritableBundle(self._tmp)

    def __enter__(self) -> WritableBundle:
        return self.bundle

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            return
        shutil.rmtree(self._tmp / STAGING, ignore_errors=True)
        if self.path.exists():
            trash = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(self.path, trash)
            os.rename(self._tmp, self.path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self._tmp, self.path)
        self.bundle.path = self.path
        self.bundle.source = StoreSource(LocalStore(self.path), str(self.path))


class PersonaWriter:
    """Writes one persona module by module into a staging folder, then renames it into place.

    Use as a context manager: on a clean exit the persona appears whole; on an error (or a kill)
    nothing of it is visible.
    """

    def __init__(
        self,
        bundle: Bundle,
        name: str,
        *,
        method: str,
        params: dict | None = None,
        sparsity: float | None = None,
        calibration: dict | None = None,
        provenance: dict | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        codec: str = "zstd",
        level: int | None = None,
        overwrite: bool = False,
    ) -> None:
        self.bundle = bundle
        self.name = check_persona_name(name)
        if name in bundle.personas and not overwrite:
            raise MaskstoreError(
                f"persona {name!r} already exists in {bundle.path}: pick another name"
            )
        self.overwrite = overwrite
        self.meta: dict[str, Any] = {
            "name": name,
            "method": method,
            "params": params or {},
            "sparsity": sparsity,
            "calibration": calibration,
            "provenance": provenance or {"op": "write", "operands": []},
            "tool_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "model_digest": bundle.fingerprint_digest,
            "modules": {},
        }
        self.chunk_bytes = chunk_bytes
        self.codec_name, self.level = codec, level
        compressor(codec, level)  # fail early on an unknown codec
        # .staging/<pid>-<random>: a folder whose process died is reclaimed by the next writer
        _reclaim_staging(bundle.path / STAGING)
        self._dir = bundle.path / STAGING / f"{os.getpid()}-{uuid.uuid4().hex}"
        self._dir.mkdir(parents=True)
        for sub in ("", "masks/", "stats/"):
            _write_json(self._dir / f"{sub}zarr.json", _group())
        self._root: Any = None  # a zarr group, opened only for codecs zarr must write

    def _write_array(
        self,
        kind: str,
        module: str,
        blocks: Iterator[np.ndarray],
        shape: tuple[int, ...],
        dtype: type,
        extra: dict,
        kept_share: float | None = None,
        sample: np.ndarray | None = None,
    ) -> str:
        dt = np.dtype(dtype).newbyteorder("<")
        row_bytes = max(1, int(np.prod(shape[1:])) * dt.itemsize)
        rows = max(1, min(shape[0], self.chunk_bytes // row_bytes)) if shape[0] else 1
        folder = self._dir / kind / module
        if self.codec_name in ("zstd", "none"):
            # maskstore's zarr profile, written directly (zarr reads it back as any array)
            level = None
            if self.codec_name == "zstd":
                level = self.level if self.level is not None else codecs.zstd_level(kept_share)
                if self.level is None and not codecs.is_skewed(kept_share):
                    if sample is not None and codecs.incompressible(sample):
                        level = None
            zmeta = _array_meta(shape, rows, dt, level)

            def store_chunk(i: int, chunk: np.ndarray) -> None:
                data = chunk.tobytes()
                if level is not None:
                    data = codecs.zstd_compress(data, level)
                out = folder / "c" / str(i) / "0"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(data)

        else:
            arr = self._zarr_array(kind, module, shape, rows, dtype, kept_share, sample)
            zmeta = None

            def store_chunk(i: int, chunk: np.ndarray) -> None:
                arr[i * rows : i * rows + chunk.shape[0]] = chunk

        hasher = ArrayHasher(np.dtype(dtype), shape)
        chunk_digests: list[str] = []
        buf = np.empty((rows, *shape[1:]), dtype=dt)
        filled, r0 = 0, 0

        def flush(n: int) -> None:
            nonlocal r0
            chunk_digests.append(xxh3(buf[:n]))
            if n < rows and zmeta is not None:
                buf[n:] = 0  # zarr stores an edge chunk whole, padded with the fill value
                store_chunk(len(chunk_digests) - 1, buf)
            else:
                store_chunk(len(chunk_digests) - 1, buf[:n])
            r0 += n

        for block in blocks:  # regroup arbitrary row blocks into whole chunks
            block = np.asarray(block, dtype=dtype)
            i = 0
            while i < block.shape[0]:
                take = min(rows - filled, block.shape[0] - i)
                buf[filled : filled + take] = block[i : i + take]
                hasher.update(block[i : i + take])
                filled += take
                i += take
                if filled == rows:
                    flush(rows)
                    filled = 0
        if filled:
            flush(filled)
        if r0 != shape[0]:
            raise MaskstoreError(f"{module}: wrote {r0} rows, expected {shape[0]}")
        digest = hasher.hexdigest()
        ameta = {
            "kind": "mask" if kind == "masks" else "stats",
            "digest": digest,
            "chunk_digests": chunk_digests,
            **extra,
        }
        if zmeta is not None:
            zmeta["attributes"] = {"maskstore": ameta}
            _write_json(folder / "zarr.json", zmeta)
        else:
            arr.attrs["maskstore"] = ameta
        return digest

    def _zarr_array(
        self,
        kind: str,
        module: str,
        shape: tuple[int, ...],
        rows: int,
        dtype: type,
        kept_share: float | None,
        sample: np.ndarray | None,
    ) -> Any:
        """A zarr array for codecs that maskstore does not write itself (blosc, gzip)."""
        import zarr
        import zarr.storage

        if self._root is None:
            self._root = zarr.open_group(zarr.storage.LocalStore(self._dir), mode="r+")
        c = compressor(self.codec_name, self.level, kept_share, sample)
        return self._root.create_array(
            f"{kind}/{module}",
            shape=shape,
            chunks=(rows, *shape[1:]),
            dtype=dtype,
            compressors=[c] if c else None,
            fill_value=0,
        )

    def _module(self, module: str) -> ModuleInfo:
        """The fingerprint entry of a module not yet written."""
        info = self.bundle.modules.get(module)
        if info is None:
            raise MaskstoreError(f"module {module!r} is not in the bundle's model fingerprint")
        if module in self.meta["modules"]:
            raise MaskstoreError(f"module {module!r} written twice for persona {self.name!r}")
        return info

    @staticmethod
    def _check_padding(module: str, info: ModuleInfo, packed: np.ndarray) -> None:
        tail = info.in_features % 8
        if tail and packed.size and np.any(packed[:, -1] >> tail):
            raise MaskstoreError(f"{module}: packed mask has non-zero padding bits")

    def write_mask(self, module: str, mask: Any, packed: bool = False) -> None:
        """Write one module's mask: bool ``(out, in)`` (numpy or torch), or packed ``uint8`` rows
        ``(out, ceil(in/8))`` with ``packed=True``."""
        info = self._module(module)
        if not packed:
            if tuple(mask.shape) != (info.out_features, info.in_features):
                raise MaskstoreError(
                    f"{module}: mask shape {tuple(mask.shape)} != weight shape "
                    f"{(info.out_features, info.in_features)}"
                )
            mask = pack(mask)
        shape = (info.out_features, packed_width(info.in_features))
        if mask.shape != shape or mask.dtype != np.uint8:
            raise MaskstoreError(
                f"{module}: packed mask must be uint8 {shape}, got {mask.dtype} {mask.shape}"
            )
        self._check_padding(module, info, mask)
        kept = popcount(mask)
        digest = self._write_array(
            "masks",
            module,
            iter([mask]),
            shape,
            np.uint8,
            {"in_features": info.in_features},
            kept_share=kept / max(info.numel, 1),
            sample=mask,
        )
        self.meta["modules"][module] = {"mask": digest, "kept": kept, "stats": None}

    def write_packed_blocks(self, module: str, blocks: Iterator[np.ndarray]) -> None:
        """Stream packed row blocks of one module (rows in order) without holding the whole mask."""
        info = self._module(module)
        shape = (info.out_features, packed_width(info.in_features))
        kept = 0
        blocks = iter(blocks)
        first = next(blocks, None)
        share = None  # the codec level follows the first block's kept share
        if first is not None and first.size:
            share = popcount(first) / (first.shape[0] * info.in_features)

        def counted():
            nonlocal kept
            for b in itertools.chain([] if first is None else [first], blocks):
                b = np.asarray(b)
                if b.dtype != np.uint8 or b.ndim != 2 or b.shape[1] != shape[1]:
                    raise MaskstoreError(
                        f"{module}: packed blocks must be uint8 rows of {shape[1]} bytes"
                    )
                self._check_padding(module, info, b)
                kept += popcount(b)
                yield b

        digest = self._write_array(
            "masks",
            module,
            counted(),
            shape,
            np.uint8,
            {"in_features": info.in_features},
            kept_share=share,
            sample=first,
        )
        self.meta["modules"][module] = {"mask": digest, "kept": kept, "stats": None}

    def write_stats(self, module: str, stats: ChannelStats) -> None:
        """Attach calibration statistics to a module whose mask was written."""
        if module not in self.meta["modules"]:
            raise MaskstoreError(f"write the mask of {module!r} before its statistics")
        arr, names = stats.to_array()
        digest = self._write_array("stats", module, iter([arr]), arr.shape, np.float64, {})
        self.meta["modules"][module]["stats"] = {
            "digest": digest,
            "rows": names,
            "tokens": int(stats.tokens),
            "samples": int(stats.samples),
        }

    def commit(self) -> dict:
        """Seal the metadata and rename the persona into place; return its metadata."""
        self.meta["digest"] = persona_digest(self.meta)
        validate("persona", self.meta, f"persona {self.name!r}")
        _write_json(self._dir / "zarr.json", _group({"maskstore": self.meta}))
        dest = self.bundle.path / "personas" / self.name
        if dest.exists():
            if not self.overwrite:
                raise MaskstoreError(f"persona {self.name!r} appeared while writing: not replaced")
            trash = self.bundle.path / STAGING / f"old-{uuid.uuid4().hex}"
            os.rename(dest, trash)
            os.rename(self._dir, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self._dir, dest)
        self.bundle._personas.pop(self.name, None)
        return self.meta

    def abort(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PersonaWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def pack_zip(src: str | os.PathLike, dest: str | os.PathLike, force: bool = False) -> Path:
    """Copy a directory bundle into a single ``.zip`` (stored, not recompressed), atomically."""
    src, dest = Path(src), Path(dest)
    Bundle(src)  # validates
    if dest.exists() and not force:
        raise MaskstoreError(f"{dest} already exists: choose another name or pass force=True")
    if not dest.parent.is_dir():
        raise MaskstoreError(f"{dest.parent} does not exist: create it first")
    files = []
    for folder, dirs, names in os.walk(src):  # os.walk never descends into linked folders
        for n in sorted(dirs + names):
            f = Path(folder) / n
            rel = f.relative_to(src).as_posix()
            if rel.startswith(STAGING):
                continue
            mode = f.lstat().st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise MaskstoreError(
                    f"refusing to pack {src}: {rel} is a symbolic link or a special file"
                )
            if stat.S_ISREG(mode):
                files.append((f, rel))
    tmp = temp_sibling(dest)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for f, rel in sorted(files, key=lambda x: x[1]):
                zf.write(f, rel)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def temp_sibling(dest: Path) -> Path:
    """A temporary name next to ``dest`` that names this process (``.NAME.tmp-PID-RANDOM``),
    after removing those that processes of this host left when they died."""
    for old in dest.parent.glob(f".{dest.name}.tmp-*"):
        pid = old.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    return dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _reclaim_staging(staging: Path) -> None:
    """Remove the staging folders of writers that died (``<pid>-<random>``, pid gone)."""
    if not staging.is_dir():
        return
    for old in staging.iterdir():
        pid = old.name.split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


EXPORT_MARK = ".maskstore-export"  # in every folder new_folder writes: what force may replace


def check_output_folder(
    out: str | os.PathLike, force: bool = False, protect: tuple[str | os.PathLike, ...] = ()
) -> None:
    """Refuse, before any work, an output :func:`new_folder` would refuse (see there)."""
    out = Path(out)
    if out.is_symlink():
        raise MaskstoreError(f"{out} is a symlink: choose another output")
    if out.exists():
        if not force:
            raise MaskstoreError(f"{out} already exists: choose another output or pass force=True")
        if not out.is_dir() or not (out / EXPORT_MARK).is_file():
            raise MaskstoreError(
                f"{out} exists and maskstore did not write it: force=True replaces only an "
                "earlier export; remove it yourself or choose another --out"
            )
        real = out.resolve()
        for p in protect:
            src = Path(p).resolve()
            if src == real or real in src.parents:
                raise MaskstoreError(f"{out} holds the source {p}: choose another --out")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MaskstoreError(f"{parent} is a file: choose another --out")
            break


@contextlib.contextmanager
def new_folder(
    out: str | os.PathLike, force: bool = False, protect: tuple[str | os.PathLike, ...] = ()
) -> Iterator[Path]:
    """A folder written beside ``out`` (its parents created) and renamed into place when the
    block succeeds; removed when the block fails.

    An existing ``out`` is replaced only with ``force``, and only when maskstore wrote it (it
    holds :data:`EXPORT_MARK`): never a folder of other files, a file, a symlink, or one of
    ``protect`` (the source being exported) or a folder holding one.
    """
    out = Path(out)
    check_output_folder(out, force, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / EXPORT_MARK).write_text('{"written_by": "maskstore"}\n')
        if out.exists():
            old = temp_sibling(out)
            os.rename(out, old)  # out is replaced in one rename; the old one removed after
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
