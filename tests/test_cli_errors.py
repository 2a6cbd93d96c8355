"""Bad input gets one clear line and exit 2, never a traceback; text from bundles, repositories
and arguments reaches the terminal escaped (issue 10, items 7 and 8)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
import zstandard
from _helpers import unblock_fifo_later, write_bundle

from maskstore.repo import init_repo
from maskstore.store.hashing import blake2b_hex, canonical_json

FP = {"architecture": "T", "modules": {"model.layers.0.mlp.up_proj": [8, 12]}}


def _one_line(code: int, err: str, *phrases: str, exit_code: int = 2) -> None:
    assert code == exit_code, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "\x1b" not in err
    for p in phrases:
        assert p in err, err


@pytest.fixture
def small(tmp_path, rng):
    masks = {"a": {m: rng.random(tuple(s)) < 0.5 for m, s in FP["modules"].items()}}
    return write_bundle(tmp_path / "b.zarr", FP, masks)


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--max-tokens", "-1"], "--max-tokens must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--batch-size", "-1"], "--batch-size must be at least 1"),
        (["--chunk-mib", "-1"], "--chunk-mib must be positive"),
        (["--device", "bogus"], "unknown --device 'bogus'"),
        (["--sparsity", "abc"], "'abc' is not a valid float"),
    ],
)
def test_build_arguments(tmp_path, cli, calib_files, tiny_dir, args, phrase):
    code, _, err = cli(
        "build", "--model", tiny_dir, "--persona", f"a={calib_files['introvert']}",
        "--out", tmp_path / "o", *args,
    )  # fmt: skip
    _one_line(code, err, phrase)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_build_on_a_missing_cuda_device(tmp_path, cli, calib_files, tiny_dir):
    code, _, err = cli(
        "build", "--model", tiny_dir, "--persona", f"a={calib_files['introvert']}",
        "--out", tmp_path / "o", "--device", "cuda",
    )  # fmt: skip
    _one_line(code, err, "no CUDA device")


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--max-new-tokens", "-5"], "--max-new-tokens must be at least 1"),
        (["--prompt", ""], "--prompt is empty"),
    ],
)
def test_run_arguments(small, cli, args, phrase):
    base = ["--prompt", "hi"] if "--prompt" not in args else []
    _one_line(*cli("run", small, *base, *args)[::2], phrase)


def test_outputs_into_missing_folders(small, tmp_path, cli):
    _one_line(*cli("pack", small, tmp_path / "no/such/b.zip")[::2], "does not exist")
    repo = tmp_path / "repo"
    assert cli("commit", small, "-m", "one", "--repo", repo)[0] == 0
    code, _, err = cli("export", "main", tmp_path / "no/such/v.zip", "--repo", repo)
    _one_line(code, err, "does not exist")


def test_repositories_that_are_files_or_damaged(small, tmp_path, cli):
    f = tmp_path / "file"
    f.write_text("x")
    _one_line(*cli("commit", small, "-m", "x", "--repo", f)[::2], "is a file")
    repo = tmp_path / "repo"
    assert cli("commit", small, "-m", "one", "--repo", repo)[0] == 0
    _one_line(*cli("commit", small, "-m", "bad \udcff bytes", "--repo", repo)[::2], "UTF-8")
    (repo / "maskstore-repo.json").write_text('{"form')
    _one_line(*cli("log", "--repo", repo)[::2], "damaged (not JSON)")
    (repo / "maskstore-repo.json").unlink()
    _one_line(*cli("log", "--repo", repo)[::2], "no maskstore-repo.json")
    _one_line(*cli("verify", repo)[::2], "no maskstore-repo.json")


def _remote(small, tmp_path, cli) -> Path:
    repo, remote = tmp_path / "repo", tmp_path / "remote"
    assert cli("commit", small, "-m", "one", "--repo", repo)[0] == 0
    assert cli("push", remote, "main", "--repo", repo)[0] == 0
    return remote


def test_hostile_remotes(small, tmp_path, cli):
    remote = _remote(small, tmp_path, cli)
    (remote / "refs/tags").mkdir(parents=True)
    (remote / "refs/tags/weird").write_bytes(b"\xff\xfe\x00garbage")
    _one_line(  # damage on the remote: exit 1
        *cli("pull", remote, "weird", "--repo", tmp_path / "c1")[::2],
        "not hold a version id",
        exit_code=1,
    )
    vid = (remote / "refs/branches/main").read_text()
    man = json.loads(
        zstandard.ZstdDecompressor().decompress((remote / "versions" / vid).read_bytes())
    )
    del man["parents"]
    text = canonical_json(man)
    (remote / "versions" / blake2b_hex(text)).write_bytes(zstandard.ZstdCompressor().compress(text))
    (remote / "refs/branches/main").write_text(blake2b_hex(text))
    code, err = cli("pull", remote, "main", "--repo", tmp_path / "c2")[::2]
    _one_line(code, err, "'parents' is missing", exit_code=1)


def test_import_pt_of_files_that_are_not_tensors(tmp_path, cli):
    src = tmp_path / "pt"
    src.mkdir()
    (src / "M_a_model.layers.0.mlp.up_proj.pt").write_text("just text\n")
    _one_line(*cli("import-pt", src, "--out", tmp_path / "o")[::2], "not a plain tensor file")
    import pickle

    (src / "M_a_model.layers.0.mlp.up_proj.pt").write_bytes(pickle.dumps({"x": 1}))
    _one_line(*cli("import-pt", src, "--out", tmp_path / "o")[::2], "refused")


def test_markup_and_escape_codes_are_printed_as_text(tmp_path, rng, cli):
    code, out, err = cli("info", tmp_path / "nope[/].zarr")
    _one_line(code, err, "nope[/].zarr")
    from maskstore import create_bundle

    b = tmp_path / "m.zarr"
    with create_bundle(b, FP) as nb, nb.persona_writer("a", method="[/]\x1b[31mred\x07") as w:
        for m, s in FP["modules"].items():
            w.write_mask(m, rng.random(tuple(s)) < 0.5)
    code, out, err = cli("info", b)
    assert code == 0 and "[/]" in out and "\x1b" not in out and "\x07" not in out, err
    repo = tmp_path / "repo"
    assert cli("commit", b, "-m", "[/] \x1b]0;title\x07", "--repo", repo)[0] == 0
    code, out, err = cli("log", "--repo", repo)
    assert code == 0 and "[/]" in out and "\x1b" not in out and "\x07" not in out, err


def test_export_zip_naming_refs_outside_is_refused_by_the_cli(small, tmp_path, cli):
    repo = tmp_path / "repo"
    assert cli("commit", small, "-m", "one", "--repo", repo)[0] == 0
    assert cli("tag", "v1", "--repo", repo)[0] == 0
    assert cli("export", "v1", tmp_path / "v.zip", "--repo", repo)[0] == 0
    with zipfile.ZipFile(tmp_path / "v.zip", "a") as z:
        z.writestr("refs/tags/../../../X", init_repo(repo).resolve("v1"))
    code, _, err = cli("import", tmp_path / "v.zip", "--repo", tmp_path / "other")
    _one_line(code, err, "not a tag or branch", exit_code=1)  # a damaged or hostile zip
    assert not (tmp_path / "X").exists()


def test_version_short_help_and_json_errors(small, tmp_path, cli):
    from maskstore import __version__

    code, out, err = cli("--version")
    assert code == 0 and out.strip() == f"maskstore {__version__}"
    code, out, err = cli("info", "-h")
    assert code == 0 and "--json" in out
    # with --json, an error is also one JSON object on stdout (and one line on stderr)
    code, out, err = cli("info", tmp_path / "missing.zarr", "--json")
    _one_line(code, err, "no bundle")
    doc = json.loads(out)
    assert doc["exit_code"] == 2 and "no bundle" in doc["error"] and doc["schema_version"] == 1
    code, out, err = cli("info", small, "--nope", "--json")
    assert code == 2 and json.loads(out)["exit_code"] == 2
    code, out, err = cli("info", small, "--json")
    doc = json.loads(out)
    assert doc["schema_version"] == 1 and doc["personas"][0]["persona"] == "a"


def test_tags_and_branches_are_listed(small, tmp_path, cli):
    repo = tmp_path / "repo"
    assert cli("commit", small, "-m", "one", "--repo", repo)[0] == 0
    for name in ("v2", "v1"):
        assert cli("tag", name, "--repo", repo)[0] == 0
    code, out, err = cli("tag", "--repo", repo)
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == ["v1", "v2"]
    code, out, err = cli("tag", "--repo", repo, "--json")
    tags = json.loads(out)["tags"]
    assert set(tags) == {"v1", "v2"} and tags["v1"] == tags["v2"]
    code, out, err = cli("branch", "--repo", repo, "--json")
    assert set(json.loads(out)["branches"]) == {"main"}


def test_info_wraps_long_names_at_80_columns(tmp_path, rng):
    long = "extrovert_with_a_rather_long_persona_name"
    masks = {long: {m: rng.random(tuple(s)) < 0.5 for m, s in FP["modules"].items()}}
    path = write_bundle(tmp_path / "w.zarr", FP, masks)
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "maskstore.cli", "info", str(path)],
        capture_output=True, text=True, env={**__import__("os").environ, "COLUMNS": "80"},
    )  # fmt: skip
    assert r.returncode == 0 and "…" not in r.stdout, r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    rows = r.stdout.splitlines()[4:]  # the table's rows after the title, header and rule
    assert long in "".join(line[:13].strip() for line in rows)


def test_exit_codes_damage_usage_and_internal_errors(tmp_path, rng, cli, monkeypatch):
    """Exit 1 for damage met by any command (not only verify), 2 for bad input, 3 for an
    internal error; each prints a JSON error document under --json."""
    import json

    from _helpers import random_masks, write_bundle

    fp = {"architecture": "T", "modules": {"l.0.mlp.up_proj": [64, 64]}}
    b = write_bundle(tmp_path / "b", fp, random_masks(rng, fp, ["a", "b"]), codec="none")
    f = next(p for p in (b / "personas/a/masks/l.0.mlp.up_proj/c").rglob("*") if p.is_file())
    f.write_bytes(bytes(len(f.read_bytes())))
    code, out, err = cli("overlap", b, "--json")
    assert code == 1 and json.loads(out)["exit_code"] == 1 and "chunk 0" in err
    code, out, _ = cli("overlap", b, "nobody", "--json")
    assert code == 2 and json.loads(out)["exit_code"] == 2
    # damaged metadata inside a bundle that opened is damage too (it was exit 2, bad input)
    for doc in ("personas/b/masks/l.0.mlp.up_proj/zarr.json", "personas/b/zarr.json"):
        d = write_bundle(tmp_path / doc.replace("/", "_"), fp, random_masks(rng, fp, ["a", "b"]))
        (d / doc).write_text((d / doc).read_text()[:-5])  # truncated
        for args in (("overlap", d), ("diff", d, "a", "b"), ("verify", d)):
            code, _, err = cli(*args)
            assert code == 1 and ("damaged" in err or "truncated" in err), (doc, args, code, err)

    from maskstore.store import format as fmt

    def boom(self):
        raise RuntimeError("a bug")

    monkeypatch.setattr(fmt.Bundle, "personas", property(boom))
    code, out, err = cli("info", b, "--json")
    assert code == 3 and json.loads(out)["exit_code"] == 3
    assert "internal error" in err and "RuntimeError: a bug" in err and len(err.splitlines()) == 1


def test_s3_errors_name_the_bucket_and_the_fix(tmp_path, s3_server, cli, monkeypatch):
    for args in (("info", "s3://no-such-bucket/x@v1"), ("info", "s3://no-such-bucket/x"),
                 ("pull", "s3://no-such-bucket/team", "--repo", tmp_path / "r")):  # fmt: skip
        code, _, err = cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "bucket 'no-such-bucket' does not exist" in err, err
    assert not (tmp_path / "r").exists()  # the failed pull left no repository behind
    import os
    import subprocess
    import sys

    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # nothing listens there
    r = subprocess.run([sys.executable, "-m", "maskstore.cli", "info", "s3://masks/x"],
                       capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "cannot reach http://127.0.0.1:9" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_files_that_are_not_bundles_say_so(tmp_path, cli):
    f = tmp_path / "some.txt"
    f.write_text("hello")
    code, _, err = cli("info", f)
    assert code == 2 and "is a file, not a bundle" in err and "maskstore pack" in err, err
    z = tmp_path / "broken.zip"
    z.write_bytes(b"PK\x03\x04 truncated")
    code, _, err = cli("info", z)
    assert code == 2 and "not a readable maskstore zip" in err, err


def test_build_out_that_is_a_dangling_symlink_or_a_file(tmp_path, tiny_dir, calib_files, cli):
    link = tmp_path / "link.zarr"
    link.symlink_to(tmp_path / "nowhere")
    f = tmp_path / "file.zarr"
    f.write_text("mine")
    base = ("build", "--model", tiny_dir, "--samples", "2", "--max-tokens", "16",
            "--persona", f"introvert={calib_files['introvert']}")  # fmt: skip
    for out, phrase in ((link, "is a symlink"), (f, "already exists")):
        _one_line(*cli(*base, "--out", out)[::2], phrase)
    _one_line(*cli(*base, "--out", f, "--force")[::2], "is not a bundle")
    assert link.is_symlink() and not (tmp_path / "nowhere").exists() and f.read_text() == "mine"


def test_library_messages_name_parameters_the_cli_names_flags(tmp_path, rng, cli, calib_files):
    from _helpers import random_masks, write_bundle

    from maskstore import create_bundle
    from maskstore.errors import MaskstoreError
    from maskstore.store.opener import open_bundle

    fp = {"architecture": "T", "modules": {"l.0.mlp.up_proj": [4, 8]}}
    b = write_bundle(tmp_path / "b", fp, random_masks(rng, fp, ["a"]))
    with pytest.raises(MaskstoreError, match="force=True") as e:
        create_bundle(b, fp)
    assert "--" not in str(e.value)
    code, _, err = cli("export-pt", b, "--out", b)
    assert code == 2 and "--force" in err and "force=True" not in err, err

    # parameters in backquotes: the library says `max_memory`, the command line --max-memory
    from maskstore.build.offload import parse_bytes
    from maskstore.compare.algebra import apply_op

    with pytest.raises(MaskstoreError, match="`max_memory` 'lots'") as e:
        parse_bytes("lots")
    assert "--" not in str(e.value)
    with pytest.raises(MaskstoreError, match="`at_least`"):
        apply_op(open_bundle(b, writable=True), "vote", ["a"], "v", at_least=5)
    code, _, err = cli("build", "--persona", f"a={calib_files['introvert']}", "--max-memory",
                       "lots", "--out", tmp_path / "o")  # fmt: skip
    assert code == 2 and "--max-memory 'lots'" in err and "`" not in err, err
    code, _, err = cli("vote", b, "a", "--at-least", "5", "--as", "v")
    assert code == 2 and "--at-least K" in err and "`" not in err, err
    # backquoted text that is no parameter (a path, say) is printed as it is
    from cli._common import as_flags

    assert as_flags("no repository at /tmp/`x`: pass `repo`") == (
        "no repository at /tmp/`x`: pass --repo"
    )


def test_outputs_and_sample_counts_are_named_the_same_way_everywhere(small, tmp_path, cli):
    """pack and export take --out as every other command does (the positional form still
    works); similarity takes --samples as build does; run and eval --chat-template as build."""
    assert cli("pack", small, "--out", tmp_path / "a.zip")[0] == 0
    assert cli("pack", small, tmp_path / "b.zip")[0] == 0
    _one_line(*cli("pack", small)[::2], "name the output once")
    _one_line(*cli("pack", small, tmp_path / "c.zip", "--out", tmp_path / "d.zip")[::2],
              "name the output once")  # fmt: skip
    repo = tmp_path / "repo"
    assert cli("commit", small, "-m", "x", "--repo", repo)[0] == 0
    assert cli("export", "main", "--out", tmp_path / "v.zip", "--repo", repo)[0] == 0
    for command in ("run", "eval", "similarity"):
        out = cli(command, "--help")[1]
        assert "--chat-template" in out or command == "similarity", command
    assert "--samples" in cli("similarity", "--help")[1]


def test_several_personas_are_named_by_repeats_or_commas_alike(tmp_path, rng, cli):
    """``--persona a --persona b`` and ``--persona a,b`` name the same personas (export-pt,
    overlap's positionals); run without --compare takes one."""
    masks = {p: {m: rng.random(tuple(s)) < 0.5 for m, s in FP["modules"].items()} for p in "abc"}
    small = write_bundle(tmp_path / "b.zarr", FP, masks)
    outs = []
    for i, args in enumerate((["--persona", "a", "--persona", "b"], ["--persona", "a,b"])):
        code, out, err = cli("export-pt", small, "--out", tmp_path / f"pt{i}", *args, "--json")
        assert code == 0, err
        outs.append(sorted(p.name for p in (tmp_path / f"pt{i}").iterdir()))
    assert outs[0] == outs[1] and outs[0]
    code, a, err = cli("overlap", small, "a", "b", "--json")
    assert code == 0, err
    code, b, err = cli("overlap", small, "a,b", "--json")
    assert code == 0 and json.loads(a) == json.loads(b), err
    code, _, err = cli("run", small, "--prompt", "hi", "--persona", "a,b")
    _one_line(code, err, "one --persona")
    # a listed name that is a path is only a name; one that names a file is not a bundle
    code, _, err = cli("export-pt", small, "--out", tmp_path / "bad", "--persona", "../x,a")
    _one_line(code, err, "unknown persona '../x'")
    assert not (tmp_path / "bad").exists()
    code, _, err = cli("overlap", small, "a,/etc/passwd#x")
    _one_line(code, err, "not a bundle")


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "huge"])
def test_input_files_that_are_no_regular_file_or_too_big(tmp_path, cli, tiny_dir, small, kind):
    """The files a user names (``build --persona NAME=FILE``, ``eval --mc``, ``similarity
    --texts``): a FIFO with no writer, a device, a folder or a file past the 256 MiB bound is
    one line and exit 2, refused without blocking or reading it whole; nothing is written."""
    import os

    if kind == "fifo":
        path = tmp_path / "calib.txt"
        os.mkfifo(path)
        unblock_fifo_later(path)
    elif kind == "device":
        path = Path("/dev/zero")
    elif kind == "folder":
        path = tmp_path / "calib"
        path.mkdir()
    else:
        path = tmp_path / "calib.txt"
        with open(path, "wb") as f:
            f.truncate(257 << 20)  # sparse: no disk used
    want = {"fifo": "not a regular file", "device": "not a regular file",
            "folder": "is a folder", "huge": "larger than 256 MiB"}[kind]  # fmt: skip
    code, _, err = cli("build", "--model", tiny_dir, "--persona", f"a={path}",
                       "--out", tmp_path / "o.zarr")  # fmt: skip
    _one_line(code, err, "calibration file", want)
    assert not (tmp_path / "o.zarr").exists()
    code, _, err = cli("eval", small, "--mc", path)
    _one_line(code, err, "multiple-choice file", want)
    code, _, err = cli("similarity", small, "a", "a", "--texts", path)
    _one_line(code, err, want)


