"""Attacks and bad luck: forged metadata and versions, hostile zips and remotes, bombs, special
files, gc racing a commit. Each test names the failure it guards against (issue 10)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zstandard
from _helpers import write_bundle

from maskstore import open_bundle, pack_zip
from maskstore.errors import IntegrityError, MaskstoreError
from maskstore.repo import init_repo, open_repo
from maskstore.repo.objects import chunk_key
from maskstore.store.hashing import blake2b_hex, canonical_json, metadata_digest

TESTS = Path(__file__).parent
FP = {"architecture": "T", "modules": {f"model.layers.{i}.mlp.up_proj": [39, 50] for i in range(3)}}
M0 = "model.layers.0.mlp.up_proj"


def _masks(rng, names=("a", "b"), p=0.5):
    return {n: {m: rng.random(tuple(s)) < p for m, s in FP["modules"].items()} for n in names}


@pytest.fixture
def bundle(tmp_path, rng):
    masks = _masks(rng)
    return write_bundle(tmp_path / "b", FP, masks), masks


def _edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


# ---- bundles


def test_fingerprint_edit_is_caught_before_any_read(bundle):
    path, _ = bundle
    _edit_json(
        path / "zarr.json",
        lambda d: d["attributes"]["maskstore"]["model"]["modules"].__setitem__(M0, [49, 50]),
    )
    b = open_bundle(path)
    with pytest.raises(IntegrityError, match="another model fingerprint"):
        b.read_mask("a", M0)
    assert any("another model fingerprint" in p for p in b.verify())


def _shorten(path: Path, persona: str, rows: int) -> None:
    """Rewrite an array's zarr.json to declare fewer rows, chunk digests made to match."""
    from maskstore.store.hashing import xxh3

    arr = path / "personas" / persona / "masks" / M0
    data = open_bundle(path).read_packed(persona, M0)[:rows]

    def fix(d):
        d["shape"][0] = rows
        d["chunk_grid"]["configuration"]["chunk_shape"][0] = rows
        d["attributes"]["maskstore"]["chunk_digests"] = [xxh3(data)]

    _edit_json(arr / "zarr.json", fix)


def test_shortened_array_never_reaches_a_model(bundle):
    import torch

    import maskstore

    path, _ = bundle
    _shorten(path, "a", 29)
    b = open_bundle(path)
    with pytest.raises(IntegrityError, match="model fingerprint"):
        b.read_packed("a", M0)
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList()
    for _ in range(3):
        layer = torch.nn.Module()
        layer.mlp = torch.nn.Module()
        layer.mlp.up_proj = torch.nn.Linear(50, 39, bias=False)
        model.model.layers.append(layer)
    before = [layer.mlp.up_proj.weight.detach().clone() for layer in model.model.layers]
    h = maskstore.attach(model, b)
    with pytest.raises(IntegrityError):
        h.use("a")
    for layer, w in zip(model.model.layers, before, strict=True):
        assert torch.equal(layer.mlp.up_proj.weight, w)


def test_swapped_or_edited_arrays_are_refused(bundle):
    import shutil

    path, _ = bundle
    a, b_ = path / "personas/a/masks" / M0, path / "personas/b/masks" / M0
    shutil.rmtree(a)
    shutil.copytree(b_, a)
    with pytest.raises(IntegrityError, match="not the array the persona records"):
        open_bundle(path).read_mask("a", M0)
    # a chunk edited together with its chunk digest: the array digest still catches it
    chunk = b_ / "c/0/0"
    bn = open_bundle(path)
    data = bn.read_packed("b", M0).copy()
    data[0, 0] ^= 1
    from maskstore.store.hashing import xxh3

    zstd = "zstd" in (b_ / "zarr.json").read_text()
    chunk.write_bytes(
        zstandard.ZstdCompressor().compress(data.tobytes()) if zstd else data.tobytes()
    )
    _edit_json(
        b_ / "zarr.json",
        lambda d: d["attributes"]["maskstore"].__setitem__("chunk_digests", [xxh3(data)]),
    )
    with pytest.raises(IntegrityError, match="array digest"):
        open_bundle(path).read_mask("b", M0)


