"""The documents ``--json`` prints: one schema per command under ``schemas/cli/`` (the ``cli``
fixture validates every --json document any test prints against it); here every command runs
once with --json on tiny parts, so each schema is exercised."""

import json
import shutil
import subprocess

import pytest
from _helpers import CLI_SCHEMAS, SCHEMA_OF, cli_schema, pair_args
from maskstore.cli.main import COMMANDS


def test_every_command_has_a_schema_and_each_schema_compiles():
    import fastjsonschema

    names = {p.stem for p in CLI_SCHEMAS.glob("*.json")}
    want = {SCHEMA_OF.get(c, c) for c in COMMANDS} | {"error"}
    assert names == want, names ^ want
    for name in names:
        schema = cli_schema(name)
        fastjsonschema.compile(schema)
        assert schema["properties"]["schema_version"] == {"const": 1}, name
        assert schema.get("additionalProperties") is False, name
        assert schema.get("description"), name


def test_a_document_that_drifts_from_its_schema_fails(tmp_path, cli):
    import fastjsonschema

    validate = fastjsonschema.compile(cli_schema("init"))
    validate({"schema_version": 1, "repo": "x"})
    for bad in ({"schema_version": 1}, {"schema_version": 1, "repo": "x", "extra key": 1},
                {"schema_version": 2, "repo": "x"}):  # fmt: skip
        with pytest.raises(fastjsonschema.JsonSchemaException):
            validate(bad)


def test_every_command_prints_a_valid_document(tmp_path, tiny_dir, calib_files, cli, monkeypatch):
    seen: set[str] = set()

    def ok(*args):
        code, out, err = cli(*args, "--json")
        assert code == 0, (args, err)
        seen.add(str(args[0]))
        noise = [x for x in err.splitlines() if x.strip() and not x.startswith("warning:")]
        assert noise == [], (args[0], err)  # no progress output under --json
        return json.loads(out)

    b = tmp_path / "b.zarr"
    tiny = ("--samples", "4", "--max-tokens", "16")
    ok("build", "--model", tiny_dir, "--out", b, *tiny, *pair_args(calib_files))
    ok("info", b)
    ok("info", b, "--card")
    ok("verify", b)
    ok("overlap", b)
    ok("diff", b, "introvert", "extrovert")
    ok("union", b, "introvert", "extrovert", "--as", "u")
    ok("intersect", b, "introvert", "extrovert", "--as", "i")
    ok("subtract", b, "introvert", "extrovert", "--as", "s")
    ok("xor", b, "introvert", "extrovert", "--as", "x")
    ok("complement", b, "introvert", "--as", "c")
    ok("vote", b, "introvert", "extrovert", "u", "--at-least", "2", "--as", "v")
    ok("blend", b, "introvert=0.7", "extrovert=0.3", "--as", "bl")
    ok("export-pt", b, "--out", tmp_path / "pt", "--persona", "introvert")
    ok("import-pt", tmp_path / "pt", "--out", tmp_path / "imp.zarr", "--model", tiny_dir)
    doc = ok("xor", b, "introvert", f"{tmp_path / 'imp.zarr'}#introvert", "--as", "same")
    assert doc["kept"] == 0  # an operand from another bundle of the same model
    ok("cp", f"{b}#introvert", b, "--as", "copied")
    ok("mv", b, "copied", "moved")
    ok("rm", b, "moved")
    ok("pack", b, tmp_path / "b.zip")
    ok("run", b, "--model", tiny_dir, "--persona", "introvert", "--prompt", "hi",
       "--max-new-tokens", "2")  # fmt: skip
    ok("eval", b, "--model", tiny_dir, "--mc", calib_files["mc"], "--template", "none")
    ok("similarity", b, "introvert", "extrovert", "--model", tiny_dir, "--texts",
       calib_files["introvert"], "--limit", "2")  # fmt: skip
    ok("export-model", b, "introvert", "--model", tiny_dir, "--out", tmp_path / "ckpt")
    repo, remote = tmp_path / "repo", tmp_path / "remote"
    r = ("--repo", repo)
    ok("init", *r)
    ok("commit", b, "-m", "one", *r)
    ok("log", *r)
    ok("tag", "v1", *r)
    ok("tag", *r)
    ok("branch", "side", *r)
    ok("branch", *r)
    ok("checkout", "v1", "--out", tmp_path / "co.zarr", *r)
    ok("push", remote, *r)
    ok("pull", remote, *r)
    ok("remote", "add", "origin", remote, *r)
    ok("remote", *r)
    ok("fetch", "origin", *r)
    ok("status", b, *r)
    ok("clone", remote, tmp_path / "cloned")
    ok("merge", "side", *r)
    ok("export", "v1", tmp_path / "v1.zip", *r)
    ok("import", tmp_path / "v1.zip", "--repo", tmp_path / "repo2")
    ok("gc", *r)
    ok("verify", repo)
    ok("diff", "v1", "main", "--versions", *r)
    if shutil.which("ssh-keygen"):
        key = tmp_path / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        ok("sign", "v1", "--key", key, *r)
        seen.add("sign")
    else:  # the schema is still compiled above
        seen.add("sign")
    seen.add("serve")  # it keeps running: tests/test_serve.py validates its document
    assert seen == set(COMMANDS), set(COMMANDS) - seen
    code, out, err = cli("info", tmp_path / "missing", "--json")
    assert code == 2 and json.loads(out)["exit_code"] == 2  # the fixture validated error.json


def test_progress_on_a_terminal_and_none_under_json(tmp_path, rng, cli, monkeypatch):
    """With a terminal, long steps draw a progress bar on stderr; with --json, stderr stays
    empty and stdout holds only the document. A fresh process takes rich's TTY_COMPATIBLE=1 as
    a terminal; the other steps run in-process with the console forced to one."""
    import os
    import sys

    from _helpers import random_masks, write_bundle
    from maskstore.cli._common import err_console

    fp = {
        "architecture": "T",
        "modules": {f"model.layers.{i}.mlp.up_proj": [8, 16] for i in range(3)},
    }
    b, repo, remote = tmp_path / "b", tmp_path / "repo", tmp_path / "remote"
    write_bundle(b, fp, random_masks(rng, fp, ["a", "b"]))
    env = {**os.environ, "TTY_COMPATIBLE": "1", "COLUMNS": "120"}
    for json_out in ((), ("--json",)):
        r = subprocess.run([sys.executable, "-m", "maskstore.cli", "verify", str(b), *json_out],
                           capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr
        if json_out:
            assert r.stderr == "" and json.loads(r.stdout)["schema_version"] == 1
        else:
            assert "verifying" in r.stderr, r.stderr

    monkeypatch.setattr(err_console, "_force_terminal", True)  # as rich sets them for a TTY
    monkeypatch.setattr(err_console, "is_interactive", True)
    assert err_console.is_terminal

    def run(*args):
        code, out, err = cli(*args)
        assert code == 0, err
        return out, err

    run("commit", b, "-m", "one", "--repo", repo)
    steps = [
        (("verify", repo), "verifying objects"),
        (("checkout", "main", "--out", tmp_path / "co", "--repo", repo), "checking out"),
        (("push", remote, "--repo", repo), "pushing"),
        (("pull", remote, "--repo", tmp_path / "clone"), "pulling"),
        (("overlap", b), "comparing"),
    ]
    for args, bar in steps:
        assert bar in run(*args)[1], args
        if args[0] == "checkout":
            args = (*args, "--force")
        out, err = run(*args, "--json")
        assert err == "" and json.loads(out)["schema_version"] == 1, args