@pytest.mark.parametrize("kind", ["fifo", "link-out", "device-link"])
def test_import_pt_never_opens_fifos_or_follows_links(tmp_path, cli, kind):
    """A folder of research ``.pt`` files comes from elsewhere: a FIFO in it is refused without
    blocking, and a link (to a tensor file outside, or to a device) is refused, not followed."""
    import os

    src = tmp_path / "pt"
    src.mkdir()
    name = src / "M_a_model.layers.0.mlp.up_proj.pt"
    if kind == "fifo":
        os.mkfifo(name)
        unblock_fifo_later(name)
    elif kind == "link-out":
        outside = tmp_path / "outside.pt"
        torch.save(torch.ones(2, 8, dtype=torch.bool), outside)
        name.symlink_to(outside)
    else:
        name.symlink_to("/dev/zero")
    want = "not a regular file" if kind == "fifo" else "symbolic link"
    _one_line(*cli("import-pt", src, "--out", tmp_path / "o")[::2], "mask file", want)
    assert not (tmp_path / "o").exists()


def test_per_item_output_that_is_a_fifo_or_folder(tmp_path, cli, small):
    """``eval --per-item`` naming a FIFO or a folder: one line, exit 2, before the model
    loads (nothing blocks on the FIFO)."""
    import os

    mc = tmp_path / "mc.csv"
    mc.write_text("question,A,B,matching\nQuiet or loud?,quiet,loud,A\n")
    fifo = tmp_path / "items.jsonl"
    os.mkfifo(fifo)
    unblock_fifo_later(fifo)
    (tmp_path / "dir.jsonl").mkdir()
    for target in (fifo, tmp_path / "dir.jsonl"):
        code, _, err = cli("eval", small, "--mc", mc, "--per-item", target)
        _one_line(code, err, "--per-item", "is not a regular file")


