"""Data-parallel calibration with a real torchrun (gloo, 2 processes): the bits and digests of
one process, with and without offloading."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from _tiny import save_tiny

from maskstore.build import methods
from maskstore.build.distributed import shard
from maskstore.store.opener import open_bundle


def _args(folder, calib_files, out, method="contrastive-wanda"):
    pair = ["--pair", "introvert:extrovert"] if methods.get(method).contrastive else []
    return [
        "build", "--model", str(folder), "--out", str(out), "--json",
        "--persona", f"introvert={calib_files['introvert']}",
        "--persona", f"extrovert={calib_files['extrovert']}", *pair, "--method", method,
        "--samples", "20", "--max-tokens", "40", "--batch-size", "3",
    ]  # fmt: skip


def _torchrun(n: int, args: list[str]) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [torchrun, "--standalone", f"--nproc-per-node={n}", "-m", "maskstore.cli", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


# every registered method in one process and on two ranks; offloading with one method of each
# kind of statistics (per-channel sums; SparseGPT's Gram matrices, gathered block by block)
LEGS = [(m, False) for m in sorted(methods.METHODS)] + [
    ("contrastive-wanda", True),
    ("sparsegpt", True),
]


@pytest.mark.dist
@pytest.mark.parametrize("method,offload", LEGS, ids=[f"{m}-{'offload' if o else 'whole'}"
                                                      for m, o in LEGS])  # fmt: skip
def test_two_ranks_give_the_bits_of_one_process(tmp_path, cli, calib_files, method, offload):
    folder = save_tiny(tmp_path / "m", seed=7, layers=3)
    code, out, err = cli(*_args(folder, calib_files, tmp_path / "one.zarr", method))
    assert code == 0, err
    extra = ["--offload"] if offload else []
    r = _torchrun(2, _args(folder, calib_files, tmp_path / "two.zarr", method) + extra)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)  # rank 0 alone prints
    one, two = open_bundle(tmp_path / "one.zarr"), open_bundle(tmp_path / "two.zarr")
    assert doc["digest"] == two.digest == one.digest
    for p in one.personas:
        assert two.persona(p)["digest"] == one.persona(p)["digest"]
        for m in one.modules:
            assert (one.read_stats(p, m).to_array()[0] == two.read_stats(p, m).to_array()[0]).all()


def test_a_rank_without_batches_still_gets_every_gram(monkeypatch):
    """A rank that calibrated nothing (fewer batches than ranks) learns each block's Gram
    matrices, and which modules share them, from the others: folded in calibration order,
    the bits of one process. The gather itself is simulated in-process here (the real
    two-process runs are above): rank 0 saw batches 0, 1 and 2, rank 1 none."""
    from maskstore.build import distributed
    from maskstore.build.collect import StatsCollector

    # float addition is not associative: (1e16 + 1) - 1e16 is 0, (1e16 - 1e16) + 1 is 1, so
    # only the fold in calibration order gives one process's bits
    grams = [np.full((3, 3), v) for v in (1e16, 1.0, -1e16)]
    idle = StatsCollector({}, gram=True, record=True)
    # what rank 0 sends for persona p: its module groups and per-batch (index, X^T X, tokens),
    # in the order it happens to hold them
    parts = [(2, grams[2], 4), (0, grams[0], 5), (1, grams[1], 7)]
    busy = {"p": ({"q": "q", "k": "q"}, {"q": parts})}
    one = grams[0].copy()
    one += grams[1]
    one += grams[2]  # one process: the first batch's, then += each next one
    monkeypatch.setattr(distributed, "_gather", lambda mine: [busy, mine])  # ranks 0 and 1
    distributed.gather_grams({"p": idle}, ["q", "k"])
    assert idle.group_of == {"q": "q", "k": "q"}
    assert np.array_equal(idle.grams["q"], one) and not one.any()
    assert idle.gram_tokens["q"] == 16


def test_shards_are_disjoint():
    items = list(range(10))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(i for p in parts for i, _ in p) == items
