import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import random_masks, write_bundle
from _tiny import byte_tokenizer, tiny_llama

import maskstore
from maskstore.build import BuildConfig, build
from maskstore.build import calibration as cal
from maskstore.errors import IntegrityError, MaskstoreError
from maskstore.repo import MAX_DELTA_DEPTH, init_repo, open_repo
from maskstore.store.opener import open_bundle
from maskstore.store.stores import RefConflict, open_store


def _family(rng, fp, names, flip=0.02):
    base = {m: rng.random(tuple(s)) < 0.5 for m, s in fp["modules"].items()}
    return {n: {m: b ^ (rng.random(b.shape) < flip) for m, b in base.items()} for n in names}


@pytest.fixture
def fp(rng):
    return {
        "architecture": "T",
        "modules": {f"model.layers.{i}.mlp.up_proj": [96, 200] for i in range(3)},
    }


def test_commit_checkout_roundtrip_dedup_and_lazy_open(tmp_path, rng, fp):
    masks = _family(rng, fp, ["a", "b", "c"])
    masks["a_copy"] = masks["a"]
    write_bundle(tmp_path / "b", fp, masks)
    repo = init_repo(tmp_path / "repo")
    vid = repo.commit(open_bundle(tmp_path / "b"), "first")
    assert len(vid) == 64 and repo.resolve("main") == vid
    repo.tag("v1", "main")
    snap = maskstore.open(f"{tmp_path / 'repo'}@v1")
    assert snap.digest == open_bundle(tmp_path / "b").digest == repo.manifest(vid)["bundle_digest"]
    for p, mods in masks.items():
        for m, arr in mods.items():
            assert np.array_equal(snap.read_mask(p, m), arr)
    assert snap.verify() == []
    # a_copy's chunks are a's chunks: stored once (count the objects, without deltas)
    without = {k: v for k, v in masks.items() if k != "a_copy"}
    write_bundle(tmp_path / "b3", fp, without)
    r_with, r_without = init_repo(tmp_path / "with"), init_repo(tmp_path / "without")
    v_with = r_with.commit(open_bundle(tmp_path / "b"), "x", delta=False)
    r_without.commit(open_bundle(tmp_path / "b3"), "x", delta=False)
    arrays = r_with.manifest(v_with)["personas"]
    assert arrays["a_copy"]["arrays"] == arrays["a"]["arrays"]
    n_with = len(r_with.store.list("chunks/"))
    assert n_with == len(r_without.store.list("chunks/")) == 3 * len(fp["modules"])
    repo.checkout("v1", tmp_path / "out")
    assert open_bundle(tmp_path / "out").digest == snap.digest
    # unchanged content committed again: refused as empty, and with allow_empty no new chunk
    n_chunks = len(repo.store.list("chunks/"))
    with pytest.raises(MaskstoreError, match="nothing to commit"):
        repo.commit(open_bundle(tmp_path / "b"), "again")
    repo.commit(open_bundle(tmp_path / "b"), "again", allow_empty=True)
    assert len(repo.store.list("chunks/")) == n_chunks


def test_deltas_are_exact_smaller_and_bounded(tmp_path, rng, fp):
    names = ["p0", "p1", "p2", "p3"]
    masks = _family(rng, fp, names)
    write_bundle(tmp_path / "b", fp, masks)
    plain = init_repo(tmp_path / "plain")
    plain.commit(open_bundle(tmp_path / "b"), "x", delta=False)
    repo = init_repo(tmp_path / "repo")
    vid = repo.commit(open_bundle(tmp_path / "b"), "x")
    snap = repo.snapshot(vid)
    deltas = [
        p
        for p in names
        if any("delta" in e for e in snap.manifest["personas"][p]["arrays"].values())
    ]
    assert len(deltas) >= 3
    for p in names:
        for m, arr in masks[p].items():
            assert np.array_equal(snap.bundle.read_mask(p, m), arr)
    assert snap.bundle.nbytes_on_disk(kind="masks") < 0.6 * plain.snapshot(
        "main"
    ).bundle.nbytes_on_disk(kind="masks")
    # the same persona drifting over many versions: chains stay bounded
    cur = masks["p0"]
    for i in range(MAX_DELTA_DEPTH + 3):
        cur = {m: a ^ (rng.random(a.shape) < 0.01) for m, a in cur.items()}
        write_bundle(tmp_path / f"d{i}", fp, {"p0": cur})
        v = repo.commit(open_bundle(tmp_path / f"d{i}"), f"drift {i}")
        s = repo.snapshot(v)
        for m in fp["modules"]:
            assert s.source.depth("p0", m) <= MAX_DELTA_DEPTH
            assert np.array_equal(s.bundle.read_mask("p0", m), cur[m])


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    root = Path(__file__).resolve().parents[1] / "examples" / "data"
    tok, model = byte_tokenizer(), tiny_llama(seed=11)
    calib = {
        n: list(cal.batches(tok, cal.read_samples(root / f"{n}.txt")[:8], batch_size=4))
        for n in ("introvert", "extrovert")
    }
    out = tmp_path_factory.mktemp("rb") / "b"
    build(
        model,
        calib,
        out,
        pairs=[("introvert", "extrovert")],
        config=BuildConfig(method="contrastive-wanda", sparsity=0.4),
    )
    return out


