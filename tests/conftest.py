from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from _helpers import (  # noqa: F401 - re-exported for the fixtures below
    CLI_SCHEMAS,
    SCHEMA_OF,
    check_cli_document,
    cli_schema,
    pair_args,
    random_fingerprint,
    random_masks,
    write_bundle,
)


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


# without a GPU, the Triton kernels run on CPU tensors under Triton's interpreter (it must be
# set before a kernel is first decorated); tests/gpu runs them compiled
if _no_gpu():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests on the live server fixture or the S3 server (moto) run server processes: marked
    ``server``, so ``-m "not server"`` deselects them."""
    for item in items:
        if {"served", "s3_server"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the real console entry point in-process; returns (exit code, stdout, stderr). With
    --json, the document printed is checked against its schema under ``schemas/cli/``."""
    from maskstore.cli.main import COMMANDS, main

    def run(*args: str, columns: int = 200) -> tuple[int, str, str]:
        from maskstore.cli._common import console

        monkeypatch.setattr(sys, "argv", ["maskstore", *map(str, args)])
        monkeypatch.setenv("COLUMNS", str(columns))
        monkeypatch.setattr(console, "width", columns)  # fixed when the console was made
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
