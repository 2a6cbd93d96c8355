"""A persona exported as a Hugging Face checkpoint loads with transformers, bit for bit."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from _helpers import pair_args
from _tiny import tiny_llama

from maskstore.build import build
from maskstore.serve.export import export_model
from maskstore.store.opener import open_bundle


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


def test_compressed_tensors_export_decompresses_bit_for_bit(tmp_path, tiny_dir, calib_files, cli):
    """The sparse-bitmask checkpoint, read back by the compressed-tensors library's own
    decompressor, gives every weight bit for bit (kept zeros and -0.0 included)."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    code, out, err = cli("build", "--model", tiny_dir, "--out", tmp_path / "b.zarr",
                         "--samples", "8", "--max-tokens", "32", *pair_args(calib_files))  # fmt: skip
    assert code == 0, err
    # a kept weight that is exactly -0.0 and one that is 0.0: W != 0 would lose both
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    b = open_bundle(tmp_path / "b.zarr")
    mod = next(iter(b.persona("introvert")["modules"]))
    keep = b.read_mask("introvert", mod)
    rows, cols = np.nonzero(keep)
    w = dict(base.named_modules())[mod].weight
    with torch.no_grad():
        w[rows[0], cols[0]] = -0.0
        w[rows[1], cols[1]] = 0.0
    base.save_pretrained(tmp_path / "base")
    tok_files = [f for f in os.listdir(tiny_dir) if f.startswith(("tokenizer", "special"))]
    for f in tok_files:
        shutil.copy(tiny_dir / f, tmp_path / "base" / f)
    code, out, err = cli("export-model", tmp_path / "b.zarr", "introvert", "--model",
                         tmp_path / "base", "--format", "compressed-tensors", "--out",
                         tmp_path / "ct", "--no-check-weights", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["format"] == "compressed-tensors"
    comp = ModelCompressor.from_pretrained(str(tmp_path / "ct"))
    assert comp is not None and comp.sparsity_config.format == "sparse-bitmask"
    got = dict(comp.sparsity_compressor.decompress(str(tmp_path / "ct")))
    want = {}
    for name, p in base.named_parameters():
        mod_name = name.rsplit(".", 1)[0]
        if mod_name in b.modules and name.endswith("weight"):
            m = torch.from_numpy(b.read_mask("introvert", mod_name))
            want[name] = torch.where(m, p, torch.zeros_like(p))
        else:
            want[name] = p
    masked = [n for n in want if n.rsplit(".", 1)[0] in b.modules]
    assert len(masked) == len(b.persona("introvert")["modules"]) and set(masked) <= set(got)
    for name, t in want.items():
        if name == "lm_head.weight" and name not in got:  # tied: stored once
            continue
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].view(torch.int32), t.detach().view(torch.int32)), name
    assert got[f"{mod}.weight"][rows[0], cols[0]].view(torch.int32) == -(2**31)  # -0.0 kept
    with safe_open(tmp_path / "ct" / "model.safetensors", "pt") as f:
        assert f.metadata()["maskstore.store.format"] == "compressed-tensors"
        dense = sum(f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(".compressed"))
    assert dense == sum(e["kept"] for e in b.persona("introvert")["modules"].values())
    assert ct.__version__
    code, out, err = cli("export-model", tmp_path / "b.zarr", "introvert", "--model", tiny_dir,
                         "--format", "compressed-tensors", "--gamma", "0.5",
                         "--out", tmp_path / "ct2")  # fmt: skip
    assert code == 2 and "--gamma 0" in err and not (tmp_path / "ct2").exists()


def test_force_replaces_only_an_earlier_export_never_other_data(tmp_path, tiny_dir, calib_files,
                                                                cli):  # fmt: skip
    """``--force`` replaces a folder maskstore exported before; a folder of someone's files, a
    file, a symlink and the source bundle itself are refused and left as they were; missing
    parent folders are created."""
    import os

    b = tmp_path / "b.zarr"
    assert cli("build", "--model", tiny_dir, "--samples", "2", "--max-tokens", "16",
               "--persona", f"introvert={calib_files['introvert']}", "--out", b)[0] == 0  # fmt: skip
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    afile = tmp_path / "afile"
    afile.write_text("x")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    exports = (
        ("export-pt", b, "--persona", "introvert"),
        ("export-model", b, "introvert", "--model", tiny_dir),
        ("export-model", b, "introvert", "--model", tiny_dir, "--format", "compressed-tensors"),
    )
    for i, args in enumerate(exports):
        for target in (theirs, afile, link, b):
            code, _, err = cli(*args, "--out", target, "--force")
            assert code == 2 and len(err.strip().splitlines()) == 1, (args, target, err)
        assert (theirs / "thesis.tex").read_text() == "years of work"
        assert afile.read_text() == "x" and os.path.islink(link)
        assert cli("verify", b)[0] == 0
        out = tmp_path / "new" / "deeper" / f"{args[0]}-{i}"
        code, _, err = cli(*args, "--out", out)
        assert code == 0, err  # parents created
        assert cli(*args, "--out", out)[0] == 2  # exists: --force needed
        code, _, err = cli(*args, "--out", out, "--force")  # an earlier export: replaced
        assert code == 0, err


def test_export_records_provenance_casts_and_writes_readable_files(tmp_path, tiny_dir,
                                                                    calib_files, cli):  # fmt: skip
    """From a repository version: --dtype bfloat16 loads as bfloat16 with the gated weights
    rounded once; config.json's maskstore key and README.md say what it is; files are
    readable as others' exports are (0666 less the umask); parent folders are created."""
    import os
    import stat

    from transformers import AutoModelForCausalLM

    b, repo = tmp_path / "b.zarr", tmp_path / "repo"
    assert cli("build", "--model", tiny_dir, "--samples", "4", "--max-tokens", "16",
               *pair_args(calib_files), "--out", b)[0] == 0  # fmt: skip
    assert cli("commit", b, "-m", "x", "--repo", repo)[0] == 0
    assert cli("tag", "v1", "--repo", repo)[0] == 0
    out = tmp_path / "deep" / "er" / "ckpt"
    code, _, err = cli("export-model", f"{repo}@v1", "introvert", "--dtype", "bfloat16",
                       "--out", out)  # fmt: skip
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    prov = cfg["maskstore"]
    bundle = open_bundle(b)
    assert prov["persona"] == "introvert" and prov["method"] == "contrastive-wanda"
    assert prov["persona_digest"] == bundle.persona("introvert")["digest"]
    assert prov["bundle_digest"] == open_bundle(f"{repo}@v1").digest
    assert prov["version"] == open_bundle(f"{repo}@v1").source.version
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "introvert" in card and prov["persona_digest"] in card
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name
    got = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    named = dict(got.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in got.parameters())
    for name, p in base.named_parameters():
        mod = name.rsplit(".", 1)[0]
        want = p
        if mod in bundle.modules and name.endswith("weight"):
            want = p * torch.from_numpy(bundle.read_mask("introvert", mod))
        assert torch.equal(named[name], want.to(torch.bfloat16)), name
