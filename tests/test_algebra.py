import json

import numpy as np
import pytest
import torch
from _helpers import random_fingerprint, random_masks, unblock_fifo_later, write_bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskstore import create_bundle
from maskstore.build.importers import import_pt
from maskstore.compare import algebra
from maskstore.errors import MaskstoreError
from maskstore.store.opener import open_bundle


def _expected(masks, names, modules=None):
    """Reference counts straight from unpacked numpy arrays."""
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            mods = modules or list(masks[a])
            A = np.concatenate([masks[a][m].ravel() for m in mods])
            B = np.concatenate([masks[b][m].ravel() for m in mods])
            out[(a, b)] = dict(
                total=A.size,
                kept_a=int(A.sum()),
                kept_b=int(B.sum()),
                intersection=int((A & B).sum()),
                union=int((A | B).sum()),
                a_minus_b=int((A & ~B).sum()),
                b_minus_a=int((B & ~A).sum()),
                hamming=int((A ^ B).sum()),
            )
    return out


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.integers(0, 2**31), st.floats(0.0, 1.0), st.integers(2, 4), st.integers(64, 5000))
def test_counts_match_numpy(tmp_path_factory, seed, p, n, chunk):
    rng = np.random.default_rng(seed)
    fp = random_fingerprint(rng)
    names = [f"p{i}" for i in range(n)]
    masks = random_masks(rng, fp, names, p)
    path = tmp_path_factory.mktemp("alg") / "b"
    write_bundle(path, fp, masks, chunk_bytes=chunk)
    b = open_bundle(path)
    refs = [algebra.Ref(b, x) for x in names]
    counts = algebra.count_all(refs)
    rep = {(r["a"], r["b"]): r for r in algebra.pairs_report(refs, counts, by="layer")}
    exp = _expected(masks, names)
    for key, want in exp.items():
        got = rep[key]
        for k, v in want.items():
            assert got[k] == v, (key, k)
        assert got["diff_ratio"] == pytest.approx(want["hamming"] / want["total"])
        u = want["union"]
        assert got["jaccard"] == pytest.approx(want["intersection"] / u if u else 1.0)
        pruned_i = want["total"] - u
        pruned_u = want["total"] - want["intersection"]
        assert got["pruned_jaccard"] == pytest.approx(pruned_i / pruned_u if pruned_u else 1.0)
        # layer groups add up to the whole
        assert sum(g["hamming"] for g in got["groups"].values()) == want["hamming"]
    layer0 = [m for m in fp["modules"] if m.startswith("model.layers.0.")]
    exp0 = _expected(masks, names, layer0)
    for key, want in exp0.items():
        assert rep[key]["groups"]["0"]["intersection"] == want["intersection"]


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.integers(0, 2**31), st.sampled_from(algebra.OPS))
def test_ops_match_numpy(tmp_path_factory, seed, op):
    rng = np.random.default_rng(seed)
    fp = random_fingerprint(rng)
    masks = random_masks(rng, fp, ["a", "b"], rng.random())
    path = tmp_path_factory.mktemp("ops") / "b"
    write_bundle(path, fp, masks, chunk_bytes=int(rng.integers(16, 400)))
    b = open_bundle(path, writable=True)
    operands = ["a"] if op == "complement" else ["a", "b"]
    k = int(rng.integers(1, 3)) if op == "vote" else None
    meta = algebra.apply_op(b, op, operands, "out", at_least=k)
    ref = {
        "union": np.logical_or,
        "intersect": np.logical_and,
        "xor": np.logical_xor,
        "subtract": lambda x, y: x & ~y,
        "complement": lambda x: ~x,
        "vote": lambda x, y: (x.astype(int) + y) >= k,
    }[op]
    b = open_bundle(path)
    for m in fp["modules"]:
        want = ref(*(masks[o][m] for o in operands))
        assert np.array_equal(b.read_mask("out", m), want)
    prov = meta["provenance"]
    assert prov["op"] == op and [o["digest"] for o in prov["operands"]] == [
        b.persona(o)["digest"] for o in operands
    ]
    assert b.verify() == []


def test_kind_and_layer_grouping(tmp_path, rng):
    fp = random_fingerprint(rng, n_layers=3)
    masks = random_masks(rng, fp, ["a", "b"])
    write_bundle(tmp_path / "b", fp, masks)
    b = open_bundle(tmp_path / "b")
    refs = [algebra.Ref(b, "a"), algebra.Ref(b, "b")]
    rec = algebra.pairs_report(refs, algebra.count_all(refs), by="kind")[0]
    attn = [m for m in fp["modules"] if "self_attn" in m]
    want = _expected(masks, ["a", "b"], attn)[("a", "b")]
    assert set(rec["groups"]) == {"attn", "mlp"}
    assert rec["groups"]["attn"]["hamming"] == want["hamming"]


