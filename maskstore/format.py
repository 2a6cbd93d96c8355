"""The on-disk bundle: a zarr v3 group of bit-packed persona masks and their statistics.

Layout (see ``schemas/FORMAT.md`` for the full specification)::

    bundle/zarr.json                          root group; attrs["maskstore"] = bundle metadata
    bundle/personas/<name>/zarr.json          persona group; attrs["maskstore"] = persona metadata
    bundle/personas/<name>/masks/<module>     uint8 (out, ceil(in/8)), little bit order
    bundle/personas/<name>/stats/<module>     float64 (rows, in): sum, sumsq, norm_mean, norm_m2, ...

A persona is written into ``bundle/.staging/<random>`` and renamed into place when complete, and
a new bundle is written next to its destination and renamed into place: a reader sees a persona
(or a bundle) whole or not at all.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import fastjsonschema
import numcodecs
import numpy as np
import torch
import zarr
import zarr.storage
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from . import __version__
from .bits import pack, packed_width, popcount, unpack
from .chunks import ArrayReader, parse_meta
from .errors import IntegrityError, MaskstoreError
from .hashing import ArrayHasher, metadata_digest, xxh3
from .stats import ChannelStats

FORMAT_VERSION = 1
DEFAULT_CHUNK_BYTES = 2 << 20  # about 2 MiB of packed mask per chunk
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]{0,127}$")
_STAGING = ".staging"
# Fields of persona metadata left out of its digest: they change run to run for identical content.
_VOLATILE = ("name", "created", "tool_version", "digest")


# --------------------------------------------------------------------------------------------
# Metadata helpers


def _schema(name: str) -> dict:
    return json.loads(
        resources.files("maskstore.schemas").joinpath(f"{name}.schema.json").read_text()
    )


_VALIDATORS: dict[str, Callable[[Any], Any]] = {}


def validate(kind: str, meta: Any, where: str) -> None:
    """Validate ``meta`` against ``schemas/<kind>.schema.json``; raise a one-line error."""
    if kind not in _VALIDATORS:
        _VALIDATORS[kind] = fastjsonschema.compile(_schema(kind))
    try:
        _VALIDATORS[kind](meta)
    except fastjsonschema.JsonSchemaException as err:
        raise MaskstoreError(
            f"{where}: metadata fails {kind}.schema.json: {err.message}; "
            "the bundle is damaged or was written by another tool"
        ) from None


def check_persona_name(name: str) -> str:
    """Return ``name`` if it is a valid persona name, else raise a clear error."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise MaskstoreError(
            f"invalid persona name {name!r}: use 1-128 letters, digits and _ . + = - "
            "(starting with a letter or digit, no '..', no '/')"
        )
    return name


def persona_digest(meta: dict) -> str:
    """xxh3-128 of the canonical JSON of a persona's metadata without its volatile fields."""
    return metadata_digest({k: v for k, v in meta.items() if k not in _VOLATILE})


def compressor(
    name: str = "zstd",
    level: int | None = None,
    kept_share: float | None = None,
    sample: np.ndarray | None = None,
):
    """A stock zarr v3 codec by name: zstd (default), blosc, gzip or none.

    With zstd and no explicit level, the codec follows the data: a skewed mask (kept share below
    0.35 or above 0.65) gets level 16, whose entropy coder lands within 5% of H(p) where level 3
    is 17% off (benchmarks/bench_storage.py); otherwise level 3, unless a trial compression of
    ``sample`` (the first MiB) saves under 2%, in which case the array is stored raw: the bits
    are incompressible and reading them skips a decode.
    """
    if name == "zstd":
        if level is None:
            skewed = kept_share is not None and abs(kept_share - 0.5) > 0.15
            level = 16 if skewed else 3
            if not skewed and sample is not None and sample.size:
                head = np.ascontiguousarray(sample).reshape(-1)[: 1 << 20]
                if len(numcodecs.Zstd(level=3).encode(head)) >= 0.98 * head.size * head.itemsize:
                    return None
        return ZstdCodec(level=level)
    if name == "blosc":
        return BloscCodec(cname="zstd", clevel=5 if level is None else level, shuffle="bitshuffle")
    if name == "gzip":
        return GzipCodec(level=6 if level is None else level)
    if name == "none":
        return None
    raise MaskstoreError(f"unknown compressor {name!r}: use zstd, blosc, gzip or none")


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


