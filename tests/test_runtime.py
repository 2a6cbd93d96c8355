import json

import numpy as np
import pytest
import torch
from _helpers import pair_args
from _tiny import byte_tokenizer, tiny_llama

import maskstore
from maskstore import create_bundle
from maskstore.compare import evaluate
from maskstore.errors import MaskstoreError
from maskstore.modules import maskable_modules, model_fingerprint
from maskstore.store.opener import open_bundle


def _loaded(tmp_path, dtype=torch.float32, seed=5):
    """A tiny Llama saved as safetensors and loaded back as users load models: its weights
    memory-mapped from the file, which a handle then reads base values back from."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / f"model-{str(dtype).split('.')[-1]}"
    tiny_llama(seed=seed).to(dtype).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval(), folder


# every runtime test runs twice: base values stored in RAM (a model built in memory) and read
# back from the checkpoint (a model loaded from safetensors)
@pytest.fixture(params=["memory", "checkpoint"])
def setup(tmp_path, rng, request):
    model = tiny_llama(seed=5) if request.param == "memory" else _loaded(tmp_path)[0]
    mods = maskable_modules(model)
    fp = model_fingerprint(model, mods, hash_weights=True)
    masks = {
        p: {n: rng.random((m.out_features, m.in_features)) < 0.5 for n, m in mods.items()}
        for p in ("a", "b")
    }
    masks["half"] = {
        n: rng.random((m.out_features, m.in_features)) < 0.3 for n, m in list(mods.items())[:3]
    }
    with create_bundle(tmp_path / "b", fp) as b:
        for p, mm in masks.items():
            with b.persona_writer(p, method="t") as w:
                for n, arr in mm.items():
                    w.write_mask(n, arr)
    base = {n: m.weight.detach().clone() for n, m in mods.items()}
    return model, mods, masks, base, tmp_path / "b"


def test_switching_is_exact_and_keeps_tensors(setup):
    model, mods, masks, base, path = setup
    params = {n: m.weight for n, m in mods.items()}
    h = maskstore.attach(model, path)
    assert h.active is None
    h.use("a")  # the first use gives each Parameter its own storage; it stays from then on
    ptrs = {n: m.weight.data_ptr() for n, m in mods.items()}
    for p in ("a", "b", "a", None, "half", "b", None):
        h.use(p)
        assert h.active == p
        for n, m in mods.items():
            want = (
                base[n]
                if p is None or n not in masks[p]
                else base[n] * torch.from_numpy(masks[p][n])
            )
            assert torch.equal(m.weight, want), (p, n)
            assert m.weight is params[n] and m.weight.data_ptr() == ptrs[n]


def test_soft_gate_and_context_manager(setup):
    model, mods, masks, base, path = setup
    h = maskstore.attach(model, path)
    h.use("a", gamma=0.25)
    n, m = next(iter(mods.items()))
    g = torch.where(torch.from_numpy(masks["a"][n]), 1.0, 0.25)
    assert torch.equal(m.weight, base[n] * g)
    with h.persona("b"):
        assert h.active == "b" and torch.equal(m.weight, base[n] * torch.from_numpy(masks["b"][n]))
    assert h.active == "a" and h.gamma == 0.25 and torch.equal(m.weight, base[n] * g)
    with h.disable_adapter():
        assert torch.equal(m.weight, base[n])
    h.detach()
    assert h.active is None and all(torch.equal(mm.weight, base[k]) for k, mm in mods.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(setup, dtype):
    model, mods, masks, base, path = setup
    model.to(dtype)
    h = maskstore.attach(model, path)
    h.use("a")
    for n, m in mods.items():
        assert m.weight.dtype == dtype
        assert torch.equal(m.weight, base[n].to(dtype) * torch.from_numpy(masks["a"][n]).to(dtype))
    h.use(None)
    assert all(torch.equal(m.weight, base[n].to(dtype)) for n, m in mods.items())


def test_cache_is_packed_and_bounded(setup):
    model, mods, masks, base, path = setup
    h = maskstore.attach(model, path, cache_bytes=2000)
    h.use("a")
    info = h.cache_info()
    assert info.bytes <= 2000 + max(m.weight.numel() // 8 + m.out_features for m in mods.values())
    with pytest.raises(MaskstoreError, match="already has a live handle"):  # one per model
        maskstore.attach(model, path)
    h.detach()
    big = maskstore.attach(model, path)
    big.use("a")
    big.use("b")
    packed = sum(((m.in_features + 7) // 8) * m.out_features for m in mods.values())
    assert big.cache_info().bytes == 2 * packed  # 1 bit a weight (+ row padding), two personas
    big.use("a")
    assert big.cache_info().hits >= len(mods)


def test_bad_persona_gamma_and_model(setup, tmp_path):
    model, mods, masks, base, path = setup
    h = maskstore.attach(model, path)
    with pytest.raises(MaskstoreError, match="known: a, b, half"):
        h.use("zzz")
    for g in (-0.1, 1.5):
        with pytest.raises(MaskstoreError, match="gamma"):
            h.use("a", gamma=g)
    with pytest.raises(MaskstoreError, match="'lm_head' is not a masked module"):
        h.base_weight("lm_head")
    for bad in (None, "model", path):  # not a module: one clear error, not a TypeError
        with pytest.raises(MaskstoreError, match="needs a torch.nn.Module"):
            maskstore.attach(bad, path)
    h.detach()
    for size in (-1, 1.5, True):
        with pytest.raises(MaskstoreError, match="cache_bytes"):
            maskstore.attach(model, path, cache_bytes=size)
    h = maskstore.attach(model, path)  # the refusals left no live handle behind
    h.detach()
    other = tiny_llama(seed=5, intermediate=96)
    with pytest.raises(MaskstoreError, match="mlp.gate_proj is .* wrong model"):
        maskstore.attach(other, path)
    with pytest.raises(MaskstoreError, match="weights differ"):
        maskstore.attach(tiny_llama(seed=9), path, check_weights=True)
    maskstore.attach(tiny_llama(seed=5), path, check_weights=True)


def test_damaged_module_leaves_model_untouched(setup):
    model, mods, masks, base, path = setup
    h = maskstore.attach(model, path)
    h.use("a")
    before = {n: m.weight.clone() for n, m in mods.items()}
    last = list(mods)[-1]
    chunk = next(p for p in (path / "personas/b/masks" / last / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"garbage")
    with pytest.raises(MaskstoreError, match="chunk 0"):
        h.use("b")
    assert h.active == "a"
    assert all(torch.equal(m.weight, before[n]) for n, m in mods.items())


def test_forward_uses_masked_weights(setup):
    model, mods, masks, base, path = setup
    ids = torch.randint(0, 256, (2, 12))
    h = maskstore.attach(model, path)
    with torch.no_grad():
        base_out = model(ids).logits
        h.use("a")
        a_out = model(ids).logits
        h.use(None)
        again = model(ids).logits
    assert not torch.allclose(base_out, a_out) and torch.equal(base_out, again)


def test_mc_loglik_matches_direct_computation(setup, tmp_path):
    model, mods, masks, base, path = setup
    tok = byte_tokenizer()
    f = tmp_path / "mc.csv"
    f.write_text(
        "question,A,B,matching\nWhat do you like?,quiet books,loud parties,A\nAnd you?,yes,no,B\n"
    )
    items = evaluate.read_mc(f)
    for template, system, ctx_of in (
        ("none", None, lambda q: f"{q}\n\nAnswer:"),
        (
            "llama2",
            "Be kind.",
            lambda q: f"[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\n{q}\n\nAnswer: [/INST]",
        ),
        ("Q: {question} ({system}) A:", "s", lambda q: f"Q: {q} (s) A:"),
    ):
        sc = evaluate.answer_logliks(model, tok, items, system=system, template=template)
        for i, it in enumerate(items):
            for j, ans in enumerate((it.a, it.b)):
                ctx = tok(ctx_of(it.question))["input_ids"]
                a_ids = tok(" " + ans, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([ctx + a_ids])
                with torch.no_grad():
                    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
                want = sum(logp[len(ctx) + t - 1, a_ids[t]].item() for t in range(len(a_ids)))
                assert sc.ll[i, j].item() == pytest.approx(want, rel=1e-4)
                assert sc.tokens[i, j].item() == len(a_ids)
    assert evaluate.accuracy(torch.tensor([[0.0, -1.0], [0.0, -1.0]]), ["A", "B"]) == 0.5
    # length normalisation can flip a choice: 2 tokens at -1.0 each beat 1 token at -1.5
    sc = evaluate.Scores(torch.tensor([[-2.0, -1.5]]), torch.tensor([[2.0, 1.0]]))
    assert sc.choices() == ["B"] and sc.choices(normalise=True) == ["A"]
    for bad in ("{answer}", "no fields", "{question", "{question}{0}"):
        with pytest.raises(MaskstoreError, match="`template`"):
            evaluate.check_template(bad)


def test_wilson_interval():
    lo, hi = evaluate.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = evaluate.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert evaluate.wilson(0, 0) == (0.0, 1.0)


def test_mc_csv_errors(tmp_path):
    f = tmp_path / "mc.csv"
    f.write_text("question,A,B\nx,y,z\n")
    with pytest.raises(MaskstoreError, match="needs columns question,A,B,matching"):
        evaluate.read_mc(f)
    f.write_text("question,A,B,matching\nx,,z,A\n")
    with pytest.raises(MaskstoreError, match=":2: empty field"):
        evaluate.read_mc(f)


def test_layer_cosine(setup):
    model, mods, masks, base, path = setup
    h = maskstore.attach(model, path)
    tok = byte_tokenizer()
    same = evaluate.layer_cosine(h, tok, ["hello there", "a quiet evening"], "a", "a")
    assert all(abs(c - 1.0) < 1e-5 for c in same)
    diff = evaluate.layer_cosine(h, tok, ["hello there", "a quiet evening"], "a", "b")
    assert len(diff) == 3 and abs(diff[0] - 1.0) < 1e-6 and diff[-1] < 0.999
    assert h.active is None


def test_cli_run_eval_similarity(tmp_path, tiny_dir, calib_files, cli):
    code, out, err = cli(
        "build",
        "--model",
        tiny_dir,
        "--out",
        tmp_path / "b",
        "--samples",
        "8",
        "--max-tokens",
        "48",
        *pair_args(calib_files),
        "--sparsity",
        "0.3",
    )
    assert code == 0, err
    code, out, err = cli(
        "run",
        tmp_path / "b",
        "--model",
        tiny_dir,
        "--prompt",
        "hi",
        "--compare",
        "--max-new-tokens",
        "5",
        "--no-chat",
        "--json",
    )
    assert code == 0, err
    assert set(json.loads(out)["outputs"]) == {"base", "introvert", "extrovert"}
    code, out, err = cli(
        "eval",
        tmp_path / "b",
        "--model",
        tiny_dir,
        "--mc",
        calib_files["mc"],
        "--template",
        "llama2",
        "--per-item",
        tmp_path / "items.jsonl",
        "--json",
    )
    assert code == 0, err
    doc = json.loads(out)
    rows = doc["rows"]
    assert doc["keys"] == {"introvert": "matching", "extrovert": "not_matching"}
    assert [(r["setting"], r["persona"]) for r in rows] == [
        ("base", "introvert"),
        ("base", "extrovert"),
        ("prompt", "introvert"),
        ("prompt", "extrovert"),
        ("mask", "introvert"),
        ("mask", "extrovert"),
        ("mask+prompt", "introvert"),
        ("mask+prompt", "extrovert"),
    ]
    for r in rows:
        for k in ("accuracy", "accuracy_norm"):
            lo, hi = r[f"{k}_ci95"]
            assert 0.0 <= lo <= r[k] <= hi <= 1.0
    lines = [json.loads(x) for x in (tmp_path / "items.jsonl").read_text().splitlines()]
    n = doc["items"]
    assert len(lines) == n * len(rows)
    mask_intro = [x for x in lines if (x["setting"], x["persona"]) == ("mask", "introvert")]
    assert sum(x["choice"] == x["key"] for x in mask_intro) / n == rows[4]["accuracy"]
    # an imported bundle has no pair roles: the key must be named, not guessed
    for p in ("introvert", "extrovert"):
        masks = tmp_path / "pt"
        masks.mkdir(exist_ok=True)
        b = open_bundle(tmp_path / "b")
        for m in b.modules:
            torch.save(torch.from_numpy(b.read_mask(p, m)), masks / f"M_{p}_{m}.pt")
    code, out, err = cli(
        "import-pt", tmp_path / "pt", "--out", tmp_path / "imp", "--model", tiny_dir
    )
    assert code == 0, err
    base = ["eval", tmp_path / "imp", "--model", tiny_dir, "--mc", calib_files["mc"]]
    code, out, err = cli(*base, "--no-chat")
    assert code == 2 and "--key PERSONA=matching" in err
    code, out, err = cli(*base, "--no-chat", "--key", "extrovert=not_matching", "--json")
    assert code == 0, err
    imported = json.loads(out)
    assert imported["keys"] == {"extrovert": "not_matching"}  # no recorded opposite
    code, out, err = cli(
        "eval", tmp_path / "b", "--model", tiny_dir, "--mc", calib_files["mc"], "--no-chat",
        "--json",
    )  # fmt: skip
    built = {(r["setting"], r["persona"]): r for r in json.loads(out)["rows"]}
    for r in imported["rows"]:  # the same bits, keyed the same way: the same answers
        assert r == built[(r["setting"], r["persona"])]
    code, out, err = cli(
        *base, "--per-item", tmp_path / "nowhere" / "x.jsonl", "--key", "introvert"
    )
    assert code == 2 and "does not exist" in err
    png = tmp_path / "sim.png"
    code, out, err = cli(
        "similarity",
        tmp_path / "b",
        "introvert",
        "extrovert",
        "--model",
        tiny_dir,
        "--texts",
        calib_files["introvert"],
        "--limit",
        "4",
        "--png",
        png,
        "--json",
    )
    assert code == 0, err
    assert len(json.loads(out)["layers"]) == 3 and png.read_bytes()[:4] == b"\x89PNG"
    code, out, err = cli(
        "run", tmp_path / "b", "--model", tiny_dir, "--prompt", "hi", "--persona", "nobody"
    )
    assert code == 2 and "known: extrovert, introvert" in err
    code, out, err = cli(
        "run", tmp_path / "b", "--model", tiny_dir, "--prompt", "hi", "--gamma", "2"
    )
    assert code == 2 and "gamma" in err


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_delta_switching_writes_the_gate_bit_for_bit(setup, dtype):
    """Any sequence of personas and gammas gives torch.mul(base, gate) exactly, and the base
    comes back bit for bit (signed zeros and NaN included); float32 and bfloat16 take the
    compiled kernel, float16 the generic path."""
    model, mods, masks, base, path = setup
    model.to(dtype)
    first = next(iter(mods.values()))
    with torch.no_grad():  # values a sloppy restore would lose: -0.0, NaN, inf
        first.weight[0, :3] = torch.tensor([-0.0, float("nan"), float("inf")], dtype=dtype)
    base = {n: m.weight.detach().clone() for n, m in mods.items()}
    h = maskstore.attach(model, path, check_weights=False)  # the weights were edited above
    seq = [("a", 0.0), ("b", 0.0), ("a", 0.3), ("a", 0.0), ("half", 0.7), (None, 0.0),
           ("b", 0.5), ("b", 0.25), ("half", 0.0), ("a", 1.0)]  # fmt: skip
    for p, g in seq:
        h.use(p, g)
        for n, m in mods.items():
            if p is None or n not in masks[p]:
                want = base[n]
            else:
                gate = torch.where(torch.from_numpy(masks[p][n]), 1.0, g).to(dtype)
                want = torch.mul(base[n], gate)
            same = _bits(m.weight) == _bits(want)
            assert (same | (m.weight.isnan() & want.isnan())).all(), (p, g, n)
    h.use(None)
    assert all(torch.equal(_bits(m.weight), _bits(base[n])) for n, m in mods.items())


def test_memory_grows_with_the_union_of_pruned_positions(setup, request):
    """The handle keeps base values only where some persona used so far prunes; none at all
    when they come back from the checkpoint the model was loaded from (then it holds the
    packed masks it caches, and nothing else)."""
    model, mods, masks, base, path = setup
    if request.node.callspec.params["setup"] == "checkpoint":
        h = maskstore.attach(model, path, cache_bytes=1 << 30)
        for p in ("half", "a", "b", None, "a"):
            h.use(p)
        packed = sum(h.bundle.read_packed(p, n).nbytes for p in ("half", "a", "b")
                     for n in h.bundle.persona_modules(p))  # fmt: skip
        assert h.memory_overhead() == h.cache_info().bytes == packed
        h.use(None)
        for n, m in mods.items():
            assert torch.equal(m.weight, base[n])
        h.detach()
        assert h.memory_overhead() == 0
        return
    h = maskstore.attach(model, path, cache_bytes=0)
    assert h.memory_overhead() == 0
    h.use("half")
    pruned = {n: ~masks["half"][n] for n in masks["half"]}
    packed = sum(((m.in_features + 7) // 8) * m.out_features for m in mods.values())
    vals = sum(int(p.sum()) * 4 for p in pruned.values())
    assert (
        vals
        < h.memory_overhead()
        <= vals + packed + 8 * sum(m.out_features + 1 for m in mods.values())
    )
    h.use("a")
    h.use("b")
    union = 0
    for n in mods:
        u = ~masks["a"][n] | ~masks["b"][n]
        if n in masks["half"]:
            u |= ~masks["half"][n]
        union += int(u.sum())
    total = sum(m.weight.numel() for m in mods.values()) * 4
    assert (
        union * 4
        < h.memory_overhead()
        <= 1.1 * union * 4 + packed + 8 * sum(m.out_features + 1 for m in mods.values())
    )
    assert h.memory_overhead() < 0.9 * total  # a full copy would be 100%
    h.detach()
    assert h.memory_overhead() == 0


def test_pristine_values_on_another_device(setup):
    model, mods, masks, base, path = setup
    h = maskstore.attach(model, path, pristine="cpu")
    h.use("a", 0.5)
    h.use("b")
    h.use(None)
    assert all(torch.equal(m.weight, base[n]) for n, m in mods.items())


def test_weights_are_checked_by_default(setup):
    """A bundle that records its model's weights refuses another float32 model unless asked,
    and warns (cannot tell) for a half-precision one."""
    model, mods, masks, base, path = setup
    other = tiny_llama(seed=9)
    with pytest.raises(MaskstoreError, match="check_weights=False"):
        maskstore.attach(other, path)
    maskstore.attach(other, path, check_weights=False).use("a")
    with pytest.warns(maskstore.runtime.WeightsWarning, match="bfloat16"):
        maskstore.attach(tiny_llama(seed=5).to(torch.bfloat16), path)
    with pytest.raises(MaskstoreError, match="weights differ"):
        maskstore.attach(tiny_llama(seed=5).to(torch.bfloat16), path, check_weights=True)


def test_weighted_combination_at_switch_time(setup):
    """use({"a": 0.7, "b": 0.3}) gives W0 * (0.7 G_a + 0.3 G_b); any switch after it and the
    base restore are exact."""
    model, mods, masks, base, path = setup
    h = maskstore.attach(model, path)
    h.use("half")
    h.use({"a": 0.7, "b": 0.3}, gamma=0.1)
    for n, m in mods.items():
        gate = torch.zeros(m.weight.shape)
        for p, wt in (("a", 0.7), ("b", 0.3)):
            gate += wt * torch.where(torch.from_numpy(masks[p][n]), 1.0, 0.1)
        assert torch.equal(m.weight, base[n] * gate), n
    assert h.active == {"a": 0.7, "b": 0.3}
    h.use("a")
    assert all(
        torch.equal(m.weight, base[n] * torch.from_numpy(masks["a"][n])) for n, m in mods.items()
    )
    h.use({"a": 0.5, "b": 0.5})
    h.use(None)
    assert all(torch.equal(m.weight, base[n]) for n, m in mods.items())
    for bad, phrase in (({"a": 0.7, "b": 0.7}, "sum to 1"), ({"zz": 1.0}, "unknown persona"),
                        ({"a": -1.0, "b": 2.0}, ">= 0"), ({}, "at least one")):  # fmt: skip
        with pytest.raises(MaskstoreError, match=phrase):
            h.use(bad)


def test_stored_blend_is_a_persona_with_provenance(setup, tmp_path, cli):
    """``blend`` stores the weighted combination as a persona: use("mix") equals
    use({"a": 0.7, "b": 0.3}) bit for bit, provenance pins the operands, the mask is their
    union, and the tools that need a binary mask refuse it in one line."""
    model, mods, masks, base, path = setup
    code, out, err = cli("blend", path, "a=0.7", "b=0.3", "--as", "mix", "--json")
    assert code == 0, err
    b = open_bundle(path)
    meta = b.persona("mix")
    assert meta["method"] == "blend" and meta["params"]["weights"] == {"a": 0.7, "b": 0.3}
    assert [o["digest"] for o in meta["provenance"]["operands"]] == [
        b.persona(p)["digest"] for p in ("a", "b")
    ]
    for n in mods:
        assert np.array_equal(b.read_mask("mix", n), masks["a"][n] | masks["b"][n])
    h = maskstore.attach(model, path)
    h.use({"a": 0.7, "b": 0.3}, gamma=0.1)
    want = {n: m.weight.clone() for n, m in mods.items()}
    h.use("a")
    h.use("mix", gamma=0.1)
    assert h.active == "mix"
    assert all(torch.equal(m.weight, want[n]) for n, m in mods.items())
    with pytest.raises(MaskstoreError, match="blend"):
        with h.mixed(["mix", "a"]):
            pass
    h.use(None)
    assert all(torch.equal(m.weight, base[n]) for n, m in mods.items())
    for args, phrase in (
        (("blend", path, "a=0.5", "b=0.6", "--as", "bad"), "sum to 1"),
        (("blend", path, "a", "--as", "bad"), "NAME=WEIGHT"),
        (("blend", path, "mix=1", "--as", "bad"), "itself a blend"),
        (("blend", path, "a=0.5", "a=0.25", "b=0.25", "--as", "bad"), "given twice"),
        (("export-pt", path, "--out", tmp_path / "pt", "--persona", "mix"), "soft gate"),
    ):
        code, out, err = cli(*args)
        assert code == 2 and phrase in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "pt").exists() and "bad" not in open_bundle(path).personas


def test_mixed_persona_batch_equals_each_persona_alone(setup):
    """Row i of one forward pass uses persona i: each row's logits equal running that persona
    on those rows alone (float32; equal to 1e-5, the other layers see a larger batch)."""
    model, mods, masks, base, path = setup
    h = maskstore.attach(model, path)
    h.use("half")
    ids = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(1))
    rows = ["a", None, "b", "a", "half"]
    with torch.no_grad(), h.mixed(rows):
        mixed = model(ids).logits
        assert h.active is None
        gen = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert h.active == "half"
    for p in ("a", None, "b", "half"):
        idx = [i for i, q in enumerate(rows) if q == p]
        with torch.no_grad(), h.persona(p):
            alone = model(ids[idx]).logits
            gen_alone = model.generate(
                ids[idx, :4], max_new_tokens=3, do_sample=False, pad_token_id=0
            )
        assert torch.allclose(mixed[idx], alone, atol=1e-5, rtol=1e-5), p
        assert torch.equal(gen[idx], gen_alone), p
    with pytest.raises(MaskstoreError, match="5 personas but the batch has 2 rows"):
        with torch.no_grad(), h.mixed(rows):
            model(ids[:2])
    assert all(m.forward.__func__ is type(m).forward for m in mods.values())
    h.use("half")
    with torch.no_grad(), h.mixed(rows, restore=False):  # left at base: no switch back
        pass
    assert h.active is None
    assert all(torch.equal(m.weight, base[n]) for n, m in mods.items())


def test_personas_of_other_bundles_in_run_similarity_and_export(
    tmp_path, tiny_dir, calib_files, cli
):
    """``OTHER_BUNDLE#NAME`` in run, similarity and export-model gives what one bundle holding
    both personas gives."""
    tiny = ("--model", tiny_dir, "--samples", "4", "--max-tokens", "16")
    both, one, two = tmp_path / "both.zarr", tmp_path / "one.zarr", tmp_path / "two.zarr"
    intro, extro = (f"{n}={calib_files[n]}" for n in ("introvert", "extrovert"))
    for out, personas in ((both, (intro, extro)), (one, (intro,)), (two, (extro,))):
        args = [a for p in personas for a in ("--persona", p)]
        assert cli("build", *tiny, *args, "--out", out)[0] == 0
    run = ("--model", tiny_dir, "--prompt", "hi", "--max-new-tokens", "3", "--compare", "--json")
    code, out, err = cli("run", one, "--persona", f"introvert,{two}#extrovert", *run)
    assert code == 0, err
    code, want, _ = cli("run", both, "--persona", "introvert,extrovert", *run)
    got, want = json.loads(out)["outputs"], json.loads(want)["outputs"]
    assert list(got) == ["base", "introvert", f"{two}#extrovert"]  # keyed as given
    assert list(got.values()) == list(want.values())
    sim = ("--model", tiny_dir, "--texts", calib_files["introvert"], "--limit", "2", "--json")
    code, out, err = cli("similarity", one, "introvert", f"{two}#extrovert", *sim)
    assert code == 0, err
    layers = json.loads(out)["layers"]
    assert (
        layers == json.loads(cli("similarity", both, "introvert", "extrovert", *sim)[1])["layers"]
    )
    assert min(layers) < 0.9999  # the two masks really differ, so the copies were applied
    code, out, err = cli("export-model", one, f"{two}#extrovert", "--model", tiny_dir,
                         "--out", tmp_path / "ckpt", "--json")  # fmt: skip
    assert code == 0 and json.loads(out)["persona"] == "extrovert", err
    code, out, err = cli("run", one, "--persona", f"{two}#nobody", "--prompt", "hi")
    assert code == 2 and "unknown persona 'nobody'" in err


def test_one_live_handle_per_model_and_none_after_detach(setup):
    """A second attach names the live handle; a detached handle refuses every switch; a handle
    dropped with a persona on makes attach say so instead of advising --no-check-weights."""
    model, mods, masks, base, path = setup
    h = maskstore.attach(model, path)
    h.use("a")
    with pytest.raises(MaskstoreError, match=r"already has a live handle \(MaskHandle\(active='a'"):
        maskstore.attach(model, path)
    h.detach()
    h.detach()  # twice is harmless
    for call in (
        lambda: h.use("a"),
        lambda: h.use(None),
        lambda: h.read_masks("a"),
        lambda: h.persona("a").__enter__(),
        lambda: h.mixed(["a"]).__enter__(),
    ):
        with pytest.raises(MaskstoreError, match="detached"):
            call()
    assert all(torch.equal(m.weight, base[n]) for n, m in mods.items())
    h2 = maskstore.attach(model, path)  # detached: the model is free again
    h2.use("b")
    del h2  # dropped without detach(): the weights still hold "b"
    import gc

    gc.collect()
    with pytest.raises(MaskstoreError, match="hold persona 'b'") as e:
        maskstore.attach(model, path)
    assert "no-check-weights" not in str(e.value)


def test_mixed_blocks_refuse_nesting_and_bad_rows(setup):
    model, mods, masks, base, path = setup
    h = maskstore.attach(model, path)
    h.use("b")
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), h.mixed(["a", None]):
        for call in (lambda: h.mixed(["a"]).__enter__(), lambda: h.use("a"), h.detach):
            with pytest.raises(MaskstoreError, match="mixed"):
                call()
        out = model(ids).logits  # the outer block still works after the refusals
    assert h.active == "b"
    assert all(m.forward.__func__ is type(m).forward for m in mods.values())
    with torch.no_grad(), h.persona("a"):
        assert torch.allclose(out[0], model(ids[:1]).logits[0], atol=1e-5)
    for bad in ([["a"], None], [], ["a", 3]):
        with pytest.raises(MaskstoreError, match="one persona name"):
            h.mixed(bad).__enter__()
    assert h.active == "b"


def test_regroup_lets_rows_leave_and_join_a_mixed_batch(setup):
    """Rows leave a mixed batch, and rows of a persona new to the block join it: each row
    still equals its persona alone; an unknown persona or a blend is refused in one line."""
    model, mods, masks, base, path = setup
    h = maskstore.attach(model, path)
    ids = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), h.mixed(["a", "b", None]):
        h.regroup(["b", None])  # row 0 left
        got = model(ids[1:]).logits
        h.regroup(["half", "b", None], masks={"half": h.read_masks("half")})  # joined
        joined = model(ids).logits
        with pytest.raises(MaskstoreError, match="unknown persona 'nobody'"):
            h.regroup(["nobody"])
        with pytest.raises(MaskstoreError, match="one persona name"):
            h.regroup([])
    with pytest.raises(MaskstoreError, match="inside a mixed"):
        h.regroup(["a"])
    for i, p in enumerate(("b", None)):
        with torch.no_grad(), h.persona(p):
            assert torch.allclose(got[i], model(ids[1 + i : 2 + i]).logits[0], atol=1e-5)
    for i, p in enumerate(("half", "b", None)):
        with torch.no_grad(), h.persona(p):
            assert torch.allclose(joined[i], model(ids[i : i + 1]).logits[0], atol=1e-5), p
    assert all(torch.equal(m.weight, base[n]) for n, m in mods.items())


def test_threads_switching_while_another_generates(setup):
    """Two threads switching personas while a third generates inside ``persona`` blocks: every
    generation equals the same generation run alone (the lock keeps switches out of a block)."""
    import threading

    model, mods, masks, base, path = setup
    h = maskstore.attach(model, path)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))

    def gen() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)

    want = {}
    for p in ("a", "b"):
        with h.persona(p):
            want[p] = gen()
    assert not torch.equal(want["a"], want["b"])
    stop, errors, got = threading.Event(), [], []

    def switcher(p: str) -> None:
        while not stop.is_set():
            try:
                h.use(p)
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

    threads = [threading.Thread(target=switcher, args=(p,)) for p in ("a", "b")]
    for t in threads:
        t.start()
    try:
        for i in range(6):
            p = "ab"[i % 2]
            with h.persona(p):
                got.append((p, gen()))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert all(torch.equal(out, want[p]) for p, out in got)
    h.use(None)
    assert all(torch.equal(m.weight, base[n]) for n, m in mods.items())


def test_the_recorded_model_is_the_default(tmp_path, tiny_dir, calib_files, cli, monkeypatch):
    """A bundle built with ``--model DIR`` runs, evaluates and exports without ``--model``;
    the command says which model it loaded, and a wrong model's error names the recorded one."""
    out = tmp_path / "b.zarr"
    code, _, err = cli("build", "--model", tiny_dir, "--samples", "2", "--max-tokens", "16",
                       "--persona", f"introvert={calib_files['introvert']}", "--out", out)  # fmt: skip
    assert code == 0, err
    code, got, err = cli("run", out, "--persona", "introvert", "--prompt", "hi",
                         "--max-new-tokens", "3", "--json")  # fmt: skip
    assert code == 0, err
    code, _, err = cli("run", out, "--persona", "introvert", "--prompt", "hi",
                       "--max-new-tokens", "3")  # fmt: skip
    assert code == 0 and f"model: {tiny_dir}" in err, err
    _, want, _ = cli("run", out, "--persona", "introvert", "--prompt", "hi",
                     "--max-new-tokens", "3", "--json", "--model", tiny_dir)  # fmt: skip
    assert json.loads(got)["outputs"] == json.loads(want)["outputs"]
    code, _, err = cli("export-model", out, "introvert", "--out", tmp_path / "ckpt")
    assert code == 0, err
    other = tmp_path / "other"
    from _tiny import save_tiny

    save_tiny(other, seed=1, hidden=32, intermediate=40)
    code, _, err = cli("run", out, "--persona", "introvert", "--prompt", "hi", "--model", other)
    assert code == 2 and f"the bundle was built on {tiny_dir}" in err, err
    moved = tmp_path / "moved"
    tiny_dir.rename(moved)
    try:
        code, _, err = cli("run", out, "--persona", "introvert", "--prompt", "hi")
        assert code == 2 and "which is not here" in err and "--model" in err, err
    finally:
        moved.rename(tiny_dir)