def test_each_chunk_read_once_for_all_pairs(tmp_path, rng, monkeypatch):
    fp = random_fingerprint(rng)
    names = ["a", "b", "c", "d"]
    write_bundle(tmp_path / "b", fp, random_masks(rng, fp, names), chunk_bytes=64)
    b = open_bundle(tmp_path / "b")
    calls = []
    orig = b.iter_chunks

    def spy(persona, module, kind="masks"):
        for r0, blk in orig(persona, module, kind):
            calls.append((persona, module, r0))
            yield r0, blk

    monkeypatch.setattr(b, "iter_chunks", spy)
    algebra.count_all([algebra.Ref(b, n) for n in names])
    assert len(calls) == len(set(calls)) > len(names) * len(fp["modules"])


def test_mismatched_models_refused(tmp_path, rng):
    fp = random_fingerprint(rng)
    write_bundle(tmp_path / "x", fp, random_masks(rng, fp, ["a"]))
    fp2 = json.loads(json.dumps(fp))
    m = next(iter(fp2["modules"]))
    fp2["modules"][m] = [fp2["modules"][m][0] + 1, fp2["modules"][m][1]]
    write_bundle(tmp_path / "y", fp2, random_masks(rng, fp2, ["b"]))
    refs = [
        algebra.Ref(open_bundle(tmp_path / "x"), "a"),
        algebra.Ref(open_bundle(tmp_path / "y"), "b"),
    ]
    with pytest.raises(MaskstoreError, match="different models"):
        algebra.count_all(refs)
    fp3 = dict(fp, architecture="Other")
    write_bundle(tmp_path / "z", fp3, random_masks(rng, fp3, ["c"]))
    with pytest.raises(MaskstoreError, match="compare masks of one model"):
        algebra.count_all([refs[0], algebra.Ref(open_bundle(tmp_path / "z"), "c")])


def test_cli_overlap_and_diff_json(tmp_path, rng, cli):
    fp = random_fingerprint(rng)
    names = ["a", "b", "c"]
    masks = random_masks(rng, fp, names)
    write_bundle(tmp_path / "b", fp, masks)
    code, out, err = cli("overlap", tmp_path / "b", "--json", "--by", "kind")
    assert code == 0, err
    doc = json.loads(out)
    assert len(doc["pairs"]) == 3
    exp = _expected(masks, names)
    for p in doc["pairs"]:
        for k in ("a", "b", "total", "intersection", "union", "jaccard", "diff_ratio"):
            assert k in p and all(
                k in g for g in p["groups"].values() for k in ("total", "diff_ratio")
            )
        assert p["intersection"] == exp[(p["a"], p["b"])]["intersection"]
        assert 0.0 <= p["diff_ratio"] <= 1.0
    code, out, err = cli("diff", tmp_path / "b", "a", "c", "--json")
    d = json.loads(out)
    assert (
        code == 0
        and d["hamming"] == exp[("a", "c")]["hamming"]
        and {"attn", "mlp"} <= set(d["groups"])
    )
    assert set(d["layers"]) == {"0", "1"}
    code, out, err = cli("overlap", tmp_path / "b", "--metric", "diff")
    assert code == 0 and "a" in out
    code, out, err = cli("overlap", tmp_path / "b", "--by", "layer")  # one table, not one a layer
    assert code == 0 and out.count("jaccard by layer") == 1 and out.count("a vs b") == 1
    rows = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")]
    assert rows == ["0", "1"], out
    code, out, err = cli("xor", tmp_path / "b", "a", "b", "--as", "ab")
    assert code == 0 and "ab" in open_bundle(tmp_path / "b").personas
    code, out, err = cli("xor", tmp_path / "b", "a", "b", "--as", "ab")
    assert code == 2 and "already exists" in err and "Traceback" not in err
    code, out, err = cli("diff", tmp_path / "b", "a", "nobody")
    assert code == 2 and err.count("\n") == 1 and "known: a, ab, b, c" in err
    code, out, err = cli("info", tmp_path / "b", "--json")
    assert code == 0 and len(json.loads(out)["personas"]) == 4
    code, out, err = cli("verify", tmp_path / "b")
    assert code == 0