def test_absurd_declared_chunks_are_refused_without_allocating(bundle):
    path, _ = bundle
    _edit_json(
        path / "personas/a/masks" / M0 / "zarr.json",
        lambda d: d["chunk_grid"]["configuration"]["chunk_shape"].__setitem__(0, 2**29),
    )
    with pytest.raises(MaskstoreError, match="unreadable zarr.json"):
        open_bundle(path).read_mask("a", M0)


def test_missing_persona_metadata_and_odd_folders_are_reported(bundle):
    path, _ = bundle
    (path / "personas/a/zarr.json").unlink()
    (path / "personas" / ".evil\x1b[31m").mkdir()
    b = open_bundle(path)
    assert b.personas == ["b"]
    problems = b.verify()
    assert any("persona 'a' has no zarr.json" in p for p in problems)
    assert any("not a valid persona name" in p for p in problems)


def test_symlinks_fifos_and_devices_are_refused_not_followed(bundle, tmp_path):
    path, _ = bundle
    chunk = path / "personas/a/masks" / M0 / "c/0/0"
    chunk.unlink()
    chunk.symlink_to("/dev/zero")
    with pytest.raises(IntegrityError, match="symbolic link"):
        open_bundle(path).read_mask("a", M0)
    chunk.unlink()
    os.mkfifo(chunk)
    with pytest.raises(IntegrityError, match="not a regular file"):
        open_bundle(path).read_mask("a", M0)  # would block forever if it were opened for reading
    assert any("not a regular file" in p for p in open_bundle(path).verify())
    # pack refuses a symlink to a private file
    chunk.unlink()
    secret = tmp_path / "secret"
    secret.write_text("private")
    chunk.symlink_to(secret)
    with pytest.raises(MaskstoreError, match="symbolic link"):
        pack_zip(path, tmp_path / "out.zip")
    assert not (tmp_path / "out.zip").exists()


