"""Object stores behind repositories and remotes: a local folder, any fsspec URL (``s3://``), a zip.

Each store offers the same small interface: ``get``, ``has``, ``put`` (atomic), ``create``
(write only if absent, atomically), ``swap`` (compare-and-swap of a small ref file), ``list``,
``delete``. Objects are immutable and named by content, so a plain atomic ``put`` is always safe;
only refs need ``create``/``swap``.
"""

from __future__ import annotations

import os
import time
import uuid
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path

from .errors import MaskstoreError


class RefConflict(MaskstoreError):
    """A ref changed under us (another writer won the race)."""


class Store(ABC):
    """The interface every store implements. Keys are ``/``-separated relative paths."""

    url: str

    @abstractmethod
    def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist; False if it did."""

    @abstractmethod
    def swap(self, key: str, data: bytes, expected: bytes | None) -> None:
        """Replace ``key`` with ``data`` if its content is still ``expected`` (None: absent);
        raise :class:`RefConflict` otherwise."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def has(self, key: str) -> bool:
        return self.get(key) is not None

    def size(self, key: str) -> int:
        """Stored bytes of ``key`` (0 when absent)."""
        data = self.get(key)
        return 0 if data is None else len(data)

    def mtime(self, key: str) -> float:
        return 0.0


class LocalStore(Store):
    """A folder. Writes go to a temporary file renamed into place; refs are swapped under an
    exclusive lock file (a lock older than 60 s is treated as left by a killed process)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    def _p(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> bytes | None:
        try:
            return self._p(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def has(self, key: str) -> bool:
        return self._p(key).is_file()

    def mtime(self, key: str) -> float:
        return self._p(key).stat().st_mtime

    def size(self, key: str) -> int:
        try:
            return self._p(key).stat().st_size
        except FileNotFoundError:
            return 0

    def _tmp(self, key: str, data: bytes) -> Path:
        p = self._p(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.parent / f".tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def put(self, key: str, data: bytes) -> None:
        os.replace(self._tmp(key, data), self._p(key))

    def create(self, key: str, data: bytes) -> bool:
        tmp = self._tmp(key, data)
        try:
            os.link(tmp, self._p(key))  # atomic, fails if the name exists
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def swap(self, key: str, data: bytes, expected: bytes | None) -> None:
        lock = self._p(key + ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                if time.time() - lock.stat().st_mtime > 60:
                    lock.unlink(missing_ok=True)  # left by a killed writer
                    continue
                raise RefConflict(f"{key} is being updated by another process: try again") from None
        else:
            raise RefConflict(f"{key} is locked: try again")
        try:
            if self.get(key) != expected:
                raise RefConflict(
                    f"{key} changed while updating it: another writer won; pull and retry"
                )
            self.put(key, data)
        finally:
            os.close(fd)
            lock.unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        base = self._p(prefix)
        if not base.exists():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-") and not p.name.endswith(".lock")
        )

    def delete(self, key: str) -> None:
        self._p(key).unlink(missing_ok=True)


class FsspecStore(Store):
    """Any fsspec URL. Atomic create and compare-and-swap use S3's conditional writes
    (``If-None-Match: *`` and ``If-Match: <etag>``), which AWS S3 and compatible servers honour."""

    def __init__(self, url: str, **storage_options) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.protocol = (
            self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        )
        if self.protocol not in ("s3", "s3a"):
            raise MaskstoreError(
                f"remote {url}: only local folders and s3:// URLs support atomic ref updates"
            )

    def _p(self, key: str) -> str:
        return f"{self.root}/{key}"

    def get(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._p(key))
        except FileNotFoundError:
            return None

    def has(self, key: str) -> bool:
        return self.fs.exists(self._p(key))

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._p(key), data)

    def create(self, key: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self._p(key), data, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if "pre-condition" in str(e).lower() or "precondition" in str(e).lower():
                return False
            raise

    def swap(self, key: str, data: bytes, expected: bytes | None) -> None:
        path = self._p(key)
        if expected is None:
            if not self.create(key, data):
                raise RefConflict(f"{key} was created by another writer: pull and retry")
            return
        self.fs.invalidate_cache(path)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            raise RefConflict(f"{key} was deleted by another writer") from None
        if self.get(key) != expected:
            raise RefConflict(
                f"{key} changed while updating it: another writer won; pull and retry"
            )
        try:
            self.fs.pipe_file(path, data, IfMatch=info["ETag"])
        except (OSError, FileExistsError) as e:
            if "condition" in str(e).lower():
                raise RefConflict(
                    f"{key} changed while updating it: another writer won; pull and retry"
                ) from None
            raise

    def list(self, prefix: str) -> list[str]:
        base = self._p(prefix)
        self.fs.invalidate_cache(base)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        n = len(self.root) + 1
        return sorted(p[n:] for p in found)

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._p(key))
        except FileNotFoundError:
            pass


class ZipStore(Store):
    """A read-only zip of a store's objects (the single-file hand-off of ``maskstore export``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.url = str(path)
        try:
            self._zf = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as e:
            raise MaskstoreError(
                f"{path} is not a readable maskstore export ({type(e).__name__})"
            ) from None
        self._names = set(self._zf.namelist())

    def get(self, key: str) -> bytes | None:
        return self._zf.read(key) if key in self._names else None

    def has(self, key: str) -> bool:
        return key in self._names

    def list(self, prefix: str) -> list[str]:
        return sorted(n for n in self._names if n.startswith(prefix))

    def put(self, key: str, data: bytes) -> None:
        raise MaskstoreError("an export zip is read-only")

    create = swap = delete = put  # type: ignore[assignment]


def open_store(url: str | os.PathLike, create: bool = False) -> Store:
    """A store for a local folder, an ``s3://`` URL or an export ``.zip``.

    S3 endpoints come from the usual environment (``AWS_ENDPOINT_URL`` etc.).
    """
    s = str(url)
    if "://" in s and not s.startswith("file://"):
        return FsspecStore(s)
    path = Path(s.removeprefix("file://"))
    if path.suffix == ".zip" and path.is_file():
        return ZipStore(path)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    elif not path.is_dir():
        raise MaskstoreError(f"{path} does not exist: create it, or check the path")
    return LocalStore(path)