def test_cli_verify_names_damage(tmp_path, rng, cli):
    fp = {"architecture": "T", "modules": {"l.0.mlp.up_proj": [64, 64]}}
    write_bundle(tmp_path / "b", fp, random_masks(rng, fp, ["a"]), codec="none")
    f = next(
        p for p in (tmp_path / "b/personas/a/masks/l.0.mlp.up_proj/c").rglob("*") if p.is_file()
    )
    f.write_bytes(bytes(len(f.read_bytes())))
    code, out, err = cli("verify", tmp_path / "b")
    err = " ".join(err.split())  # however the terminal wrapped it
    assert code == 1 and "chunk 0 of" in err and "l.0.mlp.up_proj" in err


def test_import_pt_roundtrip_and_cli(tmp_path, rng, cli):
    src = tmp_path / "pt"
    src.mkdir()
    masks = {}
    for persona in ("intro_vert", "extro"):
        for mod, shape in (
            ("model.layers.0.mlp.up_proj", (12, 19)),
            ("model.layers.0.self_attn.q_proj", (8, 8)),
        ):
            m = torch.from_numpy(rng.random(shape) < 0.5)
            torch.save(m, src / f"M_{persona}_{mod}.pt")
            masks[(persona, mod)] = m.numpy()
    names, _ = import_pt(src, tmp_path / "b")
    assert sorted(names) == ["extro", "intro_vert"]
    b = open_bundle(tmp_path / "b")
    for (p, m), arr in masks.items():
        assert np.array_equal(b.read_mask(p, m), arr)
    assert b.persona("extro")["provenance"]["op"] == "import-pt"
    code, out, err = cli("import-pt", src, "--out", tmp_path / "b")
    assert code == 2 and "already exists" in err


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_MARKER",))


def test_import_pt_refuses_pickle_payload(tmp_path, cli, monkeypatch):
    src = tmp_path / "pt"
    src.mkdir()
    torch.save({"x": _Evil()}, src / "M_a_model.layers.0.mlp.up_proj.pt")
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("import-pt", src, "--out", tmp_path / "b")
    assert code == 2 and "refused" in err and "Traceback" not in err
    assert not (tmp_path / "PWNED_MARKER").exists() and not (tmp_path / "b").exists()
    torch.save(torch.zeros(3, 3), src / "M_a_model.layers.0.mlp.up_proj.pt")
    code, out, err = cli("import-pt", src, "--out", tmp_path / "b")
    assert code == 2 and "not a 0/1 mask" in err


def test_export_pt_round_trips_with_import_pt(tmp_path, rng, cli):
    fp = {"architecture": "T", "modules": {"model.layers.0.mlp.up_proj": [12, 19],
                                           "model.layers.1.self_attn.q_proj": [8, 8]}}  # fmt: skip
    masks = {p: {m: rng.random(tuple(s)) < 0.5 for m, s in fp["modules"].items()} for p in "ab"}
    src = tmp_path / "src.zarr"
    with create_bundle(src, fp) as b:
        for p, mm in masks.items():
            with b.persona_writer(p, method="t") as w:
                for m, arr in mm.items():
                    w.write_mask(m, arr)
    code, out, err = cli("export-pt", src, "--out", tmp_path / "pt", "--json")
    assert code == 0 and json.loads(out)["files"] == 4, err
    names, _ = import_pt(tmp_path / "pt", tmp_path / "back.zarr", architecture="T")
    a, b = open_bundle(src), open_bundle(tmp_path / "back.zarr")
    assert sorted(names) == ["a", "b"]
    for p in "ab":
        for m in fp["modules"]:
            assert b.persona(p)["modules"][m]["mask"] == a.persona(p)["modules"][m]["mask"]
    code, out, err = cli("export-pt", src, "--out", tmp_path / "pt")
    assert code == 2 and "already exists" in err
    code, out, err = cli("export-pt", src, "--out", tmp_path / "pt2", "--persona", "zz")
    assert code == 2 and not (tmp_path / "pt2").exists()
    # --like: the imported bundle takes the source's fingerprint, so the two compare
    code, out, err = cli("import-pt", tmp_path / "pt", "--out", tmp_path / "like.zarr",
                         "--like", src)  # fmt: skip
    assert code == 0, err
    assert open_bundle(tmp_path / "like.zarr").fingerprint == a.fingerprint
    code, out, err = cli("diff", src, "a", f"{tmp_path / 'like.zarr'}#a", "--json")
    assert code == 0 and json.loads(out)["hamming"] == 0, err
    code, out, err = cli("import-pt", tmp_path / "pt", "--out", tmp_path / "x.zarr",
                         "--architecture", "Other")  # fmt: skip
    code, out, err = cli("diff", src, "a", f"{tmp_path / 'x.zarr'}#a")
    assert code == 2 and "Other" in err  # without it the two are for different models


