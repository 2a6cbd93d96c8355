"""Diverged branches: pull merges persona by persona (folder and S3 remotes), conflicts are
named and resolved with --ours/--theirs, --force resets, and the merge has two parents."""

import json

import numpy as np
import pytest
from _helpers import write_bundle

from maskstore.repo import MergeConflict, init_repo, open_repo
from maskstore.store.opener import open_bundle
from maskstore.store.stores import RefConflict

FP = {
    "architecture": "T",
    "modules": {f"model.layers.{i}.mlp.up_proj": [40, 96] for i in range(2)},
}


def _masks(rng, names):
    return {n: {m: rng.random(tuple(s)) < 0.5 for m, s in FP["modules"].items()} for n in names}


def _commit(repo, path, masks, message):
    write_bundle(path, FP, masks, force=True)
    return repo.commit(open_bundle(path), message)


def _same(bundle, masks):
    assert sorted(bundle.personas) == sorted(masks)
    for p, mods in masks.items():
        for m, arr in mods.items():
            assert np.array_equal(bundle.read_mask(p, m), arr), (p, m)


@pytest.fixture(params=["folder", pytest.param("s3", marks=pytest.mark.slow)])
def remote(request, tmp_path):
    if request.param == "folder":
        return str(tmp_path / "remote")
    request.getfixturevalue("s3_server")
    return f"s3://masks/merge-{tmp_path.name}"


def _diverge(tmp_path, rng, remote):
    """Two clones of one version; each then commits its own change to main."""
    start = _masks(rng, ["a", "b", "c"])
    r1 = init_repo(tmp_path / "r1")
    _commit(r1, tmp_path / "b0", start, "start")
    r1.push(remote, "main")
    r2 = init_repo(tmp_path / "r2")
    assert r2.pull(remote, "main").outcome == "created"
    return r1, r2, start


def test_diverged_branches_merge_by_persona(tmp_path, rng, remote):
    r1, r2, start = _diverge(tmp_path, rng, remote)
    mine, theirs = dict(start), dict(start)
    theirs["a"] = _masks(rng, ["a"])["a"]  # r1 changes a and removes c
    del theirs["c"]
    v1 = _commit(r1, tmp_path / "b1", theirs, "r1: new a, no c")
    r1.push(remote, "main")
    mine["b"] = _masks(rng, ["b"])["b"]  # r2 changes b and adds d
    mine["d"] = _masks(rng, ["d"])["d"]
    v2 = _commit(r2, tmp_path / "b2", mine, "r2: new b, add d")
    with pytest.raises(RefConflict, match="maskstore pull"):
        r2.push(remote, "main")
    rep = r2.pull(remote, "main")
    assert rep.outcome == "merged" and rep.objects > 0
    assert rep.merge.taken == {"a": "theirs", "b": "ours", "d": "ours"}
    assert rep.merge.removed == ["c"] and rep.merge.resolved == {}
    head = r2.resolve("main")
    assert head == rep.version and r2.manifest(head)["parents"] == [v2, v1]
    merged = r2.snapshot("main").bundle
    _same(merged, {"a": theirs["a"], "b": mine["b"], "d": mine["d"]})
    assert merged.verify() == [] and r2.verify() == []
    log = r2.log("main")
    assert log[0]["parents"] == [v2, v1] and {v1, v2} <= {e["version"] for e in log}
    # the merge contains the remote's head: the push now fast-forwards, and r1 fast-forwards
    r2.push(remote, "main")
    assert open_repo(remote).resolve("main") == head
    assert r1.pull(remote, "main").outcome == "fast-forward" and r1.resolve("main") == head
    assert r2.pull(remote, "main").outcome == "up-to-date"
    r2_only = _commit(r2, tmp_path / "b3", {"a": mine["a"]}, "r2 ahead")
    assert r2.pull(remote, "main").outcome == "ahead" and r2.resolve("main") == r2_only


def test_conflicts_are_named_and_resolved_by_side(tmp_path, rng, remote):
    r1, r2, start = _diverge(tmp_path, rng, remote)
    r3 = init_repo(tmp_path / "r3")
    r3.pull(remote, "main")  # a third clone of the start
    theirs = dict(start) | _masks(rng, ["c"])
    theirs["a"] = _masks(rng, ["a"])["a"]
    v1 = _commit(r1, tmp_path / "b1", theirs, "r1: new a, new c")
    r1.push(remote, "main")
    mine = dict(start) | _masks(rng, ["c"])
    mine["a"] = theirs["a"]  # the same change on both sides: no conflict
    mine["b"] = _masks(rng, ["b"])["b"]
    v2 = _commit(r2, tmp_path / "b2", mine, "r2: same a, other c, new b")
    with pytest.raises(MergeConflict, match=r"1 persona\(s\) .*: c; .*--ours NAME") as e:
        r2.pull(remote, "main")
    assert e.value.conflicts == ["c"] and r2.resolve("main") == v2  # nothing moved
    with pytest.raises(Exception, match="both `ours` and `theirs`"):
        r2.pull(remote, "main", ours=("c",), theirs=("c",))
    with pytest.raises(Exception, match="no persona 'zz'"):
        r2.pull(remote, "main", ours=("zz",))
    rep = r2.pull(remote, "main", theirs=("c",))
    assert rep.merge.resolved == {"c": "theirs"} and rep.merge.taken["a"] == "both"
    _same(r2.snapshot("main").bundle, {"a": theirs["a"], "b": mine["b"], "c": theirs["c"]})
    # the other side: the third clone resolves with --ours, then --force takes theirs whole
    v3 = _commit(r3, tmp_path / "b4", mine, "r3: other c")
    rep = r3.pull(remote, "main", ours=("c",))
    _same(r3.snapshot("main").bundle, {"a": theirs["a"], "b": mine["b"], "c": mine["c"]})
    assert r3.manifest(rep.version)["parents"] == [v3, v1]
    rep = r3.pull(remote, "main", force=True)  # r3 is ahead; --force resets it anyway
    assert rep.outcome == "forced" and r3.resolve("main") == v1


