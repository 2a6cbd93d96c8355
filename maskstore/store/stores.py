"""Stores: where bundles, repositories and remotes keep their bytes, behind one small interface.

Keys are ``/``-separated relative paths. Three stores implement :class:`Store`:

* :class:`LocalStore`, a folder (bundles, repositories, folder remotes);
* :class:`FsspecStore`, an ``s3://`` URL (remotes);
* :class:`ZipStore`, a read-only zip (packed bundles, exported versions).

Objects are immutable and named by content, so a plain atomic ``put`` is always safe; only refs need
``create`` (write if absent) and ``swap`` (compare-and-swap). Capability flags say what a store can
do, so callers check instead of catching ``TypeError``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import stat
import time
import uuid
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from ..errors import IntegrityError, MaskstoreError, RefConflict

MAX_OBJECT = 1 << 30  # no single stored object is read past 1 GiB


def too_big(key: str, where: str, size: int, limit: int) -> IntegrityError:
    return IntegrityError(
        f"{key} in {where} is {size} bytes, more than the {limit} it may hold: refused"
    )


def check_key(key: str, where: str) -> str:
    """Return ``key`` if it names a place inside a store: relative, ``/``-separated, with no
    empty, ``.`` or ``..`` component and no backslash or NUL; raise otherwise."""
    parts = key.rstrip("/").split("/") if key else []
    if (
        key.startswith("/")
        or "\\" in key
        or "\x00" in key
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise MaskstoreError(f"refusing the key {key!r} in {where}: it would leave the store")
    return key


class Store(ABC):
    """The interface every store implements.

    Attributes:
        url: where the store lives, for messages.
        read_only: writes raise :class:`MaskstoreError`.
        supports_writes: ``put``/``create``/``swap``/``delete`` are implemented.
        supports_atomic_create: ``create`` and ``swap`` are atomic against other writers.
    """

    url: str
    read_only: bool = False
    supports_writes: bool = True
    supports_atomic_create: bool = True

    # ---- reading
    @abstractmethod
    def get(self, key: str, limit: int | None = None) -> bytes | None:
        """The bytes under ``key``, or None when absent; an object over ``limit`` bytes (default
        1 GiB) is refused with IntegrityError before it is read."""

    def read_into(self, key: str, buf: bytearray) -> int | None:
        """Read ``key`` into ``buf`` and return its length (None when absent). An object larger
        than ``buf`` is refused: callers size ``buf`` to the largest valid encoding."""
        data = self.get(key, limit=len(buf))
        if data is None:
            return None
        buf[: len(data)] = data
        return len(data)

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (recursively), sorted."""

    def children(self, prefix: str) -> list[str]:
        """Names directly below the folder ``prefix`` (``"personas/"`` -> persona names)."""
        n = len(prefix)
        return sorted({k[n:].split("/", 1)[0] for k in self.list(prefix)})

    def has(self, key: str) -> bool:
        return self.get(key) is not None

    def sizes(self, prefix: str) -> dict[str, int]:
        """key -> stored bytes for every key under ``prefix``."""
        return {k: self.size(k) for k in self.list(prefix)}

    def size(self, key: str) -> int:
        """Stored bytes of ``key`` (0 when absent)."""
        data = self.get(key)
        return 0 if data is None else len(data)

    def mtime(self, key: str) -> float:
        return 0.0

    # ---- writing
    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write ``key`` atomically (readers see the old bytes or the new, never a part)."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist; False if it did."""

    @abstractmethod
    def swap(self, key: str, data: bytes, expected: bytes | None) -> None:
        """Replace ``key`` with ``data`` if its content is still ``expected`` (None: absent);
        raise :class:`RefConflict` otherwise."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def zarr_store(self) -> Any:
        """The same bytes as a ``zarr.abc.store.Store``, for arrays outside maskstore's profile."""
        raise MaskstoreError(f"{self.url}: arrays outside maskstore's zarr profile cannot be read")

    def lock(self, name: str, shared: bool) -> contextlib.AbstractContextManager:
        """Hold a named lock: shared (writers that add objects) or exclusive (gc, which removes
        them). Stores without locks return a no-op."""
        return contextlib.nullcontext()

    def leftovers(self, prefix: str, older_than: float) -> list[str]:
        """Temporary files and stale locks under ``prefix`` last touched before ``older_than``
        (epoch seconds), as keys; stores without them return none."""
        return []

    def close(self) -> None:  # noqa: B027 - optional: most sources hold nothing open
        """Release what the source holds open (a zip file); nothing by default."""


