"""A Hugging Face checkpoint's safetensors files, read without trusting them.

Headers are bounded and checked (every tensor lies inside its file, a sharded index names only
files in its folder, FIFOs and devices are refused without blocking). Tensors come back either
read into their own memory (:meth:`Checkpoint.get`, what offloading wants: pages of blocks
already done must not stay resident) or as read-only memory maps (:meth:`Checkpoint.map`, what
a persona switch restores base values from, so they cost no RAM of their own).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .errors import MaskstoreError
from .files import open_regular

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_MAX_HEADER = 100 << 20


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _open_regular(path: Path):
    """``path`` opened for reading if it is a regular file (after symlinks, as the Hugging
    Face cache uses them); a FIFO or device is refused without blocking."""
    return open_regular(path, "model weights file")


class Checkpoint:
    """Tensors by name from a folder's safetensors files, each read with plain file reads into
    its own memory when asked (no memory map: pages of blocks already done must not stay
    resident)."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                with _open_regular(index) as fh:
                    weight_map = json.loads(fh.read(_MAX_HEADER))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise MaskstoreError(
                    f"{index} is not a safetensors index (JSON with a weight_map): restore it"
                ) from None
            for f in files:
                if not isinstance(f, str) or Path(f).name != f or f in (".", ".."):
                    raise MaskstoreError(
                        f"{index} names {f!r}, not a file in {folder}: refusing to read it"
                    )
        else:
            files = [f.name for f in sorted(folder.glob("*.safetensors"))]
        if not files:
            raise MaskstoreError(f"{folder} has no .safetensors weights to read")
        self._where: dict[str, tuple[Path, int, torch.dtype, list[int], int]] = {}
        self._seen: dict[Path, tuple[int, int, int, int]] = {}  # what each file was when read
        for f in files:
            path = folder / f
            with _open_regular(path) as fh:
                st = os.fstat(fh.fileno())
                size = st.st_size
                self._seen[path] = _identity(st)
                head = fh.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if not 0 < n <= min(_MAX_HEADER, size - 8):
                    raise MaskstoreError(f"{path} is not a safetensors file (bad header size)")
                try:
                    header = json.loads(fh.read(n))
                except ValueError:
                    raise MaskstoreError(f"{path} has a damaged safetensors header") from None
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                try:
                    dtype = _DTYPES[info["dtype"]]
                    shape = [int(x) for x in info["shape"]]
                    start, end = (int(x) for x in info["data_offsets"])
                except (KeyError, TypeError, ValueError):
                    raise MaskstoreError(
                        f"{path}: tensor {name!r} has a bad header entry"
                    ) from None
                numel = 1
                for x in shape:
                    numel *= x
                if (
                    min(shape, default=1) < 0
                    or end - start != numel * dtype.itemsize
                    or not 0 <= start <= end <= size - 8 - n
                ):
                    raise MaskstoreError(f"{path}: tensor {name!r} lies outside the file")
                self._where[name] = (path, 8 + n + start, dtype, shape, end - start)

    def get(self, name: str) -> torch.Tensor:
        try:
            path, offset, dtype, shape, nbytes = self._where[name]
        except KeyError:
            raise MaskstoreError(
                f"the checkpoint has no tensor {name!r}: this architecture's weights are named "
                "differently; build without `offload`"
            ) from None
        out = torch.empty(shape, dtype=dtype)
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
        with _open_regular(path) as fh:
            fh.seek(offset)
            if fh.readinto(buf) != nbytes:
                raise MaskstoreError(f"{path} ends inside tensor {name!r}: the file is truncated")
        return out

    def map(self, name: str) -> torch.Tensor | None:
        """Tensor ``name`` as a read-only memory map of its file (None if the checkpoint has
        no such tensor). Its pages are the page cache's, shared and reclaimable: the tensor
        costs no RAM of its own. Never write to it."""
        where = self._where.get(name)
        if where is None:
            return None
        path, offset, dtype, shape, nbytes = where
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        with _open_regular(path) as fh:  # a regular file, not a FIFO swapped in meanwhile
            if os.fstat(fh.fileno()).st_size < offset + nbytes:
                raise MaskstoreError(f"{path} ends inside tensor {name!r}: the file is truncated")
            raw = np.memmap(fh, dtype=np.uint8, mode="r", offset=offset, shape=(nbytes,))
        with warnings.catch_warnings():  # torch warns that the map is not writable: it is not
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(raw).view(dtype).view(shape)

    def check_unchanged(self) -> None:
        """Raise if a file changed on disk since it was read (rewritten in place, truncated or
        replaced): a memory map of it would then return other bytes, or fault."""
        for path, seen in self._seen.items():
            try:
                now = _identity(os.stat(path))
            except OSError:
                now = None
            if now != seen:
                raise MaskstoreError(
                    f"{path} changed on disk while its weights were in use: reload the model "
                    "from it (and attach again)"
                )

    def untouched(self, tensors: Mapping[str, torch.Tensor]) -> set[str]:
        """The names whose tensor is a never-written private memory map of this checkpoint's
        own bytes for that name (how ``from_pretrained`` leaves safetensors weights on CPU):
        such a tensor equals the file without a byte being compared. Read from
        ``/proc/self/smaps`` (a mapping with no anonymous page has had no write); elsewhere
        than Linux, none."""
        try:
            with open("/proc/self/smaps", "rb") as fh:
                text = fh.read(64 << 20).decode("ascii", "replace")
        except OSError:
            return set()
        maps = []  # (start, end, file offset, inode, anonymous kB)
        for line in text.splitlines():
            head = line.split(None, 5)
            if len(head) >= 5 and "-" in head[0] and len(head[1]) == 4:
                try:
                    a, b = (int(x, 16) for x in head[0].split("-"))
                    maps.append([a, b, int(head[2], 16), int(head[4]), -1])
                except ValueError:
                    continue
            elif line.startswith("Anonymous:") and maps:
                maps[-1][4] = int(line.split()[1])
        inodes = {}
        out = set()
        for name, t in tensors.items():
            where = self._where.get(name)
            if where is None or t.device.type != "cpu" or not t.is_contiguous():
                continue
            path, offset, dtype, shape, nbytes = where
            if t.dtype != dtype or list(t.shape) != shape:
                continue
            if path not in inodes:
                try:
                    inodes[path] = os.stat(path).st_ino
                except OSError:
                    continue
            ptr = t.data_ptr()
            for a, b, off, ino, anon in maps:
                if a <= ptr and ptr + nbytes <= b:
                    if ino == inodes[path] and anon == 0 and off + (ptr - a) == offset:
                        out.add(name)
                    break
        return out

    def dtype(self, name: str) -> torch.dtype | None:
        where = self._where.get(name)
        return None if where is None else where[2]

    def __contains__(self, name: str) -> bool:
        return name in self._where