def test_recipe_persona_costs_no_mask_bits_and_recomputes(tmp_path, tiny_bundle):
    repo = init_repo(tmp_path / "repo")
    vid = repo.commit(open_bundle(tiny_bundle), "recipe", recipes=("introvert",))
    snap = repo.snapshot(vid)
    assert snap.is_recipe("introvert") and snap.bundle.nbytes_on_disk("introvert", "masks") == 0
    with pytest.raises(MaskstoreError, match="recipe"):
        snap.bundle.read_mask("introvert", "model.layers.0.mlp.up_proj")
    with pytest.raises(MaskstoreError, match="pass `model`"):
        repo.checkout(vid, tmp_path / "x")
    model = tiny_llama(seed=11)
    from maskstore.build import recompute_recipe

    with pytest.raises(MaskstoreError, match="recompute="):
        repo.checkout(vid, tmp_path / "out", model=model)  # recipes need the scoring injected
    repo.checkout(vid, tmp_path / "out", model=model, recompute=recompute_recipe)
    assert open_bundle(tmp_path / "out").digest == open_bundle(tiny_bundle).digest
    with pytest.raises(IntegrityError, match="different mask"):
        repo.checkout(vid, tmp_path / "bad", model=tiny_llama(seed=12), recompute=recompute_recipe)
    assert not (tmp_path / "bad").exists()
    # a live model loads the recipe directly
    h = maskstore.attach(model, snap.bundle)
    base = model.model.layers[0].mlp.up_proj.weight.clone()
    h.use("introvert")
    want = base * open_bundle(tiny_bundle).read_mask(
        "introvert", "model.layers.0.mlp.up_proj", as_torch=True
    )
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, want)


def test_tags_never_move_and_branches_fast_forward_only(tmp_path, rng, fp):
    write_bundle(tmp_path / "b1", fp, _family(rng, fp, ["a"]))
    write_bundle(tmp_path / "b2", fp, _family(rng, fp, ["a"]))
    r1, r2 = init_repo(tmp_path / "r1"), init_repo(tmp_path / "r2")
    v1 = r1.commit(open_bundle(tmp_path / "b1"), "one")
    r1.tag("rel", v1)
    r1.tag("rel", v1)  # same target: fine
    v2 = r1.commit(open_bundle(tmp_path / "b2"), "two")
    with pytest.raises(RefConflict, match="tags never move"):
        r1.tag("rel", v2)
    remote = tmp_path / "remote"
    r1.push(remote, "main")
    r2.commit(open_bundle(tmp_path / "b2"), "diverged")
    with pytest.raises(RefConflict, match="maskstore pull"):
        r2.push(remote, "main")
    assert open_repo(remote).resolve("main") == v2