def test_merge_keeps_deltas_of_each_side_readable(tmp_path, rng):
    """Masks stored as xor deltas against a persona of their own version still read right in
    the merge, whose same-named persona may come from the other side."""
    base = {m: rng.random(tuple(s)) < 0.5 for m, s in FP["modules"].items()}

    def near(flip):
        return {m: b ^ (rng.random(b.shape) < flip) for m, b in base.items()}

    r = init_repo(tmp_path / "r")
    start = {"a": near(0.01), "b": near(0.01)}
    _commit(r, tmp_path / "b0", start, "start")
    r.set_branch("side", r.resolve("main"), None)
    theirs = {"a": near(0.01), "b": near(0.01)}  # side: both change; b stored against a
    _commit(r, tmp_path / "b1", theirs, "main moves")
    side = r.commit(
        open_bundle(write_bundle(tmp_path / "b2", FP, {"a": near(0.02), "b": start["b"]})),
        "x",
        "side",
    )
    man = r.manifest(r.resolve("main"))
    assert any("delta" in e for e in man["personas"]["b"]["arrays"].values())
    chunks, versions = len(r.store.list("chunks/")), len(r.store.list("versions/"))
    res = r.merge("main", into="side", ours=("a",))
    # the merge reuses both sides' objects: one new manifest, no chunk written
    assert len(r.store.list("chunks/")) == chunks
    assert len(r.store.list("versions/")) == versions + 1
    assert res.taken == {"a": "ours", "b": "theirs"}
    assert r.manifest(r.resolve("side"))["parents"] == [side, r.resolve("main")]
    got = r.snapshot("side").bundle
    for m, arr in theirs["b"].items():
        assert np.array_equal(got.read_mask("b", m), arr)
    assert got.verify() == [] and r.verify() == []
    assert r.merge("main", into="side") is None  # side already contains main


