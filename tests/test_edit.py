"""Persona editing: cp (from any bundle or version of the same model), mv, rm and build
--into, each atomic and digest-preserving, with hostile names and blends that depend on a
persona."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _helpers import pair_args

from maskstore.store.opener import open_bundle


@pytest.fixture
def two(tmp_path, tiny_dir, calib_files, cli):
    """Two bundles built on the same tiny model: a (introvert, extrovert) and b (introvert)."""
    tiny = ("--model", tiny_dir, "--samples", "4", "--max-tokens", "16")
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert cli("build", *tiny, *pair_args(calib_files), "--out", a)[0] == 0
    assert cli("build", *tiny, "--persona", f"introvert={calib_files['extrovert']}",
               "--sparsity", "0.3", "--out", b)[0] == 0  # fmt: skip
    return a, b


def _same(x, px, y, py) -> None:
    assert x.persona(px)["digest"] == y.persona(py)["digest"]
    for m in x.persona_modules(px):
        assert np.array_equal(x.read_packed(px, m), y.read_packed(py, m)), m
        assert np.array_equal(x.read_stats(px, m).to_array()[0], y.read_stats(py, m).to_array()[0])


def test_cp_mv_rm_keep_digests_and_refuse_what_would_lose_data(two, tmp_path, cli):
    a, b = two
    code, out, err = cli("cp", f"{b}#introvert", a, "--as", "intro2", "--json")
    assert code == 0, err
    assert json.loads(out)["digest"] == open_bundle(b).persona("introvert")["digest"]
    _same(open_bundle(b), "introvert", open_bundle(a), "intro2")
    code, _, err = cli("cp", f"{b}#introvert", a)  # the name is taken
    assert code == 2 and "already exists" in err
    before = open_bundle(a).persona("introvert")["digest"]
    assert open_bundle(a).persona("introvert")["digest"] == before  # nothing lost
    assert cli("cp", f"{b}#introvert", a, "--force")[0] == 0  # replaced on request
    _same(open_bundle(b), "introvert", open_bundle(a), "introvert")
    # a version as the source
    repo = tmp_path / "repo"
    assert cli("commit", b, "-m", "b", "--repo", repo)[0] == 0
    assert cli("cp", f"{repo}@main#introvert", a, "--as", "from-version")[0] == 0
    _same(open_bundle(b), "introvert", open_bundle(a), "from-version")
    # mv keeps the digest; rm removes; verify passes throughout
    d = open_bundle(a).persona("intro2")["digest"]
    assert cli("mv", a, "intro2", "renamed")[0] == 0
    fresh = open_bundle(a)
    assert "intro2" not in fresh.personas and fresh.persona("renamed")["digest"] == d
    assert cli("rm", a, "renamed")[0] == 0
    assert "renamed" not in open_bundle(a).personas
    assert cli("verify", a)[0] == 0 and not list((a / ".staging").glob("*"))
    # a blend depends on its operands: they cannot be removed, renamed or replaced under it
    assert cli("blend", a, "introvert=0.5", "extrovert=0.5", "--as", "mix")[0] == 0
    for args in (("rm", a, "extrovert"), ("mv", a, "extrovert", "x"),
                 ("cp", f"{b}#introvert", a, "--force")):  # fmt: skip
        code, _, err = cli(*args)
        assert code == 2 and "mix" in err and len(err.strip().splitlines()) == 1, (args, err)
    code, _, err = cli("cp", f"{a}#mix", b)
    assert code == 2 and "blend" in err
    assert cli("verify", a)[0] == 0


def test_edits_refuse_hostile_names_and_other_models(two, tmp_path, cli):
    from _tiny import save_tiny

    a, b = two
    for args in (("cp", f"{b}#introvert", a, "--as", "../../x"), ("mv", a, "introvert", "a/b"),
                 ("mv", a, "introvert", ".."), ("rm", a, "../a.zarr"), ("cp", str(b), a),
                 ("mv", a, "nobody", "x"), ("mv", a, "introvert", "extrovert"),
                 ("cp", f"{b}#introvert", tmp_path / "missing")):  # fmt: skip
        code, _, err = cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1, (args, err)
    assert sorted(open_bundle(a).personas) == ["extrovert", "introvert"]
    assert not (tmp_path / "x").exists() and b.exists()
    other = save_tiny(tmp_path / "other", seed=9)
    c = tmp_path / "c.zarr"
    assert cli("build", "--model", other, "--samples", "2", "--max-tokens", "16", "--persona",
               f"p={_text(tmp_path)}", "--out", c)[0] == 0  # fmt: skip
    code, _, err = cli("cp", f"{c}#p", a)
    assert code == 2 and "another model" in err


def _text(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("one line\nanother line\n")
    return f


def test_build_into_adds_personas_and_pairs(two, tiny_dir, calib_files, cli, tmp_path):
    a, _ = two
    before = {p: open_bundle(a).persona(p)["digest"] for p in open_bundle(a).personas}
    code, _, err = cli("build", "--model", tiny_dir, "--samples", "4", "--max-tokens", "16",
                       "--persona", f"calm={calib_files['introvert']}",
                       "--persona", f"loud={calib_files['extrovert']}", "--pair", "calm:loud",
                       "--method", "contrastive-wanda", "--into", a)  # fmt: skip
    assert code == 0, err
    now = open_bundle(a)
    assert set(now.personas) == {"introvert", "extrovert", "calm", "loud"}
    assert {p: now.persona(p)["digest"] for p in before} == before  # the others untouched
    assert now.persona("calm")["params"].get("opposite") == "loud"
    code, _, err = cli("build", "--model", tiny_dir, "--samples", "2", "--max-tokens", "16",
                       "--persona", f"calm={calib_files['introvert']}", "--into", a)  # fmt: skip
    assert code == 2 and "already holds calm" in err
    from _tiny import save_tiny

    other = save_tiny(tmp_path / "o", seed=4)
    code, _, err = cli("build", "--model", other, "--samples", "2", "--max-tokens", "16",
                       "--persona", f"x={calib_files['introvert']}", "--into", a)  # fmt: skip
    assert code == 2 and "another model" in err
    assert set(open_bundle(a).personas) == {"introvert", "extrovert", "calm", "loud"}
    assert cli("verify", a)[0] == 0