# --------------------------------------------------------------------------------------------
# Reading


class Bundle:
    """A lazily opened bundle: only metadata is read until an array is asked for.

    Args:
        path: a bundle directory or a ``.zip`` of one.
        writable: open a directory bundle for adding personas.
    """

    def __init__(self, path: str | os.PathLike, writable: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise MaskstoreError(f"no bundle at {self.path}: check the path")
        self.is_zip = self.path.is_file()
        if self.is_zip and writable:
            raise MaskstoreError(
                f"{self.path} is a zip bundle and read-only: unzip it to modify it"
            )
        try:
            if self.is_zip:
                self._zip = zipfile.ZipFile(self.path)  # central directory only: names, sizes
                self._store = zarr.storage.ZipStore(self.path, mode="r")
            else:
                self._store = zarr.storage.LocalStore(self.path, read_only=True)
            root = zarr.open_group(self._store, mode="r", zarr_format=3)
            attrs = root.attrs.asdict()
        except MaskstoreError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure here means "not a bundle"
            raise MaskstoreError(
                f"{self.path} is not a readable maskstore bundle ({type(e).__name__}): "
                "it may be truncated or half-written"
            ) from None
        meta = attrs.get("maskstore")
        if not isinstance(meta, dict):
            raise MaskstoreError(f"{self.path} is a zarr group but not a maskstore bundle")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise MaskstoreError(
                f"{self.path} has format version {version!r}; this maskstore reads version "
                f"{FORMAT_VERSION}: upgrade maskstore"
            )
        validate("bundle", meta, str(self.path))
        self.meta = meta
        self.writable = writable
        self._personas: dict[str, dict] = {}

    # ---- model and modules
    @property
    def fingerprint(self) -> dict:
        return self.meta["model"]

    @cached_property
    def modules(self) -> dict[str, ModuleInfo]:
        return {n: ModuleInfo(n, *s) for n, s in self.fingerprint["modules"].items()}

    # ---- personas
    @property
    def personas(self) -> list[str]:
        """Names of complete personas, sorted."""
        if self.is_zip:
            names = {
                k.split("/")[1]
                for k in self._zip.namelist()
                if k.startswith("personas/") and k.count("/") == 2 and k.endswith("/zarr.json")
            }
            return sorted(names)
        pdir = self.path / "personas"
        if not pdir.is_dir():
            return []
        return sorted(p.name for p in pdir.iterdir() if (p / "zarr.json").is_file())

    def persona(self, name: str) -> dict:
        """A persona's metadata (validated), read once and cached."""
        if name not in self._personas:
            if name not in self.personas:
                known = ", ".join(self.personas) or "none"
                raise MaskstoreError(f"unknown persona {name!r} in {self.path}; known: {known}")
            try:
                g = zarr.open_group(self._store, path=f"personas/{name}", mode="r", zarr_format=3)
                meta = g.attrs.asdict().get("maskstore")
            except Exception as e:  # noqa: BLE001
                raise MaskstoreError(
                    f"persona {name!r} in {self.path} has unreadable metadata ({type(e).__name__})"
                ) from None
            validate("persona", meta, f"{self.path} persona {name!r}")
            if persona_digest(meta) != meta["digest"]:
                raise IntegrityError(
                    f"persona {name!r} in {self.path}: metadata digest mismatch (edited or damaged); "
                    "rebuild or restore it"
                )
            self._personas[name] = meta
        return self._personas[name]

    def persona_modules(self, name: str) -> list[str]:
        return list(self.persona(name)["modules"])

    @property
    def digest(self) -> str:
        """Bundle digest: xxh3-128 over format version, fingerprint and persona digests."""
        return metadata_digest(
            {
                "format_version": FORMAT_VERSION,
                "model": self.fingerprint,
                "personas": {p: self.persona(p)["digest"] for p in self.personas},
            }
        )

    # ---- arrays
    def _get(self, key: str) -> bytes | None:
        """Raw bytes stored under ``key`` (None when absent)."""
        try:
            return self._zip.read(key) if self.is_zip else (self.path / key).read_bytes()
        except (FileNotFoundError, KeyError, IsADirectoryError):
            return None

    def _read_into(self, key: str, buf: bytearray) -> int | bytes | None:
        """Read the object under ``key`` into ``buf`` and return its size (bytes if it does not
        fit or the bundle is a zip; None when absent)."""
        if self.is_zip:
            return self._get(key)
        try:
            with open(self.path / key, "rb", buffering=0) as f:
                n = f.readinto(buf)
                if n < len(buf):
                    return n
                return bytes(buf) + f.read()
        except (FileNotFoundError, IsADirectoryError):
            return None

    def _array(self, persona: str, kind: str, module: str) -> tuple[ArrayReader, dict]:
        meta = self.persona(persona)
        if module not in meta["modules"]:
            raise MaskstoreError(f"persona {persona!r} has no module {module!r}")
        path = f"personas/{persona}/{kind}/{module}"
        try:
            reader = ArrayReader(
                parse_meta(self._get(f"{path}/zarr.json")),
                read_into=lambda key, buf: self._read_into(f"{path}/{key}", buf),
                fallback=lambda: zarr.open_array(self._store, path=path, mode="r", zarr_format=3),
            )
            ameta = reader.attrs.get("maskstore")
        except Exception as e:  # noqa: BLE001
            raise IntegrityError(
                f"{path} in {self.path} is missing or unreadable ({type(e).__name__}): "
                "the bundle is truncated; restore it"
            ) from None
        validate("array", ameta, f"{self.path} {path}")
        return reader, ameta

    def iter_chunks(
        self, persona: str, module: str, kind: str = "masks"
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, block)`` chunk by chunk, each verified against its xxh3 digest.

        A block is a view into a reused buffer, valid until the next step: copy it to keep it.

        Raises:
            IntegrityError: naming the chunk, when its bytes do not match.
        """
        arr, ameta = self._array(persona, kind, module)
        return self._verified_chunks(arr, ameta, f"personas/{persona}/{kind}/{module}")

    def _verified_chunks(self, arr, ameta: dict, where: str) -> Iterator[tuple[int, np.ndarray]]:
        digests = ameta["chunk_digests"]
        if len(digests) != arr.nchunks:
            raise IntegrityError(f"{where}: chunk digest list does not match the array shape")
        rows = arr.chunk_shape[0]
        blocks = arr.chunks()
        for i in range(arr.nchunks):
            try:
                block = next(blocks)
            except Exception as e:  # noqa: BLE001
                raise IntegrityError(
                    f"{self.path}: chunk {i} of {where} cannot be decoded ({type(e).__name__}); "
                    "the bundle is damaged: restore it"
                ) from None
            if xxh3(block) != digests[i]:
                raise IntegrityError(
                    f"{self.path}: chunk {i} of {where} fails its xxh3 digest; "
                    "the bundle is damaged: restore it"
                )
            yield i * rows, block

    def read_packed(self, persona: str, module: str) -> np.ndarray:
        """One module's mask as packed ``uint8`` rows ``(out, ceil(in/8))``, verified."""
        info = self.modules[module]
        out = np.empty((info.out_features, packed_width(info.in_features)), dtype=np.uint8)
        for r0, block in self.iter_chunks(persona, module):
            out[r0 : r0 + block.shape[0]] = block
        return out

    def read_mask(
        self, persona: str, module: str, as_torch: bool = False
    ) -> np.ndarray | torch.Tensor:
        """One module's mask unpacked to bool ``(out, in)`` (numpy, or torch with ``as_torch``)."""
        m = unpack(self.read_packed(persona, module), self.modules[module].in_features)
        return torch.from_numpy(m) if as_torch else m

    def read_stats(self, persona: str, module: str) -> ChannelStats:
        """The calibration statistics stored with a persona's module."""
        entry = self.persona(persona)["modules"].get(module, {}).get("stats")
        if not entry:
            raise MaskstoreError(
                f"persona {persona!r} stores no statistics for {module!r}: rebuild it from a model"
            )
        blocks = [b.copy() for _, b in self.iter_chunks(persona, module, kind="stats")]
        arr = np.concatenate(blocks) if blocks else np.empty((0, 0))
        return ChannelStats.from_array(arr, entry["rows"], entry["tokens"], entry["samples"])

    def has_stats(self, persona: str) -> bool:
        mods = self.persona(persona)["modules"].values()
        return bool(mods) and all(m.get("stats") for m in mods)

    def nbytes_on_disk(self, persona: str | None = None, kind: str | None = None) -> int:
        """Bytes stored for one persona (or the whole bundle); ``kind`` = masks or stats only."""
        pre = "personas/" + (f"{persona}/" if persona else "") if persona or kind else ""
        if self.is_zip:
            return sum(
                i.compress_size
                for i in self._zip.infolist()
                if i.filename.startswith(pre) and (kind is None or f"/{kind}/" in i.filename)
            )
        root = self.path / pre if pre else self.path
        files = (f for f in root.rglob("*") if f.is_file())
        return sum(f.stat().st_size for f in files if kind is None or f"/{kind}/" in f.as_posix())

    # ---- verification
    def verify(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Recompute every digest; return one line per problem (empty when all match).

        Args:
            progress: called with 1 after each persona.
        """
        problems: list[str] = []
        for p in self.personas:
            if progress:
                progress(1)
            try:
                meta = self.persona(p)
            except MaskstoreError as e:
                problems.append(str(e))
                continue
            for module, entry in meta["modules"].items():
                kinds = [("masks", entry["mask"])]
                if entry.get("stats"):
                    kinds.append(("stats", entry["stats"]["digest"]))
                for kind, want in kinds:
                    try:
                        arr, ameta = self._array(p, kind, module)
                        h = ArrayHasher(arr.dtype, arr.shape)
                        where = f"personas/{p}/{kind}/{module}"
                        for _, block in self._verified_chunks(arr, ameta, where):
                            h.update(block)
                        if h.hexdigest() != ameta["digest"] or ameta["digest"] != want:
                            problems.append(
                                f"{self.path}: personas/{p}/{kind}/{module} array digest mismatch"
                            )
                    except MaskstoreError as e:
                        problems.append(str(e))
        return problems

    # ---- writing
    def persona_writer(self, name: str, **meta: Any) -> PersonaWriter:
        """Start writing a new persona into this (directory) bundle; see :class:`PersonaWriter`."""
        if not self.writable:
            raise MaskstoreError(f"{self.path} was opened read-only")
        return PersonaWriter(self, name, **meta)

    def close(self) -> None:
        if self.is_zip:
            self._store.close()
            self._zip.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, personas={self.personas})"


def open_bundle(path: str | os.PathLike, writable: bool = False) -> Bundle:
    """Open a bundle directory, a ``.zip`` of one, or a repository version ``REPO@REF``, lazily.

    See :class:`Bundle` (and :class:`maskstore.repo.Snapshot` for versions).
    """
    s = str(path)
    if (
        "@" in s
        and not Path(s).exists()
        and (Path(s.rsplit("@", 1)[0]) / "maskstore-repo.json").exists()
    ):
        if writable:
            raise MaskstoreError(
                f"{s} is a stored version and read-only: check it out to modify it"
            )
        from .repo import open_version

        return open_version(s)
    return Bundle(path, writable=writable)


# --------------------------------------------------------------------------------------------
# Writing


def _write_root(path: Path, fingerprint: dict) -> None:
    meta = {"format_version": FORMAT_VERSION, "model": fingerprint}
    validate("bundle", meta, "new bundle")
    root = zarr.open_group(zarr.storage.LocalStore(path), mode="w", attributes={"maskstore": meta})
    root.create_group("personas")


class create_bundle:  # noqa: N801 - used as a function / context manager
    """Create a new directory bundle atomically.

    Use as a context manager; the bundle appears at ``path`` only when the block exits without an
    error. With ``force``, an existing bundle at ``path`` is replaced only at that moment.

    Args:
        path: destination directory (must not exist unless ``force``).
        fingerprint: the model fingerprint (see :func:`maskstore.model_fingerprint`).
        force: replace an existing bundle on success.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict, force: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not force:
            raise MaskstoreError(
                f"{self.path} already exists: choose another --out or pass --force"
            )
        if self.path.exists() and not (self.path / "zarr.json").exists():
            raise MaskstoreError(f"{self.path} exists and is not a bundle: refusing to replace it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:12]}"
        _write_root(self._tmp, fingerprint)
        self.bundle = Bundle(self._tmp, writable=True)

    def __enter__(self) -> Bundle:
        return self.bundle

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            return
        shutil.rmtree(self._tmp / _STAGING, ignore_errors=True)
        if self.path.exists():
            trash = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(self.path, trash)
            os.rename(self._tmp, self.path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self._tmp, self.path)
        self.bundle.path = self.path
        self.bundle._store = zarr.storage.LocalStore(self.path, read_only=True)  # noqa: SLF001


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
            "modules": {},
        }
        self.chunk_bytes = chunk_bytes
        self.codec_name, self.level = codec, level
        compressor(codec, level)  # fail early on an unknown codec
        self._dir = bundle.path / _STAGING / uuid.uuid4().hex
        self._dir.mkdir(parents=True)
        self._store = zarr.storage.LocalStore(self._dir)
        self._root = zarr.open_group(self._store, mode="w")
        self._root.create_group("masks")
        self._root.create_group("stats")

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
        row_bytes = max(1, int(np.prod(shape[1:])) * np.dtype(dtype).itemsize)
        rows = max(1, min(shape[0], self.chunk_bytes // row_bytes)) if shape[0] else 1
        arr = self._root.create_array(
            f"{kind}/{module}",
            shape=shape,
            chunks=(rows, *shape[1:]),
            dtype=dtype,
            compressors=[c]
            if (c := compressor(self.codec_name, self.level, kept_share, sample))
            else None,
            fill_value=0,
        )
        hasher = ArrayHasher(np.dtype(dtype), shape)
        chunk_digests: list[str] = []
        buf = np.empty((rows, *shape[1:]), dtype=dtype)
        filled, r0 = 0, 0

        def flush(n: int) -> None:
            nonlocal r0
            arr[r0 : r0 + n] = buf[:n]
            chunk_digests.append(xxh3(buf[:n]))
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
        arr.attrs["maskstore"] = ameta
        return digest

    def write_mask(
        self, module: str, mask: np.ndarray | torch.Tensor, packed: bool = False
    ) -> None:
        """Write one module's mask: bool ``(out, in)``, or packed rows with ``packed=True``."""
        info = self.bundle.modules.get(module)
        if info is None:
            raise MaskstoreError(f"module {module!r} is not in the bundle's model fingerprint")
        if module in self.meta["modules"]:
            raise MaskstoreError(f"module {module!r} written twice for persona {self.name!r}")
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
        tail = info.in_features % 8
        if tail and np.any(mask[:, -1] >> tail):
            raise MaskstoreError(f"{module}: packed mask has non-zero padding bits")
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
        info = self.bundle.modules[module]
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
        self._root.attrs["maskstore"] = self.meta
        dest = self.bundle.path / "personas" / self.name
        if dest.exists():
            if not self.overwrite:
                raise MaskstoreError(f"persona {self.name!r} appeared while writing: not replaced")
            trash = self.bundle.path / _STAGING / f"old-{uuid.uuid4().hex}"
            os.rename(dest, trash)
            os.rename(self._dir, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self._dir, dest)
        self.bundle._personas.pop(self.name, None)  # noqa: SLF001
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
        raise MaskstoreError(f"{dest} already exists: choose another name or pass --force")
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for f in sorted(src.rglob("*")):
                rel = f.relative_to(src).as_posix()
                if f.is_file() and not rel.startswith(_STAGING):
                    zf.write(f, rel)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