def test_prepare_copies_weights_once_and_changes_nothing(setup, request):
    model, mods, masks, base, path = setup
    h = maskstore.attach(model, path)
    h.prepare()
    ptrs = {n: m.weight.data_ptr() for n, m in mods.items()}
    assert all(torch.equal(m.weight, base[n]) for n, m in mods.items())
    from_file = request.node.callspec.params["setup"] == "checkpoint"
    assert h.memory_overhead() == (0 if from_file else sum(
        m.out_features * ((m.in_features + 7) // 8) + (m.out_features + 1) * 8
        for m in mods.values()
    ))  # fmt: skip  # positions bitmaps and offsets only: no value stored yet (none at all
    # when base values come back from the checkpoint)
    h.use("a")
    assert all(m.weight.data_ptr() == ptrs[n] for n, m in mods.items())  # no second copy
    h.use(None)
    assert all(torch.equal(m.weight, base[n]) for n, m in mods.items())
    h.detach()
    with pytest.raises(MaskstoreError, match="detached"):
        h.prepare()


def test_a_blend_never_follows_a_replaced_operand(setup, cli):
    """Replace an operand of a stored blend: ``use`` refuses the blend (it would apply the new
    operand, not the one recorded) and ``verify`` names it; blending again fixes both."""
    model, mods, masks, base, path = setup
    assert cli("blend", path, "a=0.5", "b=0.5", "--as", "mix")[0] == 0
    h = maskstore.attach(model, path)
    h.use("mix")
    h.detach()
    code, _, err = cli("complement", path, "b", "--as", "a", "--force")  # "a" replaced
    assert code == 0, err
    h = maskstore.attach(model, path)
    with pytest.raises(MaskstoreError, match="made from another 'a'"):
        h.use("mix")
    assert all(torch.equal(m.weight, base[n]) for n, m in mods.items())  # nothing applied
    code, _, err = cli("verify", path)
    assert code == 1 and "blend 'mix'" in err
    assert cli("blend", path, "a=0.5", "b=0.5", "--as", "mix", "--force")[0] == 0
    h.detach()
    maskstore.attach(model, path).use("mix")
    assert cli("verify", path)[0] == 0


def test_recorded_model_names_resolve(tmp_path, tiny_dir):
    from maskstore.models import DEFAULT_MODEL, recorded_model

    assert recorded_model({"model": f"embedded:{DEFAULT_MODEL}"}) == (None, None)  # build's way
    assert recorded_model({"model": f"/elsewhere/models/{DEFAULT_MODEL}"}) == (None, None)
    assert recorded_model(None) == (None, None)
    assert recorded_model({"model": str(tiny_dir)}) == (str(tiny_dir), None)
    assert recorded_model({"model": "x"}, "given") == ("given", None)
    with pytest.raises(MaskstoreError, match="not here"):
        recorded_model({"model": str(tmp_path / "gone")})


def test_mcnemar_exact_and_the_small_sample_warning(tmp_path, tiny_dir, calib_files, cli):
    from maskstore.compare.evaluate import mcnemar_exact, min_p_value

    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(5, 5) == 1.0
    assert min_p_value(5) >= 0.05 > min_p_value(6)
    b = tmp_path / "b.zarr"
    assert cli("build", "--model", tiny_dir, "--samples", "4", "--max-tokens", "16",
               *pair_args(calib_files), "--out", b)[0] == 0  # fmt: skip
    mc = tmp_path / "mc.csv"
    mc.write_text("".join(calib_files["mc"].read_text().splitlines(keepends=True)[:5]))  # 4 items
    code, out, err = cli("eval", b, "--mc", mc, "--template", "none", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["items"] == 4 and doc["min_p"] == pytest.approx(2 / 16)
    assert doc["system_prompts"]["prompt:introvert"].startswith("You are an introvert")
    for r in doc["rows"]:
        if r["setting"] == "base":
            assert r["delta_vs_base"] == 0 and r["p_vs_base"] == 1.0
        assert 0 <= r["p_vs_base"] <= 1
    code, out, err = cli(
        "eval", b, "--mc", mc, "--template", "none", "--system-prompt", "Be brief."
    )
    assert code == 0 and "no difference can be significant" in out and "'Be brief.'" in out


def test_eval_scores_personas_of_several_bundles(tmp_path, tiny_dir, calib_files, cli):
    """eval --persona OTHER_BUNDLE#NAME: personas of another bundle of the same model scored
    in the same run, as they score in their own bundle."""
    tiny = ("--model", tiny_dir, "--samples", "4", "--max-tokens", "16")
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert cli("build", *tiny, *pair_args(calib_files), "--out", a)[0] == 0
    assert cli("build", *tiny, "--persona", f"calm={calib_files['introvert']}",
               "--out", b)[0] == 0  # fmt: skip
    mc = calib_files["mc"]
    common = ("--mc", mc, "--template", "none", "--json")
    code, out, err = cli("eval", a, "--persona", "introvert", "--persona", f"{b}#calm",
                         "--key", "introvert=matching", "--key", f"{b}#calm=matching", *common)  # fmt: skip
    assert code == 0, err
    rows = {(r["setting"], r["persona"]): r for r in json.loads(out)["rows"]}
    assert ("mask", f"{b}#calm") in rows and ("mask", "introvert") in rows
    code, alone, err = cli("eval", b, "--key", "calm=matching", *common)
    assert code == 0, err
    want = {(r["setting"], r["persona"]): r for r in json.loads(alone)["rows"]}
    for setting in ("base", "prompt", "mask", "mask+prompt"):
        got, ref = rows[setting, f"{b}#calm"], want[setting, "calm"]
        assert got["accuracy"] == ref["accuracy"] and got["p_vs_base"] == ref["p_vs_base"]


def test_eval_prompt_rows_use_the_persona_name_not_a_gathered_label(tmp_path, tiny_dir,
                                                                    calib_files, cli):  # fmt: skip
    """Two bundles each holding an ``introvert``: the other bundle's one is gathered under an
    internal label, but its prompt rows' system prompt names the persona as the user did."""
    from maskstore.compare.evaluate import describe

    tiny = ("--model", tiny_dir, "--samples", "4", "--max-tokens", "16")
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    for out, src in ((a, "introvert"), (b, "extrovert")):
        assert cli("build", *tiny, "--persona", f"introvert={calib_files[src]}",
                   "--out", out)[0] == 0  # fmt: skip
    code, out, err = cli("eval", a, "--persona", "introvert", "--persona", f"{b}#introvert",
                         "--key", "introvert=matching", "--key", f"{b}#introvert=matching",
                         "--mc", calib_files["mc"], "--template", "none", "--json")  # fmt: skip
    assert code == 0, err
    prompts = json.loads(out)["system_prompts"]
    assert prompts[f"prompt:{b}#introvert"] == describe("introvert")
    assert prompts["prompt:introvert"] == describe("introvert")
    # the table at 80 columns (as users read it): no line past 80, every figure whole
    code, table, err = cli("eval", a, "--persona", "introvert", "--persona", f"{b}#introvert",
                           "--key", "introvert=matching", "--key", f"{b}#introvert=matching",
                           "--mc", calib_files["mc"], "--template", "none", columns=80)  # fmt: skip
    assert code == 0, err
    lines = table.splitlines()
    assert max(map(len, lines)) <= 80, [ln for ln in lines if len(ln) > 80]
    cells = " ".join(lines).split()
    for row in json.loads(out)["rows"]:
        lo, hi = row["accuracy_ci95"]
        for figure in (
            f"{row['accuracy']:.3f}",
            f"{lo:.2f}-{hi:.2f}",
            f"{row['accuracy_norm']:.3f}",
        ):
            assert figure in cells, (figure, table)
        if row["setting"] != "base":
            assert f"{row['delta_vs_base']:+.3f}" in cells and f"{row['p_vs_base']:.3f}" in cells
        if row["items_needed"] is not None:  # a difference that is not significant says so
            assert f"needs about {row['items_needed']} items" in " ".join(cells)


@pytest.mark.parametrize(("b", "c", "n"), [(2, 0, 12), (0, 3, 12), (3, 1, 20), (5, 2, 12),
                                           (1, 0, 7), (7, 3, 40), (40, 30, 100)])  # fmt: skip
def test_items_needed_is_the_fewest_items_a_difference_that_size_needs(b, c, n):
    from maskstore.compare.evaluate import items_needed, mcnemar_exact

    def p_at(m):
        return mcnemar_exact(round(b * m / n), round(c * m / n))

    want = next(m for m in range(n, 20_000) if p_at(m) < 0.05)  # a plain scan
    assert items_needed(b, c, n) == want
    assert p_at(want) < 0.05 <= p_at(want - 1)


def test_items_needed_is_none_where_no_count_helps():
    from maskstore.compare.evaluate import items_needed

    assert items_needed(0, 0, 12) is None  # no difference
    assert items_needed(3, 3, 12) is None
    assert items_needed(9, 0, 12) is None  # already p < 0.05
    assert items_needed(1, 0, 0) is None
    assert items_needed(501, 500, 1001) is None  # past the cap


def test_a_hub_cache_ref_naming_a_path_outside_is_refused(tmp_path, tiny_dir, monkeypatch):
    """A cached Hub id whose refs/main names a snapshot that leads out of the cache is not
    followed (a legitimate entry loads)."""
    import shutil

    from maskstore.models import model_folder

    cache = tmp_path / "hub"
    entry = cache / "models--org--tiny"
    snap = entry / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_dir, snap)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert model_folder("org/tiny").resolve() == snap.resolve()
    outside = tmp_path / "outside"
    shutil.copytree(tiny_dir, outside)
    (entry / "snapshots" / ("b" * 40)).symlink_to(outside, target_is_directory=True)
    (entry / "refs" / "main").write_text("b" * 40)  # a snapshot that is a link out of the cache
    with pytest.raises(MaskstoreError, match="points outside its snapshots folder"):
        model_folder("org/tiny")


def test_model_options_are_shared_by_the_commands_that_load_a_model(tmp_path, tiny_dir,
                                                                    calib_files, cli):  # fmt: skip
    """run, eval and similarity take --revision and --dtype as build does."""
    b = tmp_path / "b.zarr"
    assert cli("build", "--model", tiny_dir, "--samples", "2", "--max-tokens", "16",
               *pair_args(calib_files), "--out", b)[0] == 0  # fmt: skip
    code, out, err = cli("run", b, "--persona", "introvert", "--prompt", "hi",
                         "--max-new-tokens", "2", "--dtype", "bfloat16", "--json")  # fmt: skip
    assert code == 0 and "do not hash as at build time" in err, err  # half precision: a warning
    code, _, err = cli("similarity", b, "introvert", "extrovert", "--texts",
                       calib_files["introvert"], "--limit", "1", "--dtype", "float64")  # fmt: skip
    assert code == 2 and "float64" in err
    for command in ("run", "eval", "similarity", "export-model", "build", "serve"):
        code, out, _ = cli(command, "--help")
        assert "--revision" in out, command


def test_an_attached_model_stays_deep_copyable(setup):
    import copy

    model, mods, masks, base, path = setup
    h = maskstore.attach(model, path)
    h.use("a")
    clone = copy.deepcopy(model)  # nothing maskstore keeps lives on the model
    n = next(iter(mods))
    assert torch.equal(dict(clone.named_modules())[n].weight, mods[n].weight)
    h2 = maskstore.attach(clone, path, check_weights=False)  # a copy is another model
    h2.detach()
    h.detach()


def _bundle_for(model, path, rng):
    mods = maskable_modules(model)
    with create_bundle(path, model_fingerprint(model, mods, hash_weights=True)) as b:
        for p in ("a", "b"):
            with b.persona_writer(p, method="t") as w:
                for n, m in mods.items():
                    w.write_mask(n, rng.random((m.out_features, m.in_features)) < 0.6)
    return path


@pytest.mark.parametrize("first_gamma", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_base_values_from_the_checkpoint_are_bit_for_bit(tmp_path, rng, dtype, first_gamma):
    """A model loaded from safetensors: its handle stores no base value (they come back from
    the file, memory-mapped; the first switch gates each weight on its way out of the map) and
    every weight, gated or restored, has the bits of a handle that stores them in RAM, in each
    dtype, through gammas, a blend and back to base."""
    model, _ = _loaded(tmp_path, dtype)
    twin, _ = _loaded(tmp_path / "twin", dtype)
    path = _bundle_for(model, tmp_path / "b.zarr", rng)
    base = {n: m.weight.detach().clone() for n, m in maskable_modules(model).items()}
    h = maskstore.attach(model, path)
    ref = maskstore.attach(twin, path, base="memory")
    steps = [("a", first_gamma), ("b", 0.0), ("b", 0.3), ("a", 0.3),
             ({"a": 0.5, "b": 0.5}, 0.1), ("b", 0.0), (None, 0.0), ("a", 0.7),
             (None, 0.0)]  # fmt: skip
    mods, tmods = maskable_modules(model), maskable_modules(twin)
    for persona, gamma in steps:
        h.use(persona, gamma)
        ref.use(persona, gamma)
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        for n in mods:
            got, want = mods[n].weight.detach(), tmods[n].weight.detach()
            assert torch.equal(got.view(bits), want.view(bits)), (persona, n)
    assert h.memory_overhead() == h.cache_info().bytes  # packed masks only
    assert ref.memory_overhead() > ref.cache_info().bytes + sum(v.numel() for v in base.values())
    for n, m in mods.items():
        assert torch.equal(m.weight, base[n])
        assert torch.equal(h.base_weight(n), base[n])


def test_weights_changed_after_loading_are_stored_not_read_from_the_file(tmp_path, rng):
    """Weights edited in memory after loading no longer equal the checkpoint: their base
    values are stored in RAM (the edits come back, not the file's values); a model loaded in
    another dtype than its file, likewise."""
    model, folder = _loaded(tmp_path)
    path = _bundle_for(model, tmp_path / "b.zarr", rng)
    mods = maskable_modules(model)
    edited = next(iter(mods))
    with torch.no_grad():
        mods[edited].weight[0, 0] += 1.0
    base = {n: m.weight.detach().clone() for n, m in mods.items()}
    h = maskstore.attach(model, path, check_weights=False)
    h.use("a")
    h.use("b")
    assert h.memory_overhead() > h.cache_info().bytes  # some base values are stored
    h.use(None)
    for n, m in mods.items():
        assert torch.equal(m.weight, base[n]), n
    h.detach()

    from transformers import AutoModelForCausalLM

    half = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    hb = maskstore.attach(half, path, check_weights=False)
    before = {n: m.weight.detach().clone() for n, m in maskable_modules(half).items()}
    hb.use("a")
    assert hb.memory_overhead() > hb.cache_info().bytes
    hb.use(None)
    assert all(torch.equal(m.weight, before[n]) for n, m in maskable_modules(half).items())


def test_a_checkpoint_named_by_hand_is_checked(tmp_path, rng):
    """``base=FOLDER``: a folder that is not a checkpoint, one whose weights file is a FIFO
    (nothing would ever write it), are one clear error each, at once; one whose weights
    differ from the live model's is compared and not trusted (base values stored)."""
    import os

    model, folder = _loaded(tmp_path)
    path = _bundle_for(model, tmp_path / "b.zarr", rng)
    with pytest.raises(MaskstoreError, match="no .safetensors"):
        maskstore.attach(model, path, base=tmp_path / "empty")
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "model.safetensors")
    with pytest.raises(MaskstoreError, match="not a regular file"):
        maskstore.attach(model, path, base=fifo)
    other, other_folder = _loaded(tmp_path / "other", seed=9)  # same shapes, other values
    base = {n: m.weight.detach().clone() for n, m in maskable_modules(model).items()}
    h = maskstore.attach(model, path, base=other_folder)
    h.use("a")
    assert h.memory_overhead() > h.cache_info().bytes
    h.use(None)
    assert all(torch.equal(m.weight, base[n]) for n, m in maskable_modules(model).items())


def test_a_checkpoint_rewritten_under_the_handle_is_refused_before_any_write(tmp_path, rng):
    """The safetensors file that base values come back from, rewritten in place (same size,
    other bytes) while attached: the next switch, base_weight and detach refuse in one line
    before touching a weight (the map would return the new bytes, or fault if shorter)."""
    import os

    model, folder = _loaded(tmp_path)
    path = _bundle_for(model, tmp_path / "b.zarr", rng)
    h = maskstore.attach(model, path)
    h.use("a")
    mods = maskable_modules(model)
    before = {n: m.weight.detach().clone() for n, m in mods.items()}
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # the last weight's bytes change, the size does not
    st = f.stat()
    with open(f, "r+b") as fh:  # in place, as a careless re-save would
        fh.write(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    name = next(iter(mods))
    for call in (lambda: h.use("b"), lambda: h.use(None), lambda: h.base_weight(name), h.detach):
        with pytest.raises(MaskstoreError, match="changed on disk"):
            call()
    assert all(torch.equal(m.weight, before[n]) for n, m in mods.items())
    assert h.active == "a" and not h.detached


def test_compare_answers_each_persona_in_order_and_leaves_the_base(setup):
    """``evaluate.compare`` (what ``run --compare`` prints): one greedy answer a persona, in
    the order asked, each the answer that persona gives alone; the base weights after; a bad
    prompt or token count refused before any switch."""
    model, mods, masks, base, path = setup
    tok = byte_tokenizer()
    h = maskstore.attach(model, path)
    got = evaluate.compare(h, tok, "hello", [None, "a", "b"], max_new_tokens=5, chat=False)
    assert [p for p, _ in got] == [None, "a", "b"]
    for p, text in got:
        h.use(p)
        assert text == evaluate.generate(h, tok, "hello", 5, chat=False)
    h.use(None)
    assert all(torch.equal(m.weight, base[n]) for n, m in mods.items())
    assert h.active is None
    h.use("a")
    for bad in ({"prompt": " "}, {"max_new_tokens": 0}):
        with pytest.raises(MaskstoreError, match="`"):
            evaluate.compare(h, tok, **{"prompt": "hi", "personas": ["b"], **bad})
    assert h.active == "a"  # refused before any switch
    assert evaluate.compared_personas(open_bundle(path)) == ["a", "b", "half"]


def test_a_first_blend_looks_at_the_process_maps_once(tmp_path, rng, monkeypatch):
    """A blend as the first switch privatises every weight in one pass (one read of the
    process's memory maps), not one module at a time."""
    from maskstore.checkpoint import Checkpoint

    model, _ = _loaded(tmp_path)
    path = _bundle_for(model, tmp_path / "b.zarr", rng)
    calls = []
    real = Checkpoint.untouched
    monkeypatch.setattr(
        Checkpoint, "untouched", lambda self, t: calls.append(len(t)) or real(self, t)
    )
    h = maskstore.attach(model, path)
    h.use({"a": 0.5, "b": 0.5}, 0.2)
    assert calls == [len(h.modules)]
    assert h.memory_overhead() == 0  # read back from the file: nothing stored


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_rows_match_use_in_each_dtype_and_not_their_batch_mates(tmp_path, rng, dtype):
    """float32 and bfloat16 take the fused kernel (no weight copies) and a row's outputs are
    bit for bit those it gets alone; float16 takes gated copies. Every row matches its
    persona switched in place."""
    model = tiny_llama(seed=6).to(dtype)
    mods = maskable_modules(model)
    with create_bundle(tmp_path / "b", model_fingerprint(model, mods, hash_weights=True)) as b:
        for p in ("a", "b"):
            with b.persona_writer(p, method="t") as w:
                for n, m in mods.items():
                    w.write_mask(n, rng.random((m.out_features, m.in_features)) < 0.5)
    h = maskstore.attach(model, tmp_path / "b")
    rows = ["a", None, "b", "a", "b"]
    ids = torch.randint(0, 256, (5, 7), generator=torch.Generator().manual_seed(2))
    name, mod = list(mods.items())[-1]  # a down projection: in not a multiple of 16
    x = torch.randn(5, 3, mod.in_features, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad(), h.mixed(rows):
        assert h.fused_mixing == h._mix.fused == (dtype != torch.float16)
        assert not any(h._mix.gated[n] for n in mods) or dtype == torch.float16
        y = mod(x)
        logits = model(ids).logits.float()
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    for i, p in enumerate(rows):
        with torch.no_grad(), h.mixed([p]):
            alone = mod(x[i : i + 1])[0]
        if dtype != torch.float16:
            assert torch.equal(alone, y[i]), (p, i)
        with torch.no_grad(), h.persona(p):
            want = model(ids[i : i + 1]).logits.float()[0]
            assert torch.allclose(mod(x[i : i + 1])[0].float(), y[i].float(), atol=tol, rtol=tol)
        assert torch.allclose(logits[i], want, atol=tol, rtol=tol), (
            p,
            (logits[i] - want).abs().max(),
        )


def test_eval_reads_pair_roles_in_each_personas_own_bundle(tmp_path, tiny_dir, calib_files, cli):
    """Personas of two bundles that each record an introvert/extrovert pair: both pairs are
    keyed, each by its own bundle (the other bundle's pair was ignored, 'not scored' after the
    compute); a --key names its personas and no others (it dropped the main bundle's pair); a
    named persona left without a key is refused before any model loads."""
    tiny = ("--model", tiny_dir, "--samples", "4", "--max-tokens", "16")
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    for out in (a, b):
        assert cli("build", *tiny, *pair_args(calib_files), "--out", out)[0] == 0
    c = tmp_path / "c.zarr"  # a persona with no pair
    assert cli("build", *tiny, "--persona", f"calm={calib_files['introvert']}", "--out", c)[0] == 0
    common = ("--mc", calib_files["mc"], "--template", "none", "--json", "--model", tiny_dir)
    four = ("--persona", "introvert", "--persona", "extrovert", "--persona", f"{b}#introvert",
            "--persona", f"{b}#extrovert")  # fmt: skip
    code, out, err = cli("eval", a, *four, *common)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["keys"] == {"introvert": "matching", "extrovert": "not_matching",
                           f"{b}#introvert": "matching", f"{b}#extrovert": "not_matching"}  # fmt: skip
    assert doc["unkeyed"] == []
    code, out, err = cli("eval", a, *four, "--key", f"{b}#introvert=not_matching", *common)
    assert code == 0, err
    keys = json.loads(out)["keys"]
    assert keys["introvert"] == "matching" and keys["extrovert"] == "not_matching"
    assert keys[f"{b}#introvert"] == "not_matching" and keys[f"{b}#extrovert"] == "matching"
    code, _, err = cli("eval", a, *four[:4], "--persona", f"{c}#calm", *common)
    assert code == 2 and f"no key for {c}#calm" in err and len(err.strip().splitlines()) == 1
    assert "evaluating" not in err  # refused before the model loaded and ran