def _racer(remote: str, repo: str, ref: str, env: dict) -> subprocess.Popen:
    code = (
        "import sys\nfrom maskstore.repo import open_repo\n"
        "try:\n"
        f"    open_repo({repo!r}).push({remote!r}, {ref!r})\n    print('WON')\n"
        "except Exception as e:\n    print('LOST', type(e).__name__, e)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )


def _race(tmp_path, rng, fp, remote: str, env: dict) -> None:
    repos = []
    for i in range(2):
        write_bundle(tmp_path / f"rb{i}", fp, _family(rng, fp, ["a"]))
        r = init_repo(tmp_path / f"race{i}")
        r.commit(open_bundle(tmp_path / f"rb{i}"), f"racer {i}")
        r.tag("release", "main")
        repos.append(r)
    for ref in ("release", "main"):
        procs = [_racer(remote, str(tmp_path / f"race{i}"), ref, env) for i in range(2)]
        outs = [p.communicate(timeout=120)[0].strip() for p in procs]
        assert sorted(o.split()[0] for o in outs) == ["LOST", "WON"], outs
        assert "RefConflict" in next(o for o in outs if o.startswith("LOST"))
        winner = repos[[o.startswith("WON") for o in outs].index(True)]
        store = open_store(remote)
        key = f"refs/{'tags' if ref == 'release' else 'branches'}/{ref}"
        assert store.get(key).decode() == winner.resolve(ref)


@pytest.mark.slow
def test_racing_pushes_to_a_folder(tmp_path, rng, fp):
    _race(tmp_path, rng, fp, str(tmp_path / "remote"), dict(os.environ))


@pytest.mark.slow
def test_s3_push_pull_moves_only_missing_objects(tmp_path, rng, fp, s3_server, cli):
    masks = _family(rng, fp, ["a", "b"])
    write_bundle(tmp_path / "b1", fp, masks)
    repo = tmp_path / "repo"
    assert cli("commit", tmp_path / "b1", "-m", "one", "--repo", repo)[0] == 0
    code, out, err = cli("push", "s3://masks/team", "main", "--repo", repo, "--json")
    assert code == 0, err
    first = json.loads(out)
    assert first["objects"] > 0 and first["bytes"] > 0
    code, out, err = cli("push", "s3://masks/team", "main", "--repo", repo, "--json")
    assert json.loads(out)["objects"] == 0
    masks["c"] = {m: ~a for m, a in masks["a"].items()}
    write_bundle(tmp_path / "b2", fp, masks)
    cli("commit", tmp_path / "b2", "-m", "two", "--repo", repo)
    code, out, err = cli("push", "s3://masks/team", "main", "--repo", repo, "--json")
    second = json.loads(out)
    assert 0 < second["objects"] < first["objects"] + 10 and second["skipped"] > 0
    code, out, err = cli("pull", "s3://masks/team", "main", "--repo", tmp_path / "clone", "--json")
    assert code == 0, err
    clone = open_repo(tmp_path / "clone")
    assert clone.resolve("main") == open_repo(repo).resolve("main") and clone.verify() == []
    snap = clone.snapshot("main").bundle
    assert np.array_equal(
        snap.read_mask("c", next(iter(fp["modules"]))), ~masks["a"][next(iter(fp["modules"]))]
    )


@pytest.mark.slow
def test_racing_pushes_to_s3(tmp_path, rng, fp, s3_server):
    _race(tmp_path, rng, fp, "s3://masks/race", {**os.environ, **s3_server})


def test_corruption_is_named_on_verify_pull_and_push(tmp_path, rng, fp):
    write_bundle(tmp_path / "b", fp, _family(rng, fp, ["a", "b"]))
    repo = init_repo(tmp_path / "repo")
    repo.commit(open_bundle(tmp_path / "b"), "x")
    repo.push(tmp_path / "remote", "main")
    victim = sorted((tmp_path / "remote" / "chunks").rglob("*"))[-1]
    name = victim.parent.name + victim.name
    victim.write_bytes(b"garbage")
    with pytest.raises(IntegrityError, match=name):
        init_repo(tmp_path / "clone").pull(tmp_path / "remote", "main")
    assert open_repo(tmp_path / "clone").branch_head("main") is None  # ref not moved
    local = tmp_path / "repo" / "chunks" / victim.parent.name / victim.name
    local.write_bytes(b"garbage")
    assert any(name in p for p in repo.verify())
    with pytest.raises(IntegrityError, match=name):
        repo.push(tmp_path / "remote2", "main")


def _run_killed(code: str, kill_after: int) -> int:
    """Run ``code`` in a fresh process whose store (``store(path)``) dies after ``kill_after``
    completed writes."""
    prelude = (
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from _faults import KillAfter\nfrom maskstore.store.stores import open_store\n"
        f"def store(path):\n    return KillAfter(open_store(path, create=True), {kill_after})\n"
    )
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True).returncode