def test_zip_bomb_bundle_is_refused_within_bounded_memory(bundle, tmp_path):
    path, _ = bundle
    pack_zip(path, tmp_path / "b.zip")
    bomb = tmp_path / "bomb.zip"
    member = f"personas/a/masks/{M0}/c/0/0"
    with zipfile.ZipFile(tmp_path / "b.zip") as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            if info.filename != member:
                dst.writestr(info, src.read(info))
        bomb_info = zipfile.ZipInfo(member)
        bomb_info.compress_type = zipfile.ZIP_DEFLATED  # 256 MiB of zeros in about 256 KiB
        with dst.open(bomb_info, "w", force_zip64=True) as f:
            zeros = bytes(16 << 20)
            for _ in range(16):
                f.write(zeros)
    assert bomb.stat().st_size < 2 << 20
    code = (
        "from maskstore import open_bundle\n"
        f"print(open_bundle({str(bomb)!r}).verify())\n"
        "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) // 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    problems, rss = out.stdout.strip().splitlines()
    # peak resident MiB of the process since exec (VmHWM; ru_maxrss would carry pytest's over)
    assert "more than the" in problems and int(rss) < 160  # the member inflates to 256 MiB


# ---- repositories and remotes


def _repo_and_remote(tmp_path, rng):
    write_bundle(tmp_path / "b", FP, _masks(rng))
    repo = init_repo(tmp_path / "repo")
    repo.commit(open_bundle(tmp_path / "b"), "one")
    repo.push(tmp_path / "remote", "main")
    return repo, tmp_path / "remote"


def _forge(remote: Path, fn) -> str:
    """Rewrite the remote's main version with ``fn(manifest)``, self-consistently (a new
    blake2b id, the branch moved to it)."""
    vid = (remote / "refs/branches/main").read_text().strip()
    man = json.loads(
        zstandard.ZstdDecompressor().decompress((remote / "versions" / vid).read_bytes())
    )
    fn(man)
    text = canonical_json(man)
    new = blake2b_hex(text)
    (remote / "versions" / new).write_bytes(zstandard.ZstdCompressor().compress(text))
    (remote / "refs/branches/main").write_text(new)
    return new


def test_forged_remote_with_another_personas_arrays_is_refused(tmp_path, rng):
    _, remote = _repo_and_remote(tmp_path, rng)

    def swap(man):
        man["personas"]["a"]["arrays"] = man["personas"]["b"]["arrays"]

    _forge(remote, swap)
    clone = init_repo(tmp_path / "clone")
    with pytest.raises(IntegrityError, match="not the array the persona records"):
        clone.pull(remote, "main")
    assert clone.branch_head("main") is None


def test_forged_remote_with_a_short_array_is_refused(tmp_path, rng):
    _, remote = _repo_and_remote(tmp_path, rng)

    def shorten(man):  # a complete forgery: new chunk objects too, every digest made to match
        from maskstore.store.hashing import xxh3

        e = man["personas"]["a"]["arrays"][f"masks/{M0}"]
        raw = np.zeros((29, 7), np.uint8).tobytes()
        h = xxh3(raw)
        (remote / chunk_key(h)).parent.mkdir(parents=True, exist_ok=True)
        (remote / chunk_key(h)).write_bytes(zstandard.ZstdCompressor().compress(raw))
        e["chunks"] = [[h, blake2b_hex(raw)]]
        e["zarr"]["shape"][0] = 29
        e["zarr"]["chunk_grid"]["configuration"]["chunk_shape"][0] = 29
        e["zarr"]["attributes"]["maskstore"]["chunk_digests"] = [h]

    _forge(remote, shorten)
    clone = init_repo(tmp_path / "clone")
    with pytest.raises(IntegrityError, match="model fingerprint"):
        clone.pull(remote, "main")


def test_self_referencing_delta_is_refused_on_pull(tmp_path, rng):
    _, remote = _repo_and_remote(tmp_path, rng)
    _forge(
        remote,
        lambda m: m["personas"]["a"]["arrays"][f"masks/{M0}"].__setitem__(
            "delta", {"persona": "a", "version": None}
        ),
    )
    with pytest.raises(IntegrityError, match="loops"):
        init_repo(tmp_path / "clone").pull(remote, "main")


def test_held_chunks_are_checked_against_the_incoming_blake2b(tmp_path, rng):
    repo, remote = _repo_and_remote(tmp_path, rng)
    clone = init_repo(tmp_path / "clone")
    clone.pull(remote, "main")
    # damage a chunk the clone already holds: the next pull must notice, not skip it
    h = repo.manifest(repo.resolve("main"))["personas"]["a"]["arrays"][f"masks/{M0}"]["chunks"][0][
        0
    ]
    local = tmp_path / "clone" / chunk_key(h)
    local.write_bytes(zstandard.ZstdCompressor().compress(b"\0" * 10))
    with pytest.raises(IntegrityError, match=h):
        clone.pull(remote, "main")


def test_manifest_bomb_is_refused_within_bounded_memory(tmp_path, rng):
    _, remote = _repo_and_remote(tmp_path, rng)
    vid = (remote / "refs/branches/main").read_text().strip()
    c = zstandard.ZstdCompressor(level=1).compressobj()
    frame = b"".join(c.compress(bytes(1 << 20)) for _ in range(2048)) + c.flush()  # 2 GiB
    (remote / "versions" / vid).write_bytes(frame)
    assert len(frame) < 1 << 20
    code = (
        "from maskstore.repo import init_repo\n"
        f"try:\n    init_repo({str(tmp_path / 'clone')!r}).pull({str(remote)!r}, 'main')\n"
        "except Exception as e:\n    print(type(e).__name__)\n"
        "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) // 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    err, rss = out.stdout.strip().splitlines()
    assert err == "IntegrityError" and int(rss) < 500


@pytest.mark.parametrize(
    "ref", ["refs/tags/../../../../X", "refs/branches/../..", "refs/tags/a/../../b"]
)
def test_import_never_writes_outside_the_repository(tmp_path, rng, ref):
    repo, _ = _repo_and_remote(tmp_path, rng)
    repo.tag("v1", "main")
    repo.export("v1", tmp_path / "ok.zip")
    evil = tmp_path / "deep" / "evil.zip"
    evil.parent.mkdir()
    with zipfile.ZipFile(tmp_path / "ok.zip") as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr(ref, repo.resolve("v1"))
    target = init_repo(tmp_path / "deep" / "target")
    before = sorted(p for p in tmp_path.rglob("*") if "target" not in p.parts)
    with pytest.raises(MaskstoreError):
        target.import_(evil)
    after = sorted(p for p in tmp_path.rglob("*") if "target" not in p.parts)
    assert after == before
    assert target.tags() == {} and target.branches() == {}


def test_dead_lock_holder_is_broken_at_once_and_leftovers_are_collected(tmp_path, rng):
    repo, _ = _repo_and_remote(tmp_path, rng)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    import socket

    lock = tmp_path / "repo/refs/branches/main.lock"
    lock.write_text(f"{dead} {socket.gethostname()}")
    write_bundle(tmp_path / "b2", FP, _masks(rng))
    t = time.perf_counter()
    repo.commit(open_bundle(tmp_path / "b2"), "two")  # would wait out 60 s before
    assert time.perf_counter() - t < 10
    live = tmp_path / "repo/refs/branches/busy.lock"  # held by a live process, just now
    live.write_text(f"{os.getpid()} {socket.gethostname()}")
    assert "refs/branches/busy.lock" not in repo.leftovers()
    live.unlink()
    old = tmp_path / "repo/chunks/.tmp-deadbeef"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 86400, time.time() - 86400))
    assert "chunks/.tmp-deadbeef" in repo.leftovers()
    repo.gc(grace_seconds=0)
    assert not old.exists() and repo.verify() == []


