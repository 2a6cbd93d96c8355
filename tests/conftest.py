from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from maskstore import create_bundle


def random_fingerprint(rng: np.random.Generator, n_layers: int = 2) -> dict:
    mods = {}
    for layer in range(n_layers):
        for leaf, kind in (
            ("q_proj", "self_attn"),
            ("o_proj", "self_attn"),
            ("up_proj", "mlp"),
            ("down_proj", "mlp"),
        ):
            mods[f"model.layers.{layer}.{kind}.{leaf}"] = [
                int(rng.integers(1, 40)),
                int(rng.integers(1, 50)),
            ]
    return {"architecture": "TestArch", "modules": mods}


def write_bundle(path: Path, fp: dict, masks: dict[str, dict[str, np.ndarray]], **kw) -> Path:
    """Write bool masks {persona: {module: (out, in)}} into a new bundle."""
    with create_bundle(path, fp, force=kw.pop("force", False)) as b:
        for name, mods in masks.items():
            with b.persona_writer(name, method="test", **kw) as w:
                for m, arr in mods.items():
                    w.write_mask(m, arr)
    return path


def random_masks(
    rng, fp: dict, names: list[str], p: float = 0.5
) -> dict[str, dict[str, np.ndarray]]:
    return {n: {m: rng.random(tuple(s)) < p for m, s in fp["modules"].items()} for n in names}


def pair_args(calib_files: dict[str, Path]) -> list[str]:
    """``maskstore build`` arguments for the introvert/extrovert pair with contrastive Wanda."""
    return [
        "--persona", f"introvert={calib_files['introvert']}",
        "--persona", f"extrovert={calib_files['extrovert']}",
        "--pair", "introvert:extrovert", "--method", "contrastive-wanda",
    ]  # fmt: skip


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


CLI_SCHEMAS = Path(__file__).resolve().parents[1] / "schemas" / "cli"
_CLI_VALIDATORS: dict = {}
# commands that share a schema: the set operations all print a derived persona
SCHEMA_OF = {
    **dict.fromkeys(("union", "intersect", "subtract", "xor", "complement", "vote", "blend"), "op"),
    **dict.fromkeys(("cp", "mv", "rm"), "edit"),
}


def cli_schema(name: str) -> dict:
    return json.loads((CLI_SCHEMAS / f"{name}.json").read_text())


def check_cli_document(command: str, code: int, out: str) -> None:
    """A --json document is valid against ``schemas/cli/<command>.json`` (``error.json`` when
    the command failed)."""
    import fastjsonschema

    doc = json.loads(out)
    name = "error" if isinstance(doc, dict) and "error" in doc else SCHEMA_OF.get(command, command)
    if name not in _CLI_VALIDATORS:
        _CLI_VALIDATORS[name] = fastjsonschema.compile(cli_schema(name))
    try:
        _CLI_VALIDATORS[name](json.loads(out))
    except fastjsonschema.JsonSchemaException as e:
        msg = f"maskstore {command} --json: {e.message} (schemas/cli/{name}.json)"
        raise AssertionError(msg) from None


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the real console entry point in-process; returns (exit code, stdout, stderr). With
    --json, the document printed is checked against its schema under ``schemas/cli/``."""
    from maskstore.cli.main import COMMANDS, main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["maskstore", *map(str, args)])
        monkeypatch.setenv("COLUMNS", "200")
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        command = next((str(a) for a in args if not str(a).startswith("-")), "")
        if "--json" in map(str, args) and command in COMMANDS and out.strip():
            check_cli_document(command, code, out)
        return code, out, err

    return run


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from _tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def calib_files(tmp_path_factory) -> dict[str, Path]:
    root = Path(__file__).resolve().parents[1] / "examples" / "data"
    return {
        "introvert": root / "introvert.txt",
        "extrovert": root / "extrovert.txt",
        "pairs": root / "introvert_extrovert.csv",
        "mc": root / "introvert_mc.csv",
    }


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on loopback, one for the session (s3fs caches its
    filesystems with their endpoint, so a second server would not be reached)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="masks")
    try:
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