def _lock_holder_dead(path: Path) -> bool:
    """True when a ref lock names a process of this host that no longer exists."""
    try:
        pid_s, host = path.read_text().split(" ", 1)
        pid = int(pid_s)
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class LocalStore(Store):
    """A folder. Writes go to a temporary file renamed into place; refs are swapped under an
    exclusive lock file naming its holder (a lock whose process is gone from this host, or older
    than 60 s, is broken)."""

    def __init__(self, root: str | os.PathLike, read_only: bool = False) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self.read_only = read_only
        self.supports_writes = not read_only
        self._safe_dirs: set[str] = set()

    def _p(self, key: str) -> Path:
        """The path of ``key``; a key that could leave the folder is refused."""
        return self.root / check_key(key, self.url)

    def _check_dirs(self, key: str) -> None:
        """Refuse a key whose folders below the root include a symbolic link (each folder is
        checked once per store: a chunk read costs one ``lstat`` at most)."""
        prefix = ""
        for part in key.split("/")[:-1]:
            prefix += part + "/"
            if prefix in self._safe_dirs:
                continue
            try:
                mode = os.lstat(os.path.join(self.root, prefix)).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return  # the open that follows finds nothing
            if stat.S_ISLNK(mode):
                raise IntegrityError(
                    f"{key} in {self.url} lies behind a symbolic link ({prefix}): refused"
                )
            self._safe_dirs.add(prefix)

    def _open(self, key: str) -> tuple[int, int] | None:
        """A read-only descriptor of the regular file ``key`` and its size (None when absent).
        Symbolic links (the file or a folder below the root), FIFOs and devices are refused,
        never followed or opened for reading."""
        path = self._p(key)
        self._check_dirs(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise IntegrityError(
                    f"{key} in {self.url} is a symbolic link: refused (maskstore never follows links)"
                ) from None
            raise
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                os.close(fd)
                return None
            if not stat.S_ISREG(st.st_mode):
                raise IntegrityError(f"{key} in {self.url} is not a regular file: refused")
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size

    def get(self, key: str, limit: int | None = None) -> bytes | None:
        limit = MAX_OBJECT if limit is None else limit
        opened = self._open(key)
        if opened is None:
            return None
        fd, size = opened
        with os.fdopen(fd, "rb", buffering=0) as f:
            if size > limit:
                raise too_big(key, self.url, size, limit)
            data = f.read(size)  # never read(limit): that allocates the whole limit up front
            if f.read(1):  # it grew while we read
                raise too_big(key, self.url, size + 1, limit)
        return data

    def read_into(self, key: str, buf: bytearray) -> int | None:
        opened = self._open(key)
        if opened is None:
            return None
        fd, size = opened
        with os.fdopen(fd, "rb", buffering=0) as f:
            if size > len(buf):
                raise too_big(key, self.url, size, len(buf))
            return f.readinto(buf)

    def has(self, key: str) -> bool:
        try:
            return stat.S_ISREG(self._p(key).stat().st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def mtime(self, key: str) -> float:
        return self._p(key).stat().st_mtime

    def size(self, key: str) -> int:
        try:
            return self._p(key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return 0

    def children(self, prefix: str) -> list[str]:
        base = self._p(prefix)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if not p.name.startswith(".tmp-"))

    def _walk(self, prefix: str) -> dict[str, int]:
        """key -> size of every regular file under ``prefix`` (one ``scandir`` per folder, no
        symlink followed; temporary files and locks left out)."""
        out: dict[str, int] = {}
        base = os.path.join(self.root, prefix) if prefix else str(self.root)
        if not os.path.isdir(base):
            return out
        start = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        todo = [(base, start)]
        while todo:
            folder, rel = todo.pop()
            with os.scandir(folder) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        todo.append((e.path, f"{rel}{e.name}/"))
                    elif e.is_file(follow_symlinks=False) and not (
                        e.name.startswith(".tmp-") or e.name.endswith(".lock")
                    ):
                        out[rel + e.name] = e.stat(follow_symlinks=False).st_size
        return out

    def list(self, prefix: str) -> list[str]:
        return sorted(self._walk(prefix))

    def sizes(self, prefix: str) -> dict[str, int]:
        return self._walk(prefix)

    def _writable(self) -> None:
        if self.read_only:
            raise MaskstoreError(f"{self.url} was opened read-only")

    def _tmp(self, key: str, data: bytes) -> Path:
        self._writable()
        p = self._p(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # a full disk, say: leave no temporary file behind
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def put(self, key: str, data: bytes) -> None:
        tmp = self._tmp(key, data)
        try:
            os.replace(tmp, self._p(key))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

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
        self._writable()
        lock = self._p(key + ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}".encode())
                break
            except FileExistsError:
                try:
                    age = time.time() - lock.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age > 60 or _lock_holder_dead(lock):
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

    def delete(self, key: str) -> None:
        self._writable()
        self._p(key).unlink(missing_ok=True)

    def zarr_store(self) -> Any:
        import zarr.storage

        return zarr.storage.LocalStore(self.root, read_only=self.read_only)

    @contextlib.contextmanager
    def lock(self, name: str, shared: bool):
        """``flock`` on ``.<name>.lock`` in the folder: the kernel releases it when its holder
        dies, so a killed writer never blocks anyone."""
        import fcntl

        path = self.root / f".{name}.lock"
        with open(path, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def leftovers(self, prefix: str, older_than: float) -> list[str]:
        out = []
        base = self._p(prefix) if prefix else self.root
        if not base.is_dir():
            return out
        for folder, dirs, files in os.walk(base):
            rel = Path(folder).relative_to(self.root).as_posix()
            for n in files + dirs:
                if n.startswith(".tmp-") or n.endswith(".lock") and n != ".gc.lock":
                    p = Path(folder) / n
                    try:
                        st = p.lstat()
                    except FileNotFoundError:
                        continue
                    if n.endswith(".lock"):
                        # a ref lock lives for milliseconds: only a dead holder's, or one
                        # older than a minute (as swap itself treats it), is a leftover
                        old = st.st_mtime < min(older_than, time.time() - 60)
                        take = _lock_holder_dead(p) or old
                    else:
                        take = st.st_mtime < older_than
                    if take:
                        out.append(n if rel == "." else f"{rel}/{n}")
        return sorted(out)

    def remove_leftover(self, key: str) -> None:
        """Delete a temporary file or stale lock found by :meth:`leftovers`."""
        self._writable()
        name = key.rsplit("/", 1)[-1]
        if not (name.startswith(".tmp-") or name.endswith(".lock")):
            raise MaskstoreError(f"{key} is not a leftover")
        p = self.root / check_key(key, self.url)
        if p.is_dir() and not p.is_symlink():
            import shutil

            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def check_s3_url(url: str) -> None:
    """Refuse, in one line, an ``s3://`` URL that names no valid bucket or whose prefix has
    empty, ``.`` or ``..`` parts (S3 would take ``a/../b`` literally; maskstore refuses it)."""
    scheme, _, rest = url.partition("://")
    bucket, _, prefix = rest.rstrip("/").partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise MaskstoreError(
            f"remote {url!r}: {bucket or 'no bucket'} is not an S3 bucket name (3-63 "
            f"lowercase letters, digits, '.' and '-'): write it as {scheme}://BUCKET/PREFIX"
        )
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise MaskstoreError(
            f"remote {url!r}: the prefix after the bucket has an empty, '.' or '..' part"
        )


class FsspecStore(Store):
    """Any fsspec URL. Atomic create and compare-and-swap use S3's conditional writes
    (``If-None-Match: *`` and ``If-Match: <etag>``), which AWS S3 and compatible servers honour."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        import fsspec

        if url.startswith(("s3://", "s3a://")):
            check_s3_url(url)
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
        return f"{self.root}/{check_key(key, self.url)}"

    def check_bucket(self) -> None:
        """Raise a one-line error when the URL's bucket does not exist (called once something
        expected is missing, to say why)."""
        bucket = self.root.split("/", 1)[0]
        try:
            self.fs.invalidate_cache(bucket)
            ok = self.fs.exists(bucket)
        except Exception:  # noqa: BLE001 - the question is moot: the caller's error stands
            return
        if not ok:
            raise MaskstoreError(
                f"S3 bucket {bucket!r} does not exist: create it, or check the URL {self.url}"
            )

    def get(self, key: str, limit: int | None = None) -> bytes | None:
        limit = MAX_OBJECT if limit is None else limit
        try:
            size = self.fs.size(self._p(key))
            if size is not None and size > limit:
                raise too_big(key, self.url, size, limit)
            if size == 0:  # a ranged read of an empty object is refused by S3 (InvalidRange)
                return b""
            data = self.fs.cat_file(self._p(key), start=0, end=limit + 1)
        except FileNotFoundError:
            return None
        if len(data) > limit:
            raise too_big(key, self.url, len(data), limit)
        return data

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
    """A read-only zip: a packed bundle or an exported version. Only the central directory is
    read on open; members are read on demand."""

    read_only = True
    supports_writes = False
    supports_atomic_create = False

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.url = str(path)
        try:
            self._zf = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as e:
            if self.path.suffix.lower() != ".zip" and isinstance(e, zipfile.BadZipFile):
                raise MaskstoreError(
                    f"{path} is a file, not a bundle: give a bundle folder, a .zip that "
                    "maskstore pack made, or REPO@REF"
                ) from None
            raise MaskstoreError(
                f"{path} is not a readable maskstore zip ({type(e).__name__}): "
                "it may be truncated; make it again"
            ) from None
        self._names = {i.filename: i for i in self._zf.infolist() if not i.is_dir()}

    def get(self, key: str, limit: int | None = None) -> bytes | None:
        limit = MAX_OBJECT if limit is None else limit
        info = self._names.get(check_key(key, self.url))
        if info is None:
            return None
        if info.file_size > limit:
            raise too_big(key, self.url, info.file_size, limit)
        with self._zf.open(info) as f:
            data = f.read(
                info.file_size + 1
            )  # never past the declared size, whatever it inflates to
        if len(data) != info.file_size:
            raise IntegrityError(f"{key} in {self.url} does not hold its declared size: damaged")
        return data

    def has(self, key: str) -> bool:
        return key in self._names

    def size(self, key: str) -> int:
        info = self._names.get(key)
        return 0 if info is None else info.file_size

    def list(self, prefix: str) -> list[str]:
        return sorted(n for n in self._names if n.startswith(prefix))

    def sizes(self, prefix: str) -> dict[str, int]:
        return {n: i.file_size for n, i in self._names.items() if n.startswith(prefix)}

    def _refuse(self) -> None:
        raise MaskstoreError(f"{self.url} is a zip and read-only: unzip it to modify it")

    def put(self, key: str, data: bytes) -> None:
        self._refuse()

    def create(self, key: str, data: bytes) -> bool:
        self._refuse()
        return False

    def swap(self, key: str, data: bytes, expected: bytes | None) -> None:
        self._refuse()

    def delete(self, key: str) -> None:
        self._refuse()

    def zarr_store(self) -> Any:
        import zarr.storage

        return zarr.storage.ZipStore(self.path, mode="r")

    def close(self) -> None:
        self._zf.close()


def open_store(url: str | os.PathLike, create: bool = False, read_only: bool = False) -> Store:
    """A store for a local folder, an ``s3://`` URL or a ``.zip``.

    S3 endpoints come from the usual environment (``AWS_ENDPOINT_URL`` etc.).

    Args:
        url: a folder, ``file://`` path, ``s3://`` URL, or an existing ``.zip`` file.
        create: create a missing folder.
        read_only: refuse writes to a folder.
    """
    s = str(url)
    if "://" in s and not s.startswith("file://"):
        return FsspecStore(s)
    path = Path(s.removeprefix("file://"))
    if path.is_file():
        return ZipStore(path)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    elif not path.is_dir():
        raise MaskstoreError(f"{path} does not exist: create it, or check the path")
    return LocalStore(path, read_only=read_only)