@pytest.mark.slow
def test_gc_never_deletes_what_a_concurrent_commit_references(tmp_path, rng):
    """Real processes: a slow commit that reuses unreachable chunks, and gc --grace 0 started
    at several points of it. Without exclusion gc deletes chunks the commit found present."""
    repo = init_repo(tmp_path / "repo")
    write_bundle(tmp_path / "b0", FP, _masks(rng))
    repo.commit(open_bundle(tmp_path / "b0"), "base")
    prelude = f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
    for i, offset in enumerate((0.0, 0.3, 0.6, 0.9, 1.2)):
        write_bundle(tmp_path / f"x{i}", FP, _masks(rng))
        repo.commit(open_bundle(tmp_path / f"x{i}"), "doomed", branch="tmp")
        repo.delete_branch("tmp")  # its chunks are now unreachable, and older than gc's start
        commit = prelude + (
            "from _faults import Slow\nfrom maskstore.store.stores import open_store\n"
            "from maskstore.repo import Repository\nfrom maskstore import open_bundle\n"
            f"r = Repository(Slow(open_store({str(tmp_path / 'repo')!r}), 0.08), {str(tmp_path / 'repo')!r})\n"
            f"r.commit(open_bundle({str(tmp_path / f'x{i}')!r}), 'c{i}')\n"
        )
        gc = f"from maskstore.repo import open_repo\nopen_repo({str(tmp_path / 'repo')!r}).gc(0)\n"
        a = subprocess.Popen([sys.executable, "-c", commit])
        time.sleep(offset)
        b = subprocess.Popen([sys.executable, "-c", gc])
        assert a.wait(120) == 0 and b.wait(120) == 0
        r = open_repo(tmp_path / "repo")
        assert r.verify() == [], f"offset {offset}"
        assert r.manifest(r.resolve("main"))["message"] == f"c{i}"
        assert np.array_equal(
            r.snapshot("main").bundle.read_mask("a", M0),
            open_bundle(tmp_path / f"x{i}").read_mask("a", M0),
        )


def test_fingerprint_digest_is_recorded_and_checked(bundle):
    path, _ = bundle
    b = open_bundle(path)
    assert b.persona("a")["model_digest"] == metadata_digest(FP)


