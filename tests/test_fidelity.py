"""What distorts statistics or masks: overflow, lm_head, legacy rules, the tie warning."""

import warnings

import numpy as np
import pytest
import torch
from _tiny import tiny_llama

import maskstore
from maskstore.build import BuildConfig, TieWarning, build
from maskstore.build.importers import import_pt, split_name
from maskstore.errors import MaskstoreError
from maskstore.modules import check_untied, maskable_modules, model_fingerprint
from maskstore.store.opener import open_bundle


def _batches(seed=0, n=4, lo=0, hi=256):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(lo, hi, (2, 12), generator=g)} for _ in range(n)]


def test_float16_statistics_are_upcast_and_overflow_is_named(tmp_path):
    model = tiny_llama(seed=1)
    with torch.no_grad():  # inputs of layer 0's down_proj reach ~1e3: their squares pass 65504
        model.model.layers[0].mlp.up_proj.weight.mul_(40.0)
        model.model.layers[0].mlp.gate_proj.weight.mul_(40.0)
    half = model.half()
    build(half, {"a": _batches()}, tmp_path / "h.zarr")
    st = open_bundle(tmp_path / "h.zarr").read_stats("a", "model.layers.0.mlp.down_proj")
    assert np.isfinite(st.sumsq).all() and np.sqrt(st.sumsq).max() > 256
    with torch.no_grad():  # now the activations themselves overflow float16
        half.model.layers[1].mlp.up_proj.weight.mul_(1e4)
        half.model.layers[1].mlp.gate_proj.weight.mul_(1e4)
    with pytest.raises(MaskstoreError, match=r"model\.layers\.1\.mlp\.down_proj are not finite"):
        build(half, {"a": _batches()}, tmp_path / "inf.zarr")
    assert not (tmp_path / "inf.zarr").exists()


def _tied():
    model = tiny_llama(seed=2)
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def test_lm_head_is_masked_only_when_asked_and_untied(tmp_path):
    model = _tied()
    assert "lm_head" not in maskable_modules(model)
    mods = maskable_modules(model, include_lm_head=True)
    assert "lm_head" in mods
    with pytest.raises(MaskstoreError, match="shares its weight with model.embed_tokens"):
        check_untied(model, mods)
    assert check_untied(model, mods, untie=True) == ["lm_head"]
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    build(model, {"a": _batches()}, tmp_path / "b.zarr", modules=mods)
    assert "lm_head" in open_bundle(tmp_path / "b.zarr").modules

    live = _tied()
    emb = live.model.embed_tokens.weight.clone()
    with pytest.raises(MaskstoreError, match="untie=True"):
        maskstore.attach(live, tmp_path / "b.zarr")
    h = maskstore.attach(live, tmp_path / "b.zarr", untie=True)
    h.use("a")
    assert torch.equal(live.model.embed_tokens.weight, emb)  # the embeddings keep every value
    assert (live.lm_head.weight == 0).float().mean() >= 0.49
    h.use(None)
    assert torch.equal(live.lm_head.weight, emb)


def test_cli_include_lm_head_needs_untie_for_tied_models(tmp_path, cli, calib_files):
    from _tiny import save_tiny

    folder = save_tiny(tmp_path / "m", seed=0, tie=True)
    args = ["build", "--persona", f"a={calib_files['introvert']}", "--model", folder]
    code, out, err = cli(*args, "--include-lm-head", "--out", tmp_path / "x.zarr")
    assert code == 2 and "--untie" in err.strip().splitlines()[-1], (out, err)
    code, _, err = cli(*args, "--include-lm-head", "--untie", "--out", tmp_path / "y.zarr")
    assert code == 0, err
    assert "lm_head" in open_bundle(tmp_path / "y.zarr").modules