@pytest.mark.slow
def test_commit_and_push_killed_at_many_points_leave_valid_repos(tmp_path, rng, fp):
    write_bundle(tmp_path / "b1", fp, _family(rng, fp, ["a", "b"]))
    write_bundle(tmp_path / "b2", fp, _family(rng, fp, ["a", "b", "c"]))
    repo = init_repo(tmp_path / "repo")
    v1 = repo.commit(open_bundle(tmp_path / "b1"), "base")
    repo_path, remote = str(tmp_path / "repo"), str(tmp_path / "remote")
    commit = (
        "from maskstore.repo import Repository\nfrom maskstore import open_bundle\n"
        f"Repository(store({repo_path!r}), {repo_path!r})"
        f".commit(open_bundle({str(tmp_path / 'b2')!r}), 'next')"
    )
    push = (
        "from maskstore.repo import open_repo\n"
        f"open_repo({repo_path!r}).push(store({remote!r}), 'main')"
    )
    killed = 0
    for k in range(1, 40):
        rc = _run_killed(commit, k)
        r = open_repo(tmp_path / "repo")
        head = r.resolve("main")
        assert r.verify() == [] and (head == v1 or r.manifest(head)["message"] == "next")
        killed += rc == 137
        if rc == 0:
            break
    assert killed >= 3
    for k in range(1, 80, 2):
        rc = _run_killed(push, k)
        if (tmp_path / "remote" / "maskstore-repo.json").exists():
            rem = open_repo(tmp_path / "remote")
            assert rem.verify() == []  # whatever refs exist point at complete versions
        if rc == 0:
            break
    assert open_repo(tmp_path / "remote").resolve("main") == open_repo(tmp_path / "repo").resolve(
        "main"
    )


def test_gc_export_import_and_version_diff(tmp_path, rng, fp, cli):
    masks = _family(rng, fp, ["a", "b"])
    write_bundle(tmp_path / "b1", fp, masks)
    repo = tmp_path / "repo"
    cli("commit", tmp_path / "b1", "-m", "one", "--repo", repo)
    cli("tag", "v1", "--repo", repo)
    changed = dict(masks)
    changed["a"] = {m: a ^ (rng.random(a.shape) < 0.1) for m, a in masks["a"].items()}
    changed["new"] = masks["b"]
    write_bundle(tmp_path / "b2", fp, changed)
    code, out, err = cli("commit", tmp_path / "b2", "-m", "exp", "--branch", "exp", "--repo", repo)
    assert code == 0, err
    code, out, err = cli("diff", "--versions", "v1", "exp", "--repo", repo, "--json")
    d = json.loads(out)
    assert d["added"] == ["new"] and d["unchanged"] == ["b"] and set(d["changed"]) == {"a"}
    assert d["changed"]["a"]["modules_changed"] == 3
    assert 0.05 < d["changed"]["a"]["diff_ratio_changed_modules"] < 0.15
    code, out, err = cli("export", "exp", tmp_path / "exp.zip", "--repo", repo)
    assert code == 0, err
    code, out, err = cli("import", tmp_path / "exp.zip", "--repo", tmp_path / "other")
    assert code == 0, err
    assert open_repo(tmp_path / "other").resolve("exp") == open_repo(repo).resolve("exp")
    r = open_repo(repo)
    before = len(r.store.list("chunks/"))
    assert cli("branch", "exp", "--delete", "--repo", repo)[0] == 0
    code, out, err = cli("gc", "--grace", "0", "--repo", repo, "--json")
    removed = json.loads(out)["removed"]
    assert removed > 0 and len(r.store.list("chunks/")) < before
    assert r.verify() == []
    r.checkout("v1", tmp_path / "co")
    assert open_bundle(tmp_path / "co").digest == open_bundle(tmp_path / "b1").digest
    code, out, err = cli("log", "--repo", repo, "--json")
    doc = json.loads(out)
    assert [e["message"] for e in doc["versions"]] == ["one"]
    assert doc["versions"][0]["refs"] == ["main", "v1"] and doc["schema_version"] == 1
    code, out, err = cli("checkout", "nope", "--out", tmp_path / "x", "--repo", repo)
    assert code == 2 and "unknown version" in err