def test_gzip_and_blosc_chunks_decode_no_further_than_their_size(tmp_path, rng):
    import gzip

    for codec in ("gzip", "blosc"):
        path = write_bundle(tmp_path / codec, FP, _masks(rng, p=0.1), codec=codec)
        chunk = path / "personas/a/masks" / M0 / "c/0/0"
        if codec == "gzip":
            chunk.write_bytes(gzip.compress(bytes(256 << 20), compresslevel=1))  # 256 MiB
        else:
            head = bytearray(chunk.read_bytes())
            head[4:8] = (1 << 30).to_bytes(4, "little")  # declares 1 GiB
            chunk.write_bytes(bytes(head))
        # refused by the stored size (a chunk can take no more than its bound) or by the
        # decoder stopping at the size the chunk must have
        with pytest.raises(IntegrityError, match="cannot be decoded|more than the"):
            open_bundle(path).read_mask("a", M0)


def test_gigantic_fingerprint_shapes_are_refused(tmp_path, rng):
    path = write_bundle(tmp_path / "b", FP, _masks(rng))
    _edit_json(
        path / "zarr.json",
        lambda d: d["attributes"]["maskstore"]["model"]["modules"].__setitem__(M0, [2**40, 2**40]),
    )
    with pytest.raises(MaskstoreError, match="bundle.schema.json"):
        open_bundle(path)


def test_killed_writers_leave_nothing_that_outlives_them(tmp_path, rng):
    from maskstore import create_bundle

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = tmp_path / f".b.tmp-{dead}-deadbeef"
    stale.mkdir()
    (stale / "zarr.json").write_text("{}")
    stale_zip = tmp_path / f".b.zip.tmp-{dead}-cafe"
    stale_zip.write_bytes(b"PK")
    live = tmp_path / f".b.tmp-{os.getpid()}-feed"  # this process is alive: kept
    live.mkdir()
    with create_bundle(tmp_path / "b", FP) as b, b.persona_writer("a", method="t") as w:
        for m, arr in _masks(rng, ["a"])["a"].items():
            w.write_mask(m, arr)
    pack_zip(tmp_path / "b", tmp_path / "b.zip")
    assert not stale.exists() and not stale_zip.exists() and live.exists()
    # an interrupted persona write inside a bundle is reported as a leftover, and the next
    # writer reclaims it once its process is gone
    (tmp_path / f"b/.staging/{dead}-abc").mkdir(parents=True)
    assert open_bundle(tmp_path / "b").leftovers() and open_bundle(tmp_path / "b").verify() == []
    with open_bundle(tmp_path / "b", writable=True).persona_writer("c", method="t") as w:
        for m, arr in _masks(rng, ["c"])["c"].items():
            w.write_mask(m, arr)
    assert open_bundle(tmp_path / "b").leftovers() == []


def test_a_full_disk_during_commit_leaves_no_temporary_file(tmp_path, rng):
    """A commit whose writes hit a file-size limit (as a full disk would stop them) fails in
    one line and leaves no chunks/xx/.tmp-* behind; the repository still verifies."""
    import os
    import subprocess
    import sys

    from _helpers import random_masks, write_bundle

    fp = {"architecture": "T", "modules": {"m.0": [512, 1024], "m.1": [8, 8]}}
    small = write_bundle(tmp_path / "small", fp, random_masks(rng, {"modules": {"m.1": [8, 8]}},
                                                             ["a"]))  # fmt: skip
    big = write_bundle(tmp_path / "big", fp, random_masks(rng, fp, ["a", "b"]), codec="none")
    repo = tmp_path / "repo"
    run = [sys.executable, "-m", "maskstore.cli", "commit"]
    assert subprocess.run([*run, str(small), "-m", "one", "--repo", str(repo)]).returncode == 0
    limited = (
        "import resource, signal, sys, runpy; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (40000, 40000)); "
        f"sys.argv = ['maskstore', 'commit', {str(big)!r}, '-m', 'big', '--repo', {str(repo)!r}]; "
        "runpy.run_module('maskstore.cli', run_name='__main__')"
    )
    r = subprocess.run([sys.executable, "-c", limited], capture_output=True, text=True,
                       timeout=120, env={**os.environ})  # fmt: skip
    assert r.returncode == 2 and "no space left" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not [p for p in repo.rglob(".tmp-*")]
    v = subprocess.run([sys.executable, "-m", "maskstore.cli", "verify", str(repo)],
                       capture_output=True, text=True)  # fmt: skip
    assert v.returncode == 0, v.stderr