def test_import_pt_lm_head_files(tmp_path, cli):
    model = tiny_llama(seed=0)
    src = tmp_path / "pt"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    for persona in ("seek", "reject"):
        for name in ("model.layers.0.mlp.up_proj", "lm_head"):
            w = dict(model.named_modules())[name].weight
            torch.save(torch.rand(w.shape, generator=g) < 0.5, src / f"M_{persona}_{name}.pt")
    assert split_name("reject_lm_head") == ("reject", "lm_head")
    fp = model_fingerprint(model, maskable_modules(model, include_lm_head=True))
    names, skipped = import_pt(src, tmp_path / "a.zarr", fingerprint=fp)
    b = open_bundle(tmp_path / "a.zarr")
    assert (
        skipped == 0
        and "lm_head" in b.modules
        and b.fingerprint["architecture"] == ("LlamaForCausalLM")
    )
    names, skipped = import_pt(src, tmp_path / "s.zarr", skip_lm_head=True)
    assert skipped == 2 and "lm_head" not in open_bundle(tmp_path / "s.zarr").modules
    without = model_fingerprint(model)  # a fingerprint without lm_head: the file is refused
    with pytest.raises(MaskstoreError, match="no masked module lm_head.*skip_lm_head=True"):
        import_pt(src, tmp_path / "r.zarr", fingerprint=without)
    code, out, err = cli("import-pt", src, "--out", tmp_path / "c.zarr", "--skip-lm-head")
    assert code == 0 and "skipped 2 lm_head file(s)" in out


def test_personas_built_before_the_reference_rules_rebuild_the_same():
    """A persona that predates a recorded rule is read back with the rule of its time."""
    old = BuildConfig.from_params("contrastive-wanda", 0.2, {"phi": "relu", "eps": 1e-6})
    assert (old.keep, old.ties, old.eps_at, old.norm) == ("floor", "index", "outside", "tokens")
    new = BuildConfig(method="contrastive-wanda", phi="softplus")
    back = BuildConfig.from_params(new.method, new.sparsity, new.params())
    assert back == new and new.params()["keep"] == "int" and new.params()["tau"] == 2.0
    assert (
        BuildConfig(method="wanda").sparsity == 0.5
        and BuildConfig(method="contrastive-sparse").sparsity == 0.3
    )


def test_tie_warning_names_the_share(tmp_path):
    model = tiny_llama(seed=4)
    cal = {"a": _batches(1, lo=0, hi=128), "b": _batches(2, lo=128, hi=256)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(
            model,
            cal,
            tmp_path / "r.zarr",
            pairs=[("a", "b")],
            config=BuildConfig(method="contrastive-wanda"),
        )
        build(
            model,
            cal,
            tmp_path / "s.zarr",
            pairs=[("a", "b")],
            config=BuildConfig(method="contrastive-wanda", phi="softplus"),
        )
    msgs = [str(w.message) for w in caught if issubclass(w.category, TieWarning)]
    assert msgs and all("scored exactly 0" in m and "%" in m for m in msgs)
    assert len(msgs) <= 2  # softplus scores are never 0: only the relu build warns


def test_hub_ids_resolve_from_the_local_cache_only(tmp_path, cli, calib_files, monkeypatch):
    """``--model org/name`` is found in the hub cache's layout (refs -> snapshots), never
    downloaded; a missing id names the cache it searched."""
    from _tiny import save_tiny

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--test-org--tiny"
    save_tiny(repo / "snapshots" / commit, seed=3)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    args = ["build", "--persona", f"a={calib_files['introvert']}", "--samples", "4"]
    code, out, err = cli(*args, "--model", "test-org/tiny", "--out", tmp_path / "a.zarr")
    assert code == 0, err
    code, out, err = cli(
        *args, "--model", "test-org/tiny", "--revision", commit, "--out", tmp_path / "b.zarr"
    )
    assert code == 0, err
    assert open_bundle(tmp_path / "a.zarr").digest == open_bundle(tmp_path / "b.zarr").digest
    code, out, err = cli(*args, "--model", "test-org/absent", "--out", tmp_path / "c.zarr")
    line = err.strip().splitlines()[-1]
    assert code == 2 and "test-org/absent" in line and str(cache) in line
    code, out, err = cli(
        *args, "--model", "test-org/tiny", "--revision", "v9", "--out", tmp_path / "d.zarr"
    )
    assert code == 2 and "at revision v9" in err


def test_api_build_reports_progress_when_asked(tmp_path):
    model = tiny_llama(seed=6)
    events: dict[str, int] = {}
    cal = {"a": _batches(1, n=3), "b": _batches(2, n=2)}
    build(
        model,
        cal,
        tmp_path / "p.zarr",
        progress=lambda stage, total: lambda done, t: events.update({stage: done}),
    )
    assert events == {
        "calibrating a": 6,
        "calibrating b": 4,
        "scoring": len(maskable_modules(model)),
    }