@pytest.mark.parametrize(
    "url", ["s3://", "s3:///x", "s3://o", "s3://Bad_Bucket/x", "s3://a..b/x", "s3://masks/a/../b",
            "s3://masks//x", "s3a://-masks/x"],
)  # fmt: skip
def test_s3_urls_without_a_valid_bucket_or_with_dot_parts(tmp_path, cli, small, url):
    """A remote URL that names no valid bucket, or whose prefix has empty, ``.`` or ``..``
    parts, is refused when added (one line; the remotes stay as they were) and wherever an
    ``s3://`` source is opened, before any connection is tried."""
    repo = tmp_path / "repo"
    assert cli("commit", small, "-m", "one", "--repo", repo)[0] == 0

    def files() -> dict:
        return {p: p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}

    before = files()
    _one_line(*cli("remote", "add", "team", url, "--repo", repo)[::2], "remote")
    assert files() == before
    _one_line(*cli("info", f"{url}@v1")[::2], "remote")
    _one_line(*cli("clone", url, tmp_path / "c")[::2], "remote")
    assert not (tmp_path / "c").exists()


def test_paths_the_system_refuses_are_one_short_line(tmp_path, cli, small):
    """A path too long for the filesystem, as a bundle, an input file or an output, is one
    line and exit 2 that names it cut short (it was "internal error" and exit 3, echoing all
    of it)."""
    long = "b" * 5000
    for args, phrase in (
        (["info", tmp_path / long], "cannot open"),
        (["info", "a/" * 3000 + "x"], "cannot open"),
        (["build", "--persona", f"a={tmp_path / long}", "--out", tmp_path / "o"], "cannot read"),
        (["pack", small, tmp_path / f"{long}.zip"], "cannot use the path"),
        (["export-pt", small, "--persona", "a", "--out", tmp_path / long], "cannot use the path"),
    ):
        code, _, err = cli(*args)
        _one_line(code, err, phrase, "File name too long", " characters)")
        assert len(err) < 400, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.zarr"]
