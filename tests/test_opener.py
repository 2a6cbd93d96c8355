"""One opener for every place a bundle lives: a folder, a zip, an ``s3://`` bundle, a
repository version ``REPO@REF`` in a folder or on S3 (a remote that push wrote), tested on a
real S3 server (moto) on loopback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import maskstore
from maskstore.errors import MaskstoreError
from maskstore.store.opener import open_bundle


def _upload(folder, bucket: str, prefix: str) -> None:
    import boto3

    c = boto3.client("s3")
    for f in folder.rglob("*"):
        if f.is_file():
            c.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(folder).as_posix()}")


@pytest.fixture
def built(tmp_path, tiny_dir, calib_files, cli):
    b = tmp_path / "b.zarr"
    code, _, err = cli("build", "--model", tiny_dir, "--samples", "2", "--max-tokens", "16",
                       "--persona", f"introvert={calib_files['introvert']}",
                       "--persona", f"extrovert={calib_files['extrovert']}", "--out", b)  # fmt: skip
    assert code == 0, err
    return b


def test_bundles_and_versions_on_s3_read_like_local_ones(built, tmp_path, s3_server, cli):
    repo = tmp_path / "repo"
    for args in (("commit", built, "-m", "one"), ("tag", "v1"), ("push", "s3://masks/op", "v1")):
        assert cli(*args, "--repo", repo)[0] == 0
    _upload(built, "masks", "plain.zarr")
    local = open_bundle(built)
    for spec in ("s3://masks/plain.zarr", "s3://masks/op@v1", f"{repo}@v1"):
        b = open_bundle(spec)
        assert b.personas == local.personas and b.fingerprint == local.fingerprint, spec
        for p in b.personas:
            for m in list(local.modules)[:3]:
                assert np.array_equal(b.read_mask(p, m), local.read_mask(p, m)), (spec, p, m)
        code, out, err = cli("info", spec, "--json")
        assert code == 0 and json.loads(out)["personas"], err
        code, out, err = cli("overlap", spec, "--json")
        assert code == 0, err
        assert out == cli("overlap", built, "--json")[1].replace(str(built), spec)
        code, _, err = cli("verify", spec)
        assert code == 0, err
    for bad in ("s3://masks/nothing", "s3://masks/op@nosuchtag"):
        code, _, err = cli("info", bad)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
    with pytest.raises(MaskstoreError, match="read-only"):
        open_bundle("s3://masks/plain.zarr", writable=True)


def test_attach_from_s3_fetches_only_what_it_uses(built, tiny_dir, s3_server):
    from maskstore.models import load_model

    _upload(built, "masks", "lazy.zarr")
    model, _ = load_model(str(tiny_dir))
    b = open_bundle("s3://masks/lazy.zarr")
    store = b.store
    seen: list[str] = []
    get, read_into = store.get, getattr(store, "read_into", None)
    store.get = lambda key, *a, **k: (seen.append(key), get(key, *a, **k))[1]
    if read_into is not None:
        store.read_into = lambda key, *a, **k: (seen.append(key), read_into(key, *a, **k))[1]
    h = maskstore.attach(model, b)
    before = {n: m.weight.detach().clone() for n, m in h.modules.items()}
    h.use("introvert")
    masks = [k for k in seen if "/masks/" in k and "/c/" in k]
    assert masks and all("/introvert/" in k for k in masks)  # extrovert's chunks never fetched
    assert not any("/stats/" in k and "/c/" in k for k in seen)  # nor any statistics
    local = open_bundle(built)
    for n, m in h.modules.items():
        want = before[n] * torch.from_numpy(local.read_mask("introvert", n))
        assert torch.equal(m.weight, want), n
    h.detach()