def test_cli_pull_merge_conflict_json_and_log(tmp_path, rng, cli):
    remote = str(tmp_path / "remote")
    r1, r2, start = _diverge(tmp_path, rng, remote)
    _commit(r1, tmp_path / "b1", start | _masks(rng, ["c"]), "r1")
    r1.push(remote, "main")
    _commit(r2, tmp_path / "b2", start | _masks(rng, ["c"]), "r2")
    code, out, err = cli("pull", remote, "main", "--repo", tmp_path / "r2", "--json")
    doc = json.loads(out)
    assert code == 2 and doc["conflicts"] == ["c"] and doc["exit_code"] == 2
    assert len(err.strip().splitlines()) == 1 and "--theirs NAME" in err
    code, out, err = cli("pull", remote, "--theirs", "c", "--repo", tmp_path / "r2", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["outcome"] == "merged", err
    assert doc["merge"]["resolved"] == {"c": "theirs"} and doc["version"]
    code, out, _ = cli("log", "--repo", tmp_path / "r2")
    assert code == 0 and " + " in out  # the merge shows both parents
    code, out, _ = cli("log", "--repo", tmp_path / "r2", "--json")
    assert len(json.loads(out)["versions"][0]["parents"]) == 2


def test_cli_merge_of_local_branches(tmp_path, rng, cli):
    r = init_repo(tmp_path / "r")
    start = _masks(rng, ["a", "b"])
    _commit(r, tmp_path / "b0", start, "start")
    r.set_branch("exp", r.resolve("main"), None)
    _commit(r, tmp_path / "b1", start | _masks(rng, ["a"]), "main: new a")
    r.commit(open_bundle(write_bundle(tmp_path / "b2", FP, start | _masks(rng, ["b"]))), "x", "exp")
    repo = ("--repo", tmp_path / "r")
    code, out, err = cli("merge", "exp", "--into", "main", *repo, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["outcome"] == "merged", err
    assert doc["merge"]["taken"] == {"a": "ours", "b": "theirs"}
    code, out, err = cli("merge", "exp", "--into", "main", *repo, "--json")
    assert json.loads(out)["outcome"] == "up-to-date"
    code, out, err = cli("merge", "main", "--into", "exp", *repo)
    assert code == 0 and "fast-forward" in out and r.resolve("exp") == r.resolve("main")
    code, out, err = cli("merge", "main", "--into", "nope", *repo)
    assert code == 2 and "no branch 'nope'" in err


def _on(repo, tmp_path, branch, masks, message):
    path = tmp_path / f"b-{message}"
    write_bundle(path, FP, masks, force=True)
    return repo.commit(open_bundle(path), message, branch=branch)


def test_the_merge_base_is_the_best_common_ancestor(tmp_path, rng):
    """Theirs holds a merge whose second parent reaches an older common version (O) before
    its first parent reaches the newer one (C). Merging from O would resurrect the persona y
    that ours deleted after C; the best common ancestor is C, and y stays deleted."""
    from maskstore.repo.merge import merge_bases

    m = _masks(rng, ["a", "x", "y", "z", "w"])
    repo = init_repo(tmp_path / "r")
    o = _on(repo, tmp_path, "main", {k: m[k] for k in ("a", "x")}, "O")
    repo.set_branch("old", o, None)
    c = _on(repo, tmp_path, "main", {k: m[k] for k in ("a", "x", "y")}, "C")
    repo.set_branch("feature", c, None)
    _on(repo, tmp_path, "main", {k: m[k] for k in ("a", "x")}, "ours deletes y")
    _on(repo, tmp_path, "old", {k: m[k] for k in ("a", "x", "z")}, "old adds z")
    _on(repo, tmp_path, "feature", {k: m[k] for k in ("a", "x", "y", "w")}, "F0")
    _on(repo, tmp_path, "feature", {k: m[k] for k in ("a", "x", "y", "w")} | {"w2": m["w"]}, "F1")
    repo.merge("old", into="feature")
    assert merge_bases(repo, repo.resolve("main"), repo.resolve("feature")) == [c]
    res = repo.merge("feature", into="main")
    merged = open_bundle(f"{tmp_path / 'r'}@main")
    assert "y" not in merged.personas, res.taken  # deleted on ours since C: stays deleted
    assert {"a", "x", "z", "w", "w2"} <= set(merged.personas)


def test_criss_cross_histories_never_lose_a_change_silently(tmp_path, rng):
    """Two merge bases that disagree about a persona: a persona both sides changed alike is
    taken; one whose bases disagree and whose sides differ is a conflict, never a silent
    pick."""
    from maskstore.repo.merge import merge_bases

    m = _masks(rng, ["a", "b", "p", "q"])
    repo = init_repo(tmp_path / "r")
    base = _on(repo, tmp_path, "main", {"a": m["a"]}, "base")
    repo.set_branch("other", base, None)
    _on(repo, tmp_path, "main", {"a": m["a"], "p": m["p"]}, "main adds p")
    _on(repo, tmp_path, "other", {"a": m["b"]}, "other changes a")
    main1, other1 = repo.resolve("main"), repo.resolve("other")
    # criss-cross: each side merges the other's head as it was
    repo.set_branch("m2", main1, None)
    repo.merge(other1, into="m2")  # m2 = main1 + other1
    repo.set_branch("o2", other1, None)
    repo.merge(main1, into="o2")  # o2 = other1 + main1
    _on(repo, tmp_path, "m2", {"a": m["b"], "p": m["q"]}, "m2 changes p")
    _on(repo, tmp_path, "o2", {"a": m["a"], "p": m["p"]}, "o2 reverts a")
    bases = merge_bases(repo, repo.resolve("m2"), repo.resolve("o2"))
    assert len(bases) == 2
    with pytest.raises(MergeConflict) as e:
        repo.merge("o2", into="m2")
    assert "a" in e.value.conflicts  # the bases disagree on a and the sides differ


def test_pull_force_names_the_discarded_head_and_gc_keeps_it(tmp_path, rng, cli):
    r1, r2, start = _diverge(tmp_path, rng, str(tmp_path / "remote"))
    _commit(r1, tmp_path / "b1", {**start, "a": _masks(rng, ["a"])["a"]}, "r1")
    r1.push(str(tmp_path / "remote"), "main")
    theirs_b = _masks(rng, ["b"])["b"]
    mine = _commit(r2, tmp_path / "b2", {**start, "b": theirs_b}, "r2")
    code, out, err = cli("pull", tmp_path / "remote", "main", "--force", "--json",
                         "--repo", tmp_path / "r2")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["discarded"] == mine
    code, out, _ = cli("pull", tmp_path / "remote", "main", "--force", "--repo", tmp_path / "r2")
    assert code == 0
    assert cli("gc", "--grace", "0", "--repo", tmp_path / "r2")[0] == 0
    assert cli("branch", "rescued", mine[:12], "--repo", tmp_path / "r2")[0] == 0  # still there
    _same(open_bundle(f"{tmp_path / 'r2'}@rescued"), {**start, "b": theirs_b})
