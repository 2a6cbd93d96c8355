"""One conformance suite every store passes (as zarr's ``StoreTests``): a folder, a zip (read
side, and its refusals), and S3 on a real moto server. Writable stores run the write battery;
read-only ones must refuse every write in one line and leave nothing changed."""

from __future__ import annotations

import threading
import uuid
import zipfile

import pytest

from maskstore.errors import IntegrityError, MaskstoreError, RefConflict
from maskstore.store.stores import FsspecStore, LocalStore, Store, ZipStore

CONTENT = {"a/one": b"1", "a/b/two": b"22", "three": b"333", "a/empty": b""}


def _zip(tmp_path) -> ZipStore:
    path = tmp_path / "s.zip"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in CONTENT.items():
            z.writestr(k, v)
    return ZipStore(path)


def _fill(store: Store) -> Store:
    for k, v in CONTENT.items():
        store.put(k, v)
    return store


@pytest.fixture(params=["local", "zip", pytest.param("s3", marks=pytest.mark.slow)])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return _fill(LocalStore(tmp_path / "s"))
    if request.param == "zip":
        return _zip(tmp_path)
    request.getfixturevalue("s3_server")
    return _fill(FsspecStore(f"s3://masks/conformance-{uuid.uuid4().hex[:8]}"))


def test_reads(store):
    for k, v in CONTENT.items():
        assert store.get(k) == v and store.has(k) and store.size(k) == len(v)
    assert store.get("missing") is None and not store.has("missing") and store.size("nope") == 0
    assert store.list("a/") == sorted(k for k in CONTENT if k.startswith("a/"))
    assert store.children("a/") == ["b", "empty", "one"]
    assert store.sizes("a/") == {k: len(v) for k, v in CONTENT.items() if k.startswith("a/")}
    buf = bytearray(8)
    assert store.read_into("a/b/two", buf) == 2 and bytes(buf[:2]) == b"22"
    assert store.read_into("missing", buf) is None


def test_a_read_over_its_limit_is_refused_before_it_is_returned(store):
    with pytest.raises(IntegrityError):
        store.get("three", limit=2)
    with pytest.raises(IntegrityError):
        store.read_into("three", bytearray(2))


@pytest.mark.parametrize("key", ["../x", "/abs", "a/../../x", "a//b", "a\\b", "a/./b", "x\x00"])
def test_keys_that_would_leave_the_store_are_refused(store, key):
    with pytest.raises(MaskstoreError):
        store.get(key)
    if store.supports_writes and not store.read_only:
        with pytest.raises(MaskstoreError):
            store.put(key, b"x")


def test_writes_or_their_refusal(store):
    if not store.supports_writes or store.read_only:
        for write in (lambda: store.put("new", b"x"), lambda: store.create("new", b"x"),
                      lambda: store.swap("three", b"x", b"333"), lambda: store.delete("three")):  # fmt: skip
            with pytest.raises(MaskstoreError):
                write()
        assert store.get("three") == b"333" and not store.has("new")
        return
    store.put("three", b"replaced")
    assert store.get("three") == b"replaced"
    assert store.create("fresh", b"f") is True and store.create("fresh", b"g") is False
    assert store.get("fresh") == b"f"
    store.swap("ref", b"v1", None)
    with pytest.raises(RefConflict):
        store.swap("ref", b"v2", None)  # it exists now
    with pytest.raises(RefConflict):
        store.swap("ref", b"v2", b"not-v1")
    store.swap("ref", b"v2", b"v1")
    assert store.get("ref") == b"v2"
    store.delete("fresh")
    assert not store.has("fresh") and "fresh" not in store.list("")
    assert not [k for k in store.list("") if ".tmp-" in k]  # nothing half-written shows


def test_concurrent_creates_have_one_winner(store):
    if not store.supports_atomic_create or store.read_only:
        pytest.skip("this store has no atomic create")
    wins: list[bool] = []
    go = threading.Barrier(8)

    def race(i: int) -> None:
        go.wait()
        wins.append(store.create("contested", f"writer {i}".encode()))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1
    assert store.get("contested").startswith(b"writer ")


def test_the_folder_store_refuses_links_and_fifos_inside(tmp_path):
    import os

    store = _fill(LocalStore(tmp_path / "s"))
    outside = tmp_path / "secret"
    outside.write_bytes(b"secret")
    os.symlink(outside, tmp_path / "s" / "link")
    os.mkfifo(tmp_path / "s" / "fifo")
    for key in ("link", "fifo"):
        with pytest.raises(MaskstoreError):
            store.get(key)
