"""A persona exported as a Hugging Face checkpoint loads with transformers, bit for bit."""

import json

import torch
from _tiny import tiny_llama
from conftest import pair_args

from maskstore.build import build
from maskstore.export import export_model
from maskstore.opener import open_bundle


def test_export_model_loads_with_transformers_bit_for_bit(tmp_path, tiny_dir, calib_files, cli):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    code, out, err = cli("build", "--model", tiny_dir, "--out", tmp_path / "b.zarr",
                         "--samples", "8", "--max-tokens", "32", *pair_args(calib_files))  # fmt: skip
    assert code == 0, err
    code, out, err = cli("export-model", tmp_path / "b.zarr", "introvert", "--model", tiny_dir,
                         "--gamma", "0.25", "--out", tmp_path / "ckpt", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["persona"] == "introvert"
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    b = open_bundle(tmp_path / "b.zarr")
    named = dict(got.named_parameters())
    for name, p in base.named_parameters():
        mod = name.rsplit(".", 1)[0]
        if mod in b.modules and name.endswith("weight"):
            keep = torch.from_numpy(b.read_mask("introvert", mod))
            want = torch.mul(p, torch.where(keep, 1.0, 0.25))
        else:
            want = p
        assert torch.equal(named[name], want), name
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["maskstore.persona"] == "introvert" and meta["maskstore.gamma"] == "0.25"
    assert meta["maskstore.persona_digest"] == b.persona("introvert")["digest"]
    assert (tmp_path / "ckpt" / "tokenizer.json").exists()
    code, out, err = cli("export-model", tmp_path / "b.zarr", "introvert", "--model", tiny_dir,
                         "--out", tmp_path / "ckpt")  # fmt: skip
    assert code == 2 and "already exists" in err


def test_export_model_leaves_the_live_model_as_it_was(tmp_path):
    model = tiny_llama(seed=4)
    g = torch.Generator().manual_seed(0)
    cal = {"a": [{"input_ids": torch.randint(0, 256, (2, 16), generator=g)} for _ in range(3)]}
    build(model, cal, tmp_path / "b.zarr")
    before = {n: p.clone() for n, p in model.named_parameters()}
    export_model(model, None, open_bundle(tmp_path / "b.zarr"), "a", tmp_path / "ckpt")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
