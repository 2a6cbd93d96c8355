"""Sequential onloading gives the bits and digests of the whole-model build."""

import json

import pytest
from _helpers import pair_args
from _tiny import save_tiny

from maskstore.build import methods
from maskstore.build.offload import parse_bytes
from maskstore.store.opener import open_bundle


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("off") / "m", seed=7, layers=3)


def _build(cli, tmp_path, folder, name, *extra):
    out = tmp_path / name
    code, stdout, err = cli("build", "--model", folder, "--out", out, "--json", *extra)
    assert code == 0, err
    return open_bundle(out), json.loads(stdout)


@pytest.mark.parametrize("name", sorted(methods.METHODS))  # every registered method
def test_offloaded_build_equals_whole_model_build(tmp_path, cli, calib_files, tiny_folder, name):
    common = [*pair_args(calib_files)[:-2], "--method", name, "--samples", "12",
              "--max-tokens", "40", "--batch-size", "5"]  # fmt: skip
    if not methods.get(name).contrastive:
        common = [a for a in common if a not in ("--pair", "introvert:extrovert")]
    whole, _ = _build(cli, tmp_path, tiny_folder, "whole.zarr", *common)
    off, _ = _build(cli, tmp_path, tiny_folder, "off.zarr", *common, "--offload")
    # a budget smaller than the weights turns offloading on by itself, and its quarter is too
    # small for the hidden states: they spill to disk and come back unchanged
    spill, _ = _build(cli, tmp_path, tiny_folder, "spill.zarr", *common, "--max-memory", "20KB")
    for b in (off, spill):
        assert b.fingerprint == whole.fingerprint
        for p in whole.personas:
            assert b.persona(p)["digest"] == whole.persona(p)["digest"], p
            for m in whole.modules:
                assert (
                    b.read_stats(p, m).to_array()[0] == whole.read_stats(p, m).to_array()[0]
                ).all()
    assert off.digest == whole.digest == spill.digest


def test_offload_needs_a_layers_list_and_a_size(tmp_path, cli, calib_files, tiny_folder):
    code, _, err = cli(
        "build", "--model", tiny_folder, "--persona", f"a={calib_files['introvert']}",
        "--max-memory", "lots", "--out", tmp_path / "x",
    )  # fmt: skip
    assert code == 2 and "--max-memory 'lots'" in err
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30) and parse_bytes("500MB") == 500_000_000


@pytest.mark.slow  # five builds in fresh processes
def test_offload_refuses_fifos_and_hostile_indexes_without_hanging(tmp_path, calib_files, tiny_dir):
    """``model.safetensors`` a FIFO (nothing would ever write it), an index that is not JSON,
    one without a weight_map, one naming ``../x.safetensors``: each is one line, exit 2, and
    nothing hangs."""
    import os
    import shutil
    import subprocess
    import sys

    def build(folder):
        return subprocess.run(
            [sys.executable, "-m", "maskstore.cli", "build", "--model", str(folder), "--offload",
             "--persona", f"introvert={calib_files['introvert']}", "--samples", "2",
             "--out", str(tmp_path / f"{folder.name}.zarr")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(tiny_dir, dst)
        return dst

    fifo = copy("fifo")
    (fifo / "model.safetensors").unlink()
    os.mkfifo(fifo / "model.safetensors")
    cases = {fifo: "not a regular file"}
    for name, text in (("notjson", "{nope"), ("nomap", '{"metadata": {}}'),
                       ("escape", '{"weight_map": {"a": "../x.safetensors"}}')):  # fmt: skip
        d = copy(name)
        (d / "model.safetensors.index.json").write_text(text)
        cases[d] = "not a file in" if name == "escape" else "not a safetensors index"
    shape = copy("shape")  # config.json that does not describe the weights
    cfg = json.loads((shape / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (shape / "config.json").write_text(json.dumps(cfg))
    cases[shape] = "do not belong together"
    (tmp_path / "x.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    for folder, phrase in cases.items():
        r = build(folder)
        assert r.returncode == 2 and phrase in r.stderr, (folder.name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / f"{folder.name}.zarr").exists()


def test_a_full_spill_folder_is_one_line_and_leaves_nothing(tmp_path, calib_files, tiny_dir):
    """Hidden states spilled past --max-memory into a folder that fills up (a file-size limit
    stands in for a full disk): one line naming the folder and the fixes, exit 2, no spill
    folder left behind, no bundle written."""
    import os
    import subprocess
    import sys

    spill = tmp_path / "spill"
    spill.mkdir()
    out = tmp_path / "b.zarr"
    code = (
        "import resource, signal, sys, runpy; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
        f"sys.argv = ['maskstore', 'build', '--model', {str(tiny_dir)!r}, '--offload', "
        f"'--max-memory', '20KB', '--samples', '8', '--max-tokens', '40', '--batch-size', '4', "
        f"'--persona', 'introvert={calib_files['introvert']}', '--out', {str(out)!r}]; "
        "runpy.run_module('maskstore.cli', run_name='__main__')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=180, env={**os.environ, "TMPDIR": str(spill)})  # fmt: skip
    assert r.returncode == 2 and "spilling hidden states" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list(spill.iterdir()) == [] and not out.exists()
