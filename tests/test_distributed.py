"""Data-parallel calibration with a real torchrun (gloo, 2 processes): the bits and digests of
one process, with and without offloading."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from _tiny import save_tiny

from maskstore.build import collector
from maskstore.distributed import gather_stats, shard
from maskstore.errors import MaskstoreError
from maskstore.opener import open_bundle


def _args(folder, calib_files, out):
    return [
        "build", "--model", str(folder), "--out", str(out), "--json",
        "--persona", f"introvert={calib_files['introvert']}",
        "--persona", f"extrovert={calib_files['extrovert']}",
        "--pair", "introvert:extrovert", "--method", "contrastive-wanda",
        "--samples", "20", "--max-tokens", "40", "--batch-size", "3",
    ]  # fmt: skip


def _torchrun(n: int, args: list[str]) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [torchrun, "--standalone", f"--nproc-per-node={n}", "-m", "maskstore.cli", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("offload", [False, True], ids=["whole-model", "offload"])
def test_two_ranks_give_the_bits_of_one_process(tmp_path, cli, calib_files, offload):
    folder = save_tiny(tmp_path / "m", seed=7, layers=3)
    code, out, err = cli(*_args(folder, calib_files, tmp_path / "one.zarr"))
    assert code == 0, err
    extra = ["--offload"] if offload else []
    r = _torchrun(2, _args(folder, calib_files, tmp_path / "two.zarr") + extra)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)  # rank 0 alone prints
    one, two = open_bundle(tmp_path / "one.zarr"), open_bundle(tmp_path / "two.zarr")
    assert doc["digest"] == two.digest == one.digest
    for p in one.personas:
        assert two.persona(p)["digest"] == one.persona(p)["digest"]
        st1 = one.read_stats(p, "model.layers.2.mlp.down_proj").to_array()[0]
        st2 = two.read_stats(p, "model.layers.2.mlp.down_proj").to_array()[0]
        assert (st1 == st2).all()


def test_shards_are_disjoint_and_gram_methods_refused():
    items = list(range(10))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(i for p in parts for i, _ in p) == items
    from maskstore.build import BuildConfig

    coll = collector({}, BuildConfig(method="sparsegpt"), record=True)
    with pytest.raises(MaskstoreError, match="one process"):
        gather_stats({"a": coll})
