import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.storage
from _helpers import random_fingerprint, random_masks, write_bundle

import maskstore
from maskstore import create_bundle, open_bundle, pack_zip
from maskstore.errors import IntegrityError, MaskstoreError
from maskstore.store.stats import ChannelStats
from maskstore.store.stores import ZipStore


def _chunk_files(bundle: Path, persona: str, module: str) -> list[Path]:
    return sorted(
        f
        for f in (bundle / "personas" / persona / "masks" / module / "c").rglob("*")
        if f.is_file()
    )


def test_roundtrip_random_shapes_empty_and_full(tmp_path, rng):
    fp = random_fingerprint(rng, n_layers=3)
    masks = random_masks(rng, fp, ["a", "b"])
    first = next(iter(fp["modules"]))
    masks["a"][first][:] = False  # empty
    masks["b"][first][:] = True  # full
    write_bundle(tmp_path / "b", fp, masks)
    b = maskstore.open(tmp_path / "b")
    assert b.personas == ["a", "b"]
    for p, mods in masks.items():
        for m, arr in mods.items():
            assert np.array_equal(b.read_mask(p, m), arr)
            t = b.read_mask(p, m, as_torch=True)
            assert t.dtype.is_floating_point is False and np.array_equal(t.numpy(), arr)
            packed = b.read_packed(p, m)
            assert packed.shape == (arr.shape[0], (arr.shape[1] + 7) // 8)
            assert b.persona(p)["modules"][m]["kept"] == int(arr.sum())
    assert b.verify() == []


def test_write_packed_equals_unpacked(tmp_path, rng):
    fp = random_fingerprint(rng)
    arrs = random_masks(rng, fp, ["x"])["x"]
    with create_bundle(tmp_path / "b", fp) as b:
        with b.persona_writer("u", method="t") as w:
            for m, a in arrs.items():
                w.write_mask(m, a)
        with b.persona_writer("p", method="t") as w:
            for m, a in arrs.items():
                w.write_mask(m, np.packbits(a, axis=1, bitorder="little"), packed=True)
    b = open_bundle(tmp_path / "b")
    assert b.persona("u")["digest"] == b.persona("p")["digest"]


def test_digests_survive_reencoding(tmp_path, rng):
    fp = {
        "architecture": "T",
        "modules": {"l.0.mlp.up_proj": [300, 77], "l.0.attn.q_proj": [64, 64]},
    }
    masks = random_masks(rng, fp, ["a"])
    write_bundle(tmp_path / "zstd", fp, masks)
    write_bundle(tmp_path / "gzip", fp, masks, codec="gzip", chunk_bytes=100)
    write_bundle(tmp_path / "raw", fp, masks, codec="none", chunk_bytes=1000)
    ds = [open_bundle(tmp_path / n) for n in ("zstd", "gzip", "raw")]
    assert len({d.digest for d in ds}) == 1
    assert len({d.persona("a")["digest"] for d in ds}) == 1
    # the chunking really differs
    assert len(_chunk_files(tmp_path / "gzip", "a", "l.0.mlp.up_proj")) > 1
    assert len(_chunk_files(tmp_path / "zstd", "a", "l.0.mlp.up_proj")) == 1
    codecs = json.loads((tmp_path / "gzip/personas/a/masks/l.0.mlp.up_proj/zarr.json").read_text())[
        "codecs"
    ]
    assert codecs[-1]["name"] == "gzip"


def test_plain_zarr_reads_bundle_arrays(tmp_path, rng):
    fp = random_fingerprint(rng)
    masks = random_masks(rng, fp, ["a"])
    write_bundle(tmp_path / "b", fp, masks)
    g = zarr.open_group(str(tmp_path / "b"), mode="r")
    for m, arr in masks["a"].items():
        raw = g["personas"]["a"]["masks"][m][:]
        assert np.array_equal(
            np.unpackbits(raw, axis=1, count=arr.shape[1], bitorder="little").astype(bool), arr
        )


def test_zip_bundle_reads_lazily_and_matches(tmp_path, rng):
    fp = random_fingerprint(rng)
    masks = random_masks(rng, fp, ["a", "b"])
    write_bundle(tmp_path / "b", fp, masks)
    pack_zip(tmp_path / "b", tmp_path / "b.zip")
    z = open_bundle(tmp_path / "b.zip")
    assert isinstance(z.store, ZipStore) and z.personas == ["a", "b"]
    assert z.digest == open_bundle(tmp_path / "b").digest
    m = next(iter(masks["a"]))
    assert np.array_equal(z.read_mask("a", m), masks["a"][m])
    assert z.verify() == []
    with pytest.raises(MaskstoreError, match="read-only"):
        open_bundle(tmp_path / "b.zip", writable=True)


def test_stats_roundtrip_and_exact_merge(tmp_path, rng):
    fp = {"architecture": "T", "modules": {"l.0.mlp.up_proj": [4, 11]}}
    x = rng.normal(size=(10, 7, 11))
    whole = ChannelStats.zeros(11)
    halves = [ChannelStats.zeros(11), ChannelStats.zeros(11)]
    for i, s in enumerate(x):
        for st in (whole, halves[i % 2]):
            st.add_batch(s.sum(0), (s**2).sum(0), np.sqrt((s**2).sum(0))[None], s.shape[0])
    merged = halves[0].merge(halves[1])
    for k in ("sum", "sumsq", "norm_mean", "norm_m2"):
        np.testing.assert_allclose(getattr(merged, k), getattr(whole, k), rtol=1e-12)
    assert (merged.tokens, merged.samples) == (70, 10)
    with create_bundle(tmp_path / "b", fp) as b:
        with b.persona_writer("a", method="t") as w:
            w.write_mask("l.0.mlp.up_proj", np.ones((4, 11), bool))
            w.write_stats("l.0.mlp.up_proj", whole)
    got = open_bundle(tmp_path / "b").read_stats("a", "l.0.mlp.up_proj")
    assert np.array_equal(got.sumsq, whole.sumsq) and got.tokens == 70 and got.samples == 10


def test_corrupted_chunk_is_named_and_never_read(tmp_path, rng):
    fp = {"architecture": "T", "modules": {"l.0.mlp.up_proj": [400, 64]}}
    masks = random_masks(rng, fp, ["a"])
    write_bundle(tmp_path / "b", fp, masks, codec="none", chunk_bytes=800)
    files = _chunk_files(tmp_path / "b", "a", "l.0.mlp.up_proj")
    victim = [f for f in files if f.is_file()][2]
    data = bytearray(victim.read_bytes())
    data[5] ^= 0xFF
    victim.write_bytes(bytes(data))
    b = open_bundle(tmp_path / "b")
    problems = b.verify()
    assert len(problems) == 1 and "chunk 2 of" in problems[0] and "l.0.mlp.up_proj" in problems[0]
    with pytest.raises(IntegrityError, match="chunk 2"):
        b.read_mask("a", "l.0.mlp.up_proj")


def test_compressed_chunk_garbage_fails_cleanly(tmp_path, rng):
    fp = {"architecture": "T", "modules": {"l.0.mlp.up_proj": [64, 64]}}
    write_bundle(tmp_path / "b", fp, random_masks(rng, fp, ["a"]))
    victim = [f for f in _chunk_files(tmp_path / "b", "a", "l.0.mlp.up_proj") if f.is_file()][0]
    victim.write_bytes(b"not zstd at all")
    with pytest.raises(IntegrityError, match="chunk 0"):
        open_bundle(tmp_path / "b").read_packed("a", "l.0.mlp.up_proj")


def test_truncated_and_half_written_bundles(tmp_path, rng):
    fp = random_fingerprint(rng)
    write_bundle(tmp_path / "b", fp, random_masks(rng, fp, ["a"]))
    m = next(iter(fp["modules"]))
    (tmp_path / "b/personas/a/masks" / m / "zarr.json").unlink()
    b = open_bundle(tmp_path / "b")
    assert any("missing or unreadable" in p for p in b.verify())
    with pytest.raises(IntegrityError, match="truncated"):
        b.read_packed("a", m)
    (tmp_path / "c").mkdir()
    with pytest.raises(MaskstoreError, match="not a readable maskstore bundle"):
        open_bundle(tmp_path / "c")
    with pytest.raises(MaskstoreError, match="no bundle"):
        open_bundle(tmp_path / "nope")


def test_failed_write_leaves_nothing_visible(tmp_path, rng):
    fp = random_fingerprint(rng)
    with pytest.raises(RuntimeError):
        with create_bundle(tmp_path / "b", fp) as b:
            with b.persona_writer("a", method="t") as w:
                w.write_mask(
                    next(iter(fp["modules"])),
                    np.ones(fp["modules"][next(iter(fp["modules"]))], bool),
                )
                raise RuntimeError("boom")
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []
    write_bundle(tmp_path / "b", fp, random_masks(rng, fp, ["a"]))
    b = open_bundle(tmp_path / "b", writable=True)
    with pytest.raises(MaskstoreError, match="not in the bundle's model"):
        with b.persona_writer("half", method="t") as w:
            w.write_mask("no.such.module", np.ones((1, 1), bool))
    assert open_bundle(tmp_path / "b").personas == ["a"]


@pytest.mark.slow
def test_killed_writer_leaves_bundle_valid(tmp_path, rng):
    fp = {"architecture": "T", "modules": {f"l.{i}.mlp.up_proj": [256, 256] for i in range(200)}}
    write_bundle(tmp_path / "b", fp, {"a": {"l.0.mlp.up_proj": np.ones((256, 256), bool)}})
    script = textwrap.dedent(f"""
        import numpy as np, sys
        from maskstore.store.opener import open_bundle
        b = open_bundle({str(tmp_path / "b")!r}, writable=True)
        with b.persona_writer("victim", method="t") as w:
            for i in range(200):
                w.write_mask(f"l.{{i}}.mlp.up_proj", np.ones((256, 256), bool))
                if i == 3:
                    print("writing", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    b = open_bundle(tmp_path / "b")
    assert b.personas == ["a"] and b.verify() == []


def test_unknown_format_version_and_schema_failure(tmp_path, rng):
    fp = random_fingerprint(rng)
    write_bundle(tmp_path / "b", fp, random_masks(rng, fp, ["a"]))
    root = tmp_path / "b/zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["maskstore"]["format_version"] = 99
    root.write_text(json.dumps(doc))
    with pytest.raises(MaskstoreError, match="format version 99"):
        open_bundle(tmp_path / "b")
    doc["attributes"]["maskstore"]["format_version"] = 1
    doc["attributes"]["maskstore"]["model"]["modules"] = {"x": [0, 3]}
    root.write_text(json.dumps(doc))
    with pytest.raises(MaskstoreError, match="bundle.schema.json"):
        open_bundle(tmp_path / "b")


def test_edited_persona_metadata_is_detected(tmp_path, rng):
    fp = random_fingerprint(rng)
    write_bundle(tmp_path / "b", fp, random_masks(rng, fp, ["a"]))
    f = tmp_path / "b/personas/a/zarr.json"
    doc = json.loads(f.read_text())
    doc["attributes"]["maskstore"]["sparsity"] = 0.9
    f.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="metadata digest"):
        open_bundle(tmp_path / "b").persona("a")
    del doc["attributes"]["maskstore"]["method"]
    f.write_text(json.dumps(doc))
    with pytest.raises(MaskstoreError, match="persona.schema.json"):
        open_bundle(tmp_path / "b").persona("a")


@pytest.mark.parametrize(
    "name", ["", "a/b", "..", "a..b", ".hidden", "x\n", "x\x00y", "é", "a" * 129]
)
def test_invalid_persona_names(tmp_path, rng, name):
    fp = random_fingerprint(rng)
    with create_bundle(tmp_path / "b", fp) as b:
        with pytest.raises(MaskstoreError, match="invalid persona name"):
            b.persona_writer(name, method="t")


def test_existing_bundle_not_overwritten_without_force(tmp_path, rng):
    fp = random_fingerprint(rng)
    write_bundle(tmp_path / "b", fp, random_masks(rng, fp, ["a"]))
    before = open_bundle(tmp_path / "b").digest
    with pytest.raises(MaskstoreError, match="already exists"):
        create_bundle(tmp_path / "b", fp)
    with pytest.raises(MaskstoreError, match="already exists"):
        open_bundle(tmp_path / "b", writable=True).persona_writer("a", method="t")
    assert open_bundle(tmp_path / "b").digest == before


def test_metadata_only_until_arrays_are_asked(tmp_path, rng, monkeypatch):
    fp = random_fingerprint(rng)
    write_bundle(tmp_path / "b", fp, random_masks(rng, fp, ["a"]))
    from maskstore.store.stores import LocalStore

    reads = []
    get, read_into = LocalStore.get, LocalStore.read_into
    monkeypatch.setattr(
        LocalStore, "get", lambda s, k, limit=None: reads.append(k) or get(s, k, limit)
    )
    monkeypatch.setattr(
        LocalStore, "read_into", lambda s, k, buf: reads.append(k) or read_into(s, k, buf)
    )
    b = open_bundle(tmp_path / "b")
    _ = b.personas, b.persona("a"), b.digest
    assert reads and all(k.endswith("zarr.json") for k in reads)
    module = next(iter(fp["modules"]))
    b.read_mask("a", module)  # the spy does see chunk reads
    assert f"personas/a/masks/{module}/c/0/0" in reads


def test_arrays_reencoded_by_other_tools_read_through_zarr(tmp_path, rng):
    """A mask array rewritten outside maskstore's profile (sharded, gzip) still reads and verifies."""
    fp = {"architecture": "T", "modules": {"l.0.mlp.up_proj": [300, 77]}}
    masks = random_masks(rng, fp, ["a"])
    write_bundle(tmp_path / "b", fp, masks)
    digest = open_bundle(tmp_path / "b").digest
    path = "personas/a/masks/l.0.mlp.up_proj"
    g = zarr.open_group(str(tmp_path / "b"), mode="r+")
    old = g[path]
    data, attrs = old[:], old.attrs.asdict()
    rows = 300  # one chunk, so the recorded chunk digests still describe it
    new = g.create_array(
        path,
        shape=data.shape,
        dtype=data.dtype,
        chunks=(rows // 3, data.shape[1]),
        shards=(rows, data.shape[1]),
        compressors=[zarr.codecs.GzipCodec()],
        overwrite=True,
    )
    new[:] = data
    new.attrs.update(attrs)
    b = open_bundle(tmp_path / "b")
    assert np.array_equal(b.read_mask("a", "l.0.mlp.up_proj"), masks["a"]["l.0.mlp.up_proj"])
    assert b.verify() == [] and b.digest == digest


def test_an_edited_fingerprint_is_refused_before_any_allocation(tmp_path, rng):
    """A fingerprint edited to a huge shape (116 GiB of packed rows) is refused by the persona's
    model digest before ``read_mask`` allocates anything."""
    import json
    import resource

    from _helpers import random_fingerprint, random_masks, write_bundle

    from maskstore.errors import IntegrityError
    from maskstore.store.opener import open_bundle

    fp = random_fingerprint(rng)
    b = write_bundle(tmp_path / "b", fp, random_masks(rng, fp, ["a"]))
    root = json.loads((b / "zarr.json").read_text())
    mod = next(iter(fp["modules"]))
    root["attributes"]["maskstore"]["model"]["modules"][mod] = [1_000_000, 1_000_000]
    (b / "zarr.json").write_text(json.dumps(root))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(IntegrityError, match="another model fingerprint"):
        open_bundle(b).read_mask("a", mod)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


@pytest.mark.parametrize("bad", ["..", ".", "..\\\\..\\\\x", "model..x", "a/b", ""])
def test_module_names_that_cannot_be_read_back_are_refused_at_write_time(tmp_path, bad):
    from maskstore import create_bundle
    from maskstore.errors import MaskstoreError

    fp = {"architecture": "T", "modules": {"model.ok": [2, 8], bad: [2, 8]}}
    with pytest.raises(MaskstoreError, match="invalid module name"):
        create_bundle(tmp_path / "b", fp)
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_import_pt_of_a_file_naming_a_path_is_refused(tmp_path, cli):
    import torch

    src = tmp_path / "pt"
    src.mkdir()
    torch.save(
        torch.ones(2, 8, dtype=torch.bool), src / "M_p_model.layers.0\\..\\..\\x.mlp.up_proj.pt"
    )
    code, _, err = cli("import-pt", src, "--out", tmp_path / "out.zarr")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.zarr").exists()


def test_import_pt_bounds_tensors_before_materialising(tmp_path, cli):
    """A 1.8 KB file of an expanded (stride-0) 100000 x 100000 bool tensor, a sparse COO tensor
    and a meta tensor are each refused in one line, in bounded memory."""
    import resource

    import torch

    cases = {
        "expanded": torch.ones(1, 1, dtype=torch.bool).expand(100_000, 100_000),
        "sparse": torch.eye(4, dtype=torch.bool).to_sparse(),
        "meta": torch.ones(4, 4, dtype=torch.bool, device="meta"),
    }
    for name, t in cases.items():
        src = tmp_path / name
        src.mkdir()
        torch.save(t, src / "M_p_model.layers.0.mlp.up_proj.pt")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        code, _, err = cli("import-pt", src, "--out", tmp_path / f"{name}.zarr")
        assert code == 2 and len(err.strip().splitlines()) == 1, (name, err)
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300_000, name
        assert not (tmp_path / f"{name}.zarr").exists()