def test_nary_union_intersect_and_vote(tmp_path, rng, cli):
    fp = {"architecture": "T", "modules": {"model.layers.0.mlp.up_proj": [13, 21]}}
    m = "model.layers.0.mlp.up_proj"
    masks = {p: {m: rng.random((13, 21)) < 0.5} for p in "abcd"}
    path = write_bundle(tmp_path / "b.zarr", fp, masks)
    stack = np.stack([masks[p][m] for p in "abc"])
    for args, want in (
        (["union", "a", "b", "c"], stack.any(0)),
        (["intersect", "a", "b", "c"], stack.all(0)),
        (["vote", "a", "b", "c", "--at-least", "2"], stack.sum(0) >= 2),
    ):
        code, out, err = cli(args[0], path, *args[1:], "--as", f"{args[0]}3", "--json")
        assert code == 0, err
        assert np.array_equal(open_bundle(path).read_mask(f"{args[0]}3", m), want), args[0]
    meta = open_bundle(path).persona("vote3")
    assert meta["provenance"]["op"] == "vote" and meta["params"]["at_least"] == 2
    for bad, phrase in (
        (["vote", "a", "b", "--at-least", "3"], "1 <= K <= 2"),
        (["vote", "a", "b"], "--at-least K"),
        (["union", "a"], "at least 2 personas"),
        (["xor", "a", "b", "c"], "takes 2 personas"),
        (["union", "a", "b", "--at-least", "1"], "--at-least is for vote"),
    ):
        code, out, err = cli(bad[0], path, *bad[1:], "--as", "x")
        assert code == 2 and phrase in err, (bad, err)


def test_overlap_and_diff_pngs_and_fitted_colours(tmp_path, rng, cli):
    fp = random_fingerprint(rng, n_layers=3)
    path = write_bundle(tmp_path / "b.zarr", fp, random_masks(rng, fp, ["a", "b", "c"]))
    code, out, err = cli("overlap", path, "--png", tmp_path / "o.png")
    assert code == 0, err
    code, out, err = cli("diff", path, "a", "b", "--png", tmp_path / "d.png")
    assert code == 0, err
    for f in ("o.png", "d.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a folder that does not exist fails before any compute, in one line
    code, out, err = cli("overlap", path, "--png", tmp_path / "nowhere" / "o.png")
    assert code == 2 and "does not exist" in err
    from maskstore.cli._common import heat

    # close values get different colours once the scale spans the values shown
    assert heat(0.936, "jaccard", 0.936, 0.948)[:18] != heat(0.948, "jaccard", 0.936, 0.948)[:18]


def test_png_outputs_go_exactly_where_asked_and_never_through_fifos_or_links(tmp_path, rng, cli):
    """``--png`` writes the path given (no ``.png`` added), replaces a link instead of writing
    through it, and refuses a FIFO or folder in one line before any compute, without blocking."""
    import os

    fp = random_fingerprint(rng, n_layers=2)
    path = write_bundle(tmp_path / "b.zarr", fp, random_masks(rng, fp, ["a", "b"]))
    plain = tmp_path / "figure"
    code, out, err = cli("overlap", path, "--png", plain)
    assert code == 0, err
    assert plain.read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "figure.png").exists()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "link.png"
    link.symlink_to(victim)
    code, out, err = cli("diff", path, "a", "b", "--png", link)
    assert code == 0, err
    assert victim.read_text() == "keep me" and not link.is_symlink()
    assert link.read_bytes()[:4] == b"\x89PNG"
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    (tmp_path / "dir.png").mkdir()
    unblock_fifo_later(fifo)
    for target in (fifo, tmp_path / "dir.png"):
        for cmd in (["overlap", path], ["diff", path, "a", "b"]):
            code, out, err = cli(*cmd, "--png", target)
            assert code == 2 and "is not a regular file" in err, err
            assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_gather_copies_personas_of_several_bundles(tmp_path, rng):
    fp = random_fingerprint(rng)
    m1, m2 = random_masks(rng, fp, ["a", "b"]), random_masks(rng, fp, ["a"])
    b1 = open_bundle(write_bundle(tmp_path / "b1", fp, m1))
    b2 = open_bundle(write_bundle(tmp_path / "b2", fp, m2))
    refs = [algebra.Ref(b1, "a"), algebra.Ref(b2, "a"), algebra.Ref(b1, "b")]
    assert algebra.gather(refs, tmp_path / "g") == ["a", "a.2", "b"]
    g = open_bundle(tmp_path / "g")
    for name, ref, masks in (
        ("a", refs[0], m1["a"]),
        ("a.2", refs[1], m2["a"]),
        ("b", refs[2], m1["b"]),
    ):
        assert g.persona(name)["digest"] == ref.bundle.persona(ref.name)["digest"]
        for m, arr in masks.items():
            assert np.array_equal(g.read_mask(name, m), arr)
    other = random_fingerprint(rng)
    b3 = open_bundle(write_bundle(tmp_path / "b3", other, random_masks(rng, other, ["c"])))
    with pytest.raises(MaskstoreError):
        algebra.gather([refs[0], algebra.Ref(b3, "c")], tmp_path / "g2")
    assert not (tmp_path / "g2").exists()


