"""Signed refs with real ssh-keygen keys: across two repositories, a folder remote, an S3 remote
(moto on loopback) and an export zip; forged, moved, retargeted and untrusted signatures are
refused (issue 10, item 9)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _helpers import write_bundle

from maskstore import open_bundle
from maskstore.errors import MaskstoreError
from maskstore.repo import init_repo

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
FP = {"architecture": "T", "modules": {"model.layers.0.mlp.up_proj": [16, 24]}}


def _key(folder: Path, name: str) -> Path:
    key = folder / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True
    )
    return key


@pytest.fixture
def keys(tmp_path):
    folder = tmp_path / "keys"
    folder.mkdir()
    alice, mallory = _key(folder, "alice"), _key(folder, "mallory")
    allowed = folder / "allowed_signers"
    pub = (folder / "alice.pub").read_text().split()
    allowed.write_text(f'alice@example.com namespaces="maskstore-ref" {pub[0]} {pub[1]}\n')
    return alice, mallory, allowed


def _versions(tmp_path, rng, n=2):
    repo = init_repo(tmp_path / "a")
    vids = []
    for i in range(n):
        masks = {"p": {m: rng.random(tuple(s)) < 0.5 for m, s in FP["modules"].items()}}
        write_bundle(tmp_path / f"b{i}", FP, masks)
        vids.append(repo.commit(open_bundle(tmp_path / f"b{i}"), f"v{i}"))
    return repo, vids


def test_signed_tags_travel_and_are_checked(tmp_path, rng, keys, cli):
    alice, mallory, allowed = keys
    repo, (v0, v1) = _versions(tmp_path, rng)
    code, out, err = cli("tag", "v0", v0[:12], "--sign", alice, "--repo", repo.path)
    assert code == 0 and "signed" in out, err
    repo.tag("v1", v1, sign=mallory)
    repo.tag("plain", v1)
    sigs = {s["name"]: s for s in repo.signatures(allowed)}
    assert sigs["v0"]["ok"] and sigs["v0"]["signer"] == "alice@example.com"
    assert sigs["v1"]["signed"] and not sigs["v1"]["ok"]
    assert not sigs["plain"]["signed"] and not sigs["main"]["signed"]
    code, out, _ = cli("verify", repo.path, "--signatures", "--allowed-signers", allowed, "--json")
    doc = json.loads(out)
    listed = {s["name"]: s for s in doc["signatures"]}
    # an untrusted signature and unsigned refs fail the check (exit 1), naming the signer's key
    assert code == 1 and not doc["ok"] and listed["v0"]["signer"] == "alice@example.com"
    fpr = subprocess.run(["ssh-keygen", "-lf", f"{mallory}.pub"], capture_output=True,
                         text=True, check=True).stdout.split()[1]  # fmt: skip
    assert listed["v1"]["signer"] == fpr and fpr.startswith("SHA256:")
    assert {p.split(":")[0] for p in doc["problems"]} == {"tag v1", "tag plain", "branch main"}
    code, _, err = cli("verify", repo.path, "--signatures", "--allowed-signers", allowed)
    assert code == 1 and fpr in err

    remote = tmp_path / "remote"
    for t in ("v0", "v1", "plain"):
        repo.push(remote, t)
    b = init_repo(tmp_path / "b")
    b.pull(remote, "v0", require_signed=True, allowed_signers=str(allowed))
    assert b.signatures(allowed)[0]["ok"]  # the signature came along
    with pytest.raises(MaskstoreError, match="tag 'plain' is not signed: refused"):
        b.pull(remote, "plain", require_signed=True, allowed_signers=str(allowed))
    with pytest.raises(MaskstoreError, match="tag 'v1': signed by a key that .* does not allow"):
        b.pull(remote, "v1", require_signed=True, allowed_signers=str(allowed))
    assert set(b.tags()) == {"v0"}
    # the repository's own policy, without flags, and through the CLI
    (tmp_path / "b" / "config.json").write_text(
        json.dumps({"trust": {"allowed_signers": str(allowed), "require_signed": True}})
    )
    code, _, err = cli("pull", remote, "plain", "--repo", tmp_path / "b")
    assert (
        code == 2
        and "tag 'plain' is not signed: refused" in err
        and len(err.strip().splitlines()) == 1
    )
    # export and import carry the signature
    repo.export("v0", tmp_path / "v0.zip")
    c = init_repo(tmp_path / "c")
    assert c.import_(tmp_path / "v0.zip", require_signed=True, allowed_signers=str(allowed)) == [
        "v0"
    ]


def test_forged_moved_and_retargeted_signatures_are_refused(tmp_path, rng, keys):
    alice, _, allowed = keys
    repo, (v0, v1) = _versions(tmp_path, rng)
    repo.tag("v0", v0, sign=alice)
    repo.tag("other", v0)
    remote = tmp_path / "remote"
    repo.push(remote, "v0")
    repo.push(remote, "other")
    sig = (remote / "signatures/tags/v0" / v0).read_bytes()

    def pull(ref):
        init_repo(tmp_path / f"x-{ref}").pull(
            remote, ref, require_signed=True, allowed_signers=str(allowed)
        )

    # moved: v0's valid signature copied to another tag naming the same version
    (remote / "signatures/tags/other").mkdir(parents=True)
    (remote / "signatures/tags/other" / v0).write_bytes(sig)
    with pytest.raises(MaskstoreError, match="does not match this ref"):
        pull("other")
    # retargeted: v0 moved to another version, its valid signature copied next to it
    repo.push(remote, "main")
    (remote / "refs/tags/v0").write_text(v1)
    (remote / "signatures/tags/v0" / v1).write_bytes(sig)
    with pytest.raises(MaskstoreError, match="does not match this ref"):
        pull("v0")
    # forged: armor around garbage
    (remote / "signatures/tags/v0" / v1).write_bytes(
        b"-----BEGIN SSH SIGNATURE-----\nAAAA\n-----END SSH SIGNATURE-----\n"
    )
    with pytest.raises(MaskstoreError, match="refused"):
        pull("v0")


@pytest.mark.slow
def test_signed_branch_through_s3(tmp_path, rng, keys, s3_server):
    alice, _, allowed = keys
    repo, (v0, v1) = _versions(tmp_path, rng)
    masks = {"p": {m: rng.random(tuple(s)) < 0.5 for m, s in FP["modules"].items()}}
    write_bundle(tmp_path / "b9", FP, masks)
    v2 = repo.commit(open_bundle(tmp_path / "b9"), "signed", sign=alice)
    repo.push("s3://masks/signed", "main")
    other = init_repo(tmp_path / "other")
    other.pull("s3://masks/signed", "main", require_signed=True, allowed_signers=str(allowed))
    assert other.resolve("main") == v2
    got = other.snapshot("main").bundle.read_mask("p", "model.layers.0.mlp.up_proj")
    assert np.array_equal(got, masks["p"]["model.layers.0.mlp.up_proj"])
    assert [s["ok"] for s in other.signatures(allowed)] == [True]


def test_a_pull_never_replaces_a_valid_local_signature(tmp_path, rng, keys):
    """The remote's tag carries an untrusted signature of the same (tag, version): pulling it
    keeps the local one that the allowed signers accept."""
    from maskstore.repo import signing

    alice, mallory, allowed = keys
    repo, (v0, _) = _versions(tmp_path, rng)
    repo.tag("v0", v0, sign=alice)
    remote = tmp_path / "remote"
    repo.push(remote, "v0")
    key = signing.signature_key("tags", "v0", v0)
    (remote / key).write_bytes(signing.sign(mallory, "tags", "v0", v0))
    repo.pull(remote, "v0")
    sig = {s["name"]: s for s in repo.signatures(allowed)}["v0"]
    assert sig["ok"] and sig["signer"] == "alice@example.com"
    fresh = init_repo(tmp_path / "fresh")  # a clone without one takes the remote's, untrusted
    fresh.pull(remote, "v0")
    assert not {s["name"]: s for s in fresh.signatures(allowed)}["v0"]["ok"]