def test_s3_without_credentials_is_a_user_error(tmp_path, rng, fp, s3_server, cli):
    write_bundle(tmp_path / "b", fp, random_masks(rng, fp, ["a"]))
    repo = tmp_path / "repo"
    assert cli("commit", tmp_path / "b", "-m", "one", "--repo", repo)[0] == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        "AWS_ENDPOINT_URL": s3_server["AWS_ENDPOINT_URL"],
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    r = subprocess.run(
        [sys.executable, "-m", "maskstore.cli", "push", "s3://masks/nocreds", "main",
         "--repo", str(repo)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "no S3 credentials" in lines[0], r.stderr


def test_a_remote_tag_never_shadows_a_local_branch(tmp_path, rng, fp, cli):
    """A remote holding a tag named ``main`` (written there by hand): pulling it never creates
    a local tag beside the local branch, and a store holding both is refused, not read as
    either."""
    b1 = write_bundle(tmp_path / "b1", fp, random_masks(rng, fp, ["a"]))
    b2 = write_bundle(tmp_path / "b2", fp, random_masks(rng, fp, ["evil"]))
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert cli("commit", b1, "-m", "mine", "--repo", local)[0] == 0
    assert cli("commit", b2, "-m", "theirs", "--repo", remote)[0] == 0
    mine = (local / "refs/branches/main").read_text().strip()
    theirs = (remote / "refs/branches/main").read_text().strip()
    (remote / "refs/tags").mkdir(exist_ok=True)
    (remote / "refs/branches/main").rename(remote / "refs/tags/main")  # only a tag "main" now
    code, _, err = cli("pull", remote, "main", "--repo", local)
    assert code == 2 and "is a branch" in err, err
    assert not (local / "refs/tags/main").exists()
    assert (local / "refs/branches/main").read_text().strip() == mine
    (local / "refs/tags").mkdir(exist_ok=True)
    (local / "refs/tags/main").write_text(theirs)  # both, written by hand: refused
    code, _, err = cli("log", "main", "--repo", local)
    assert code == 1 and "both a tag and a branch" in err, err
    code, _, err = cli("branch", "side", theirs[:12], "--repo", remote)
    assert code == 0, err
    code, _, err = cli("tag", "side", theirs[:12], "--repo", remote)
    assert code == 2 and "is a branch" in err, err
    code, _, err = cli("branch", "main", theirs[:12], "--repo", remote)  # main is a tag there
    assert code == 2 and "is a tag" in err, err


def test_authors_empty_commits_and_repositories_found_from_subfolders(tmp_path, rng, fp, cli,
                                                                      monkeypatch):  # fmt: skip
    """Versions record who committed ($MASKSTORE_AUTHOR, config, git), log shows it; an
    unchanged bundle is refused without --allow-empty; the repository is found from any
    subfolder, --repo and $MASKSTORE_REPO still winning; outside one, the error says init."""
    b = write_bundle(tmp_path / "b", fp, random_masks(rng, fp, ["a"]))
    work = tmp_path / "work"
    (work / "sub" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.delenv("MASKSTORE_REPO", raising=False)
    monkeypatch.setenv("MASKSTORE_AUTHOR", "Ada <ada@example.com>")
    assert cli("init")[0] == 0
    assert cli("commit", b, "-m", "one")[0] == 0
    monkeypatch.chdir(work / "sub" / "deeper")
    code, out, err = cli("log", "--json")
    assert code == 0, err
    assert json.loads(out)["versions"][0]["author"] == "Ada <ada@example.com>"
    code, _, err = cli("commit", b, "-m", "same again")
    assert code == 2 and "nothing to commit" in err and "--allow-empty" in err
    with pytest.raises(MaskstoreError, match="`message` must be a string"):
        open_repo(work / ".maskstore").commit(b, None, allow_empty=True)
    assert not (work / "sub" / "deeper" / ".maskstore").exists()  # found above, not created here
    monkeypatch.delenv("MASKSTORE_AUTHOR")
    code, out, err = cli("commit", b, "-m", "again", "--allow-empty", "--author", "Bob", "--json")
    assert code == 0, err
    code, out, _ = cli("log")
    assert "Bob" in out and "Ada" in out
    other = tmp_path / "other"
    assert cli("commit", b, "-m", "x", "--repo", other)[0] == 0  # --repo wins
    monkeypatch.setenv("MASKSTORE_REPO", str(other))
    assert len(json.loads(cli("log", "--json")[1])["versions"]) == 1  # $MASKSTORE_REPO wins
    monkeypatch.delenv("MASKSTORE_REPO")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("log")
    assert code == 2 and "maskstore init" in err, err
    monkeypatch.chdir(work / "sub")
    assert cli("init")[0] == 0  # init makes a repository here, as git init does
    assert (work / "sub" / ".maskstore" / "maskstore-repo.json").is_file()
    assert len(json.loads(cli("log", "--json", "--repo", work / ".maskstore")[1])["versions"]) == 2


def test_named_remotes_fetch_status_and_clone(tmp_path, rng, fp, cli, s3_server):
    """git's habits: a named remote (S3 with its endpoint recorded) for push/pull/fetch, fetch
    moving no local ref, status against the branch head and the fetched remote head, clone of
    every ref, and a failed clone leaving nothing behind."""
    b1 = write_bundle(tmp_path / "b1", fp, random_masks(rng, fp, ["a", "b"]))
    b2 = write_bundle(tmp_path / "b2", fp, {**random_masks(rng, fp, ["a", "c"])})
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    endpoint = s3_server["AWS_ENDPOINT_URL"]
    for repo in (mine, theirs):
        assert cli("init", "--repo", repo)[0] == 0
        code, _, err = cli("remote", "add", "team", "s3://masks/named", "--endpoint-url",
                           endpoint, "--region", "us-east-1", "--repo", repo)  # fmt: skip
        assert code == 0, err
    doc = json.loads(cli("remote", "--json", "--repo", mine)[1])
    assert doc["remotes"]["team"] == {"url": "s3://masks/named", "endpoint_url": endpoint,
                                      "region": "us-east-1"}  # fmt: skip
    assert cli("commit", b1, "-m", "one", "--repo", mine)[0] == 0
    assert cli("push", "team", "main", "--repo", mine)[0] == 0
    assert cli("pull", "team", "main", "--repo", theirs)[0] == 0
    assert cli("commit", b2, "-m", "two", "--repo", theirs)[0] == 0
    assert cli("push", "team", "main", "--repo", theirs)[0] == 0
    before = (mine / "refs/branches/main").read_text()
    code, out, err = cli("fetch", "team", "--json", "--repo", mine)
    assert code == 0, err
    assert json.loads(out)["refs"]["main"] == (theirs / "refs/branches/main").read_text().strip()
    assert (mine / "refs/branches/main").read_text() == before  # fetch moves no local ref
    code, out, _ = cli("status", b2, "--json", "--repo", mine)
    st = json.loads(out)
    assert (st["added"], st["removed"], st["changed"]) == (["c"], ["b"], ["a"])
    assert st["remotes"]["team"]["state"] == "behind"
    assert cli("gc", "--grace", "0", "--repo", mine)[0] == 0  # fetched objects survive gc
    assert cli("checkout", st["remotes"]["team"]["head"][:12], "--out", tmp_path / "co",
               "--repo", mine)[0] == 0  # fmt: skip
    for bad in (("remote", "add", "../x", "s3://masks/x"), ("remote", "add", "team", "s3://o"),
                ("remote", "add", "h", "http://example.com/x"), ("remote", "remove", "nope"),
                ("fetch", "nope")):  # fmt: skip
        code, _, err = cli(*bad, "--repo", mine)
        assert code == 2 and len(err.strip().splitlines()) == 1, (bad, err)
    code, out, err = cli("clone", "s3://masks/named", tmp_path / "cl", "--endpoint-url",
                         endpoint, "--json")  # fmt: skip
    assert code == 0, err
    cl = open_repo(tmp_path / "cl")
    assert cl.resolve("main") == (theirs / "refs/branches/main").read_text().strip()
    assert cl.remotes()["origin"]["url"] == "s3://masks/named"
    code, _, err = cli("clone", tmp_path / "missing", tmp_path / "cl2")
    assert code == 2 and not (tmp_path / "cl2").exists(), err
    code, _, err = cli("clone", tmp_path / "b1", tmp_path / "cl")  # exists
    assert code == 2 and "already exists" in err


def test_provenance_survives_commit_checkout_push_clone_and_pull(tmp_path, rng, fp, cli):
    """The model a bundle was built on (its `source`: model, revision, dtype) and every
    persona's record come back bit for bit from a checkout, a checkout of a clone, and a
    checkout after a pull; a checked-out bundle committed again keeps them (a checkout wrote
    'model: unrecorded' and the next commit spread the loss)."""
    source = {"model": "org/tiny-model", "revision": "a" * 40, "dtype": "bfloat16"}
    write_bundle(tmp_path / "b", fp, _family(rng, fp, ["a", "b"]), source=source)
    repo = str(tmp_path / "repo")
    for args in (("init",), ("commit", tmp_path / "b", "-m", "x"), ("tag", "v1")):
        assert cli(*args, "--repo", repo)[0] == 0
    want = open_bundle(tmp_path / "b")
    card = cli("info", tmp_path / "b", "--card", "--json")[1]

    def same(path):
        got = open_bundle(path)
        assert got.model_source == source
        assert {p: got.persona(p) for p in got.personas} == {
            p: want.persona(p) for p in want.personas
        }

        def cards(doc):  # each card less its 'load' line, which names the bundle's path
            return [{k: v for k, v in c.items() if k != "load"} for c in json.loads(doc)["cards"]]

        assert cards(cli("info", path, "--card", "--json")[1]) == cards(card)
        assert all("org/tiny-model" in c["load"] for c in json.loads(card)["cards"])

    assert cli("checkout", "v1", "--out", tmp_path / "co", "--repo", repo)[0] == 0
    same(tmp_path / "co")
    assert cli("commit", tmp_path / "co", "-m", "again", "--allow-empty", "--repo", repo)[0] == 0
    assert cli("checkout", "main", "--out", tmp_path / "co2", "--repo", repo)[0] == 0
    same(tmp_path / "co2")
    remote = tmp_path / "remote"
    assert cli("push", remote, "main", "--repo", repo)[0] == 0
    assert cli("clone", remote, tmp_path / "clone")[0] == 0
    assert cli("checkout", "main", "--out", tmp_path / "co3", "--repo", tmp_path / "clone")[0] == 0
    same(tmp_path / "co3")
    other = str(tmp_path / "other")
    assert cli("init", "--repo", other)[0] == 0
    assert cli("pull", remote, "main", "--repo", other)[0] == 0
    assert cli("checkout", "main", "--out", tmp_path / "co4", "--repo", other)[0] == 0
    same(tmp_path / "co4")


def test_remote_tracking_refs_follow_push_and_pull_and_hints_work_when_pasted(tmp_path, rng, fp,
                                                                               cli):  # fmt: skip
    """A push or pull through a named remote moves REMOTE/BRANCH (status said 'ahead' right
    after a push, 'not fetched' after a pull), REMOTE/BRANCH is accepted as a ref, and the
    advice after a refused push or a conflict names the remote as the user typed it and works
    when pasted (it named the URL, which fails where the remote has options)."""
    import shlex

    for i in range(3):
        write_bundle(tmp_path / f"b{i}", fp, _family(rng, fp, ["a", "b"], flip=0.3))
    r1, r2 = str(tmp_path / "r1"), str(tmp_path / "r2")
    remote = tmp_path / "remote"
    assert cli("init", "--repo", r1)[0] == 0
    assert cli("commit", tmp_path / "b0", "-m", "x", "--repo", r1)[0] == 0
    assert cli("remote", "add", "team", remote, "--repo", r1)[0] == 0
    assert cli("push", "team", "main", "--repo", r1)[0] == 0
    assert "team/main: up to date" in cli("status", "--repo", r1)[1]
    assert cli("checkout", "team/main", "--out", tmp_path / "co", "--repo", r1)[0] == 0
    assert open_bundle(tmp_path / "co").digest == open_bundle(tmp_path / "b0").digest
    # a teammate pushes, we commit: our push is refused, and its advice runs as printed
    assert cli("clone", remote, r2)[0] == 0
    assert cli("commit", tmp_path / "b1", "-m", "y", "--repo", r2)[0] == 0
    assert cli("push", "origin", "main", "--repo", r2)[0] == 0
    assert cli("commit", tmp_path / "b2", "-m", "z", "--repo", r1)[0] == 0
    code, _, err = cli("push", "team", "main", "--repo", r1)
    assert code == 2 and "maskstore pull team main" in err and str(remote) not in err
    advice = err.split("with maskstore ", 1)[1].split(",")[0]
    code, _, err = cli(*shlex.split(advice), "--repo", r1)  # the pasted command
    assert code == 2 and "maskstore pull team main --ours NAME or --theirs NAME" in err
    assert "team/main: diverged" in cli("status", "--repo", r1)[1]  # the remote's head is known
    code, _, err = cli("pull", "team", "main", "--theirs", "a", "--theirs", "b", "--repo", r1)
    assert code == 0, err
    code, out, _ = cli("push", "team", "main", "--repo", r1)
    assert code == 0 and "team/main: up to date" in cli("status", "--repo", r1)[1]
    for bad in ("team/../../x", "nobody/main", "team/"):
        code, _, err = cli("checkout", bad, "--out", tmp_path / "x", "--repo", r1)
        assert code == 2 and len(err.strip().splitlines()) == 1


def test_pull_names_stale_bundles_and_status_tells_here_from_upstream(tmp_path, rng, fp, cli):
    """A teammate renames a persona and pushes; we pull (fast-forward). The pull says our
    checked-out bundle still holds the old version, with the command that updates it, and
    that command works when pasted; before it, status reports the rename as changed upstream
    (it showed '+ new / - old' as if we had made it) and our own edit as changed here."""
    import shlex

    write_bundle(tmp_path / "b", fp, _family(rng, fp, ["quiet", "loud", "calm"], flip=0.3))
    mine, theirs, remote = str(tmp_path / "mine"), str(tmp_path / "theirs"), tmp_path / "remote"
    assert cli("init", "--repo", mine)[0] == 0
    assert cli("commit", tmp_path / "b", "-m", "x", "--repo", mine)[0] == 0
    assert cli("remote", "add", "team", remote, "--repo", mine)[0] == 0
    assert cli("push", "team", "main", "--repo", mine)[0] == 0
    work = tmp_path / "work.zarr"
    assert cli("checkout", "main", "--out", work, "--repo", mine)[0] == 0
    assert cli("clone", remote, theirs)[0] == 0
    tw = tmp_path / "their.zarr"
    assert cli("checkout", "main", "--out", tw, "--repo", theirs)[0] == 0
    assert cli("mv", tw, "quiet", "introvert")[0] == 0
    assert cli("commit", tw, "-m", "rename", "--repo", theirs)[0] == 0
    assert cli("push", "origin", "main", "--repo", theirs)[0] == 0
    assert cli("rm", work, "calm")[0] == 0  # our own, uncommitted change
    code, out, err = cli("pull", "team", "main", "--repo", mine, "--json")
    assert code == 0, err
    # both bundles that held the old head: the one committed from, the one checked out
    assert json.loads(out)["stale"] == sorted(
        [str((tmp_path / "b").resolve()), str(work.resolve())]
    )
    code, out, _ = cli("status", work, "--repo", mine, "--json")
    doc = json.loads(out)
    assert doc["upstream"] == ["introvert", "quiet"] and doc["here"] == ["calm"]
    text = cli("status", work, "--repo", mine)[1]
    assert "+ introvert" not in text and "- quiet" not in text and "- calm" in text
    assert "changed upstream" in text
    code, out, _ = cli("pull", "team", "main", "--repo", mine)  # up to date: nothing stale
    assert code == 0 and "still holds" not in out
    advice = text.split("(take them with maskstore ", 1)[1].split(")\n", 1)[0]  # one line
    assert cli(*shlex.split(advice), "--repo", mine)[0] == 0  # the pasted command
    assert "nothing to commit" in cli("status", work, "--repo", mine)[1]