def test_same_named_personas_of_two_sources_are_labelled_by_source(tmp_path, rng, cli):
    """``overlap A optimist pessimist B#optimist`` labels the two optimists by their bundle, in
    the table and the JSON, and every number equals the one computed from the masks; the same
    across repository versions."""
    from _helpers import random_fingerprint, random_masks, write_bundle

    fp = random_fingerprint(rng)
    ma = random_masks(rng, fp, ["optimist", "pessimist"])
    mb = random_masks(rng, fp, ["optimist"], p=0.3)
    a, b = write_bundle(tmp_path / "a", fp, ma), write_bundle(tmp_path / "b", fp, mb)
    repo = tmp_path / "repo"
    assert cli("commit", a, "-m", "a", "--repo", repo)[0] == 0
    assert cli("tag", "v1", "--repo", repo)[0] == 0
    assert cli("commit", b, "-m", "b", "--repo", repo)[0] == 0

    def jaccard(x: dict, y: dict) -> float:
        inter = sum(int((x[m] & y[m]).sum()) for m in x)
        union = sum(int((x[m] | y[m]).sum()) for m in x)
        return inter / union

    for first, other in ((a, b), (f"{repo}@v1", f"{repo}@main")):
        code, out, err = cli("overlap", first, "optimist", "pessimist", f"{other}#optimist",
                             "--json")  # fmt: skip
        assert code == 0, err
        doc = json.loads(out)
        want_labels = [f"{first}#optimist", "pessimist", f"{other}#optimist"]
        assert doc["personas"] == want_labels
        masks = dict(zip(want_labels, (ma["optimist"], ma["pessimist"], mb["optimist"]),
                         strict=True))  # fmt: skip
        for pair in doc["pairs"]:
            assert pair["jaccard"] == pytest.approx(jaccard(masks[pair["a"]], masks[pair["b"]]))
        code, out, err = cli("overlap", first, "optimist", "pessimist", f"{other}#optimist")
        assert code == 0, err
        import re

        assert len(re.findall(r"(?<=│)\s*-\s*(?=│)", out)) == 3, out  # the diagonal only
        assert f"{jaccard(ma['optimist'], mb['optimist']):.4f}" in out
        code, out, _ = cli("diff", first, "optimist", f"{other}#optimist", "--json")
        rec = json.loads(out)
        assert (rec["a"], rec["b"]) == (f"{first}#optimist", f"{other}#optimist")
        assert rec["jaccard"] == pytest.approx(jaccard(ma["optimist"], mb["optimist"]))
    code, _, err = cli("overlap", a, "optimist", "optimist")
    assert code == 2 and "given twice" in err


def test_overlap_in_the_library_refuses_what_the_command_line_refuses(tmp_path, rng):
    """``maskstore.overlap``: a persona named twice, an unknown one, a single one and an
    unknown grouping are each one MaskstoreError, as ``maskstore overlap`` says them."""
    fp = random_fingerprint(rng, n_layers=2)
    b = open_bundle(write_bundle(tmp_path / "b.zarr", fp, random_masks(rng, fp, ["a", "b"])))
    for personas, phrase in ((["a", "a"], "a given twice"), (["a", "zz"], "unknown persona"),
                             (["a"], "at least two"), (["a", "b", "a"], "a given twice")):  # fmt: skip
        with pytest.raises(MaskstoreError, match=phrase):
            algebra.overlap(b, personas)
    with pytest.raises(MaskstoreError, match="by must be one of"):
        algebra.overlap(b, by="x")
    assert len(algebra.overlap(b, ["b", "a"])) == 1
