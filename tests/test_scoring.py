"""Every method against a plain, obviously-correct loop over rows on small shapes."""

import math

import numpy as np
import pytest
import torch

from maskstore.build import scoring
from maskstore.errors import MaskstoreError
from maskstore.store.stats import ChannelStats


def _stats(rng, n, samples=6, tokens=5):
    st = ChannelStats.zeros(n)
    for _ in range(samples):
        x = rng.normal(size=(tokens, n)) * rng.random(n)
        st.add_batch(x.sum(0), (x**2).sum(0), np.sqrt((x**2).sum(0))[None], tokens)
    return st


def _naive_keep(scores: list[list[float]], k: int) -> list[list[bool]]:
    """Per row: sort (score desc, index asc), keep the first k."""
    out = []
    for row in scores:
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        keep = set(order[:k])
        out.append([j in keep for j in range(len(row))])
    return out


@pytest.mark.parametrize("shape", [(7, 13), (5, 16), (1, 1), (3, 9)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_wanda_matches_loop(rng, shape, sparsity):
    w = torch.from_numpy(rng.normal(size=shape)).float()
    st = _stats(rng, shape[1])
    s = scoring.wanda_scores(w, st)
    for i in range(shape[0]):
        for j in range(shape[1]):
            assert s[i, j].item() == pytest.approx(
                abs(w[i, j].item()) * math.sqrt(st.sumsq[j]), rel=1e-6
            )
    k = int(shape[1] * (1 - sparsity))
    got = scoring.select(s, sparsity).tolist()
    assert got == _naive_keep(s.tolist(), k)


def test_ties_go_to_lowest_index():
    s = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    m = scoring.topk_mask(s, 2)
    assert m.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    nan = torch.tensor([[float("nan"), 1.0, 0.0]])
    assert scoring.topk_mask(nan, 2).tolist() == [[False, True, True]]


def _reference_keep(s: np.ndarray, k: int) -> np.ndarray:
    """Stable sort by descending score (NaN as -inf): equal scores keep index order."""
    s = np.where(np.isnan(s), -np.inf, s.astype(np.float64))
    order = np.argsort(-s, axis=1, kind="stable")
    keep = np.zeros(s.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :k], True, axis=1)
    return keep


def _hard_scores(rng, shape, kind: str) -> np.ndarray:
    if kind == "normal":  # negative values too
        return rng.normal(size=shape).astype(np.float32)
    if kind == "ties":  # few distinct values: long runs of ties at the threshold
        return rng.integers(0, 4, size=shape).astype(np.float32)
    if kind == "wide":  # magnitudes over many octaves, like |W| * ||X||
        return (np.abs(rng.normal(size=shape)) * 10.0 ** rng.uniform(-30, 30, size=shape)).astype(
            np.float32
        )
    s = rng.normal(size=shape).astype(np.float32)  # special values sprinkled in
    specials = np.array([np.nan, -np.inf, np.inf, -0.0, 0.0, 1e-45, -1e-45], dtype=np.float32)
    pick = rng.random(shape) < 0.2
    s[pick] = rng.choice(specials, size=int(pick.sum()))
    return s


@pytest.mark.parametrize(
    "shape", [(3, 5), (40, 20), (64, 576), (4, 3000), (1, 200_000), (300, 300)]
)
@pytest.mark.parametrize("kind", ["normal", "ties", "wide", "specials"])
def test_compiled_selection_matches_sort_and_torch_path(rng, shape, kind):
    """The CPU kernel (float32) and the kthvalue path (float64, as on GPU) give the reference bits."""
    s = _hard_scores(rng, shape, kind)
    for k in sorted({1, shape[1] // 3, shape[1] // 2, shape[1] - 1} - {0}):
        want = _reference_keep(s, k)
        kernel = scoring.topk_mask(torch.from_numpy(s), k).numpy()
        generic = scoring.topk_mask(torch.from_numpy(s).double(), k).numpy()
        assert (kernel == want).all(), (kind, shape, k)
        assert (generic == want).all(), (kind, shape, k)


def _reference_keep_tie(s: np.ndarray, tie: np.ndarray, k: int) -> np.ndarray:
    """Sort by (score desc, tie desc, index asc), NaN as -inf in both."""
    s = np.where(np.isnan(s), -np.inf, s.astype(np.float64))
    tie = np.where(np.isnan(tie), -np.inf, tie.astype(np.float64))
    keep = np.zeros(s.shape, dtype=bool)
    for i in range(s.shape[0]):
        order = np.lexsort((np.arange(s.shape[1]), -tie[i], -s[i]))
        keep[i, order[:k]] = True
    return keep


@pytest.mark.parametrize("shape", [(3, 5), (40, 20), (64, 576), (300, 300)])
@pytest.mark.parametrize("kind", ["ties", "specials"])
def test_tie_break_by_second_score_kernel_and_torch_path(rng, shape, kind):
    """Exact ties go to the larger second score, then the lower index, on both paths."""
    s = _hard_scores(rng, shape, kind)
    tie = _hard_scores(rng, shape, "ties" if kind == "specials" else "specials")
    for k in sorted({1, shape[1] // 3, shape[1] // 2, shape[1] - 1} - {0}):
        want = _reference_keep_tie(s, tie, k)
        t32 = torch.from_numpy(tie)
        kernel = scoring.topk_mask(torch.from_numpy(s), k, t32).numpy()
        generic = scoring.topk_mask(torch.from_numpy(s).double(), k, t32.double()).numpy()
        assert (kernel == want).all(), (kind, shape, k)
        assert (generic == want).all(), (kind, shape, k)
        if kind == "ties":  # the second score decides: without it, the index does
            assert (scoring.topk_mask(torch.from_numpy(s), k).numpy() != want).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_tie_factor_equals_materialised(rng, dtype):
    w = torch.from_numpy(rng.normal(size=(64, 96))).to(dtype)
    f = rng.random(96)
    f[rng.random(96) < 0.5] = 0.0  # half the columns tie at zero, like relu(z)
    tf = rng.random(96) + 0.1
    scores = w.float().abs() * torch.from_numpy(f.astype(np.float32))
    tie = w.float().abs() * torch.from_numpy(tf.astype(np.float32))
    for sparsity in (0.3, 0.5):
        want = _reference_keep_tie(scores.numpy(), tie.numpy(), scoring.keep_count(96, sparsity))
        got = scoring.select_fused(w, f, sparsity, tie_factor=tf).numpy()
        assert (got == want).all()
        assert torch.equal(
            scoring.select_fused(w, f, sparsity, mode="layer", tie_factor=tf),
            scoring.select(scores, sparsity, mode="layer", tie=tie),
        )


def test_keep_count_rules():
    """The reference's int(in * (1 - s)) and the earlier floor rule differ by one at times."""
    assert scoring.keep_count(1000, 0.8) == 199 == int(1000 * (1 - 0.8))
    assert scoring.keep_count(1000, 0.8, "floor") == 200
    assert scoring.keep_count(576, 0.5) == 288
    assert scoring.keep_count(10, 0.99) == 0 and scoring.keep_count(10, 0.99, at_least=1) == 1
    differ = [
        (n, s)
        for n in (576, 1000, 1536, 3000)
        for s in (0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9)
        if scoring.keep_count(n, s) != scoring.keep_count(n, s, "floor")
    ]
    assert differ, "the two rules should differ somewhere on these widths"
    with pytest.raises(MaskstoreError, match="keep rule"):
        scoring.keep_count(10, 0.5, "round")


def test_compiled_selection_constant_and_half_rows():
    s = torch.full((3, 70), 0.25)
    assert scoring.topk_mask(s, 9)[:, :9].all() and scoring.topk_mask(s, 9).sum() == 27
    h = torch.tensor([[0.5, 2.0, 2.0, -1.0]], dtype=torch.bfloat16)
    assert scoring.topk_mask(h, 2).tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("square", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(5, 24), (192, 576), (70, 1536)])
def test_fused_selection_equals_scores_then_select(rng, dtype, shape, square):
    """select_fused (kernel on CPU) gives the bits of select(wanda or sparsegpt scores), any mode."""
    w = torch.from_numpy(rng.normal(size=shape)).to(dtype)
    w[0, : shape[1] // 2] = 0.0  # a row of ties at zero
    f = (rng.random(shape[1]) * 10.0 ** rng.uniform(-3, 3, shape[1])).astype(np.float64)
    f[::7] = 0.0  # |w| * 0 ties; w^2 / 0 is inf (or NaN for 0 / 0, counted as -inf)
    if square:
        scores = scoring.sparsegpt_scores(w, f)
    else:
        scores = w.float().abs() * torch.from_numpy(f.astype(np.float32))
    for sparsity in (0.0, 0.2, 0.5, 0.9, 0.999):
        want = _reference_keep(scores.numpy(), scoring.keep_count(shape[1], sparsity))
        got = scoring.select_fused(w, f, sparsity, square=square).numpy()
        assert (got == want).all(), sparsity
    for mode in ("nm", "layer"):
        want = scoring.select(scores, 0.5, mode=mode)
        assert torch.equal(scoring.select_fused(w, f, 0.5, mode=mode, square=square), want)


def test_nm_and_layer_selection(rng):
    s = torch.from_numpy(rng.random((6, 16)))
    m = scoring.select(s, 0.5, mode="nm", n=2, m=4)
    assert (m.reshape(6, 4, 4).sum(-1) == 2).all()
    for i in range(6):
        for g in range(4):
            blk = s[i, g * 4 : g * 4 + 4].tolist()
            assert m[i, g * 4 : g * 4 + 4].tolist() == _naive_keep([blk], 2)[0]
    lay = scoring.select(s, 0.75, mode="layer")
    k = math.floor(0.25 * 96)
    flat = _naive_keep([s.flatten().tolist()], k)[0]
    assert lay.flatten().tolist() == flat
    with pytest.raises(MaskstoreError, match="divisible"):
        scoring.select(torch.rand(2, 10), 0.5, mode="nm", n=2, m=4)


@pytest.mark.parametrize("eps_at", ["sqrt", "outside"])
@pytest.mark.parametrize("kind", ["relu", "softplus"])
def test_contrastive_wanda_matches_loop(rng, kind, eps_at):
    """Large eps so that sqrt(v + eps) and sqrt(v) + eps differ far beyond the tolerance: the
    test tells the two placements apart."""
    w = torch.from_numpy(rng.normal(size=(4, 11))).float()
    pos, neg = _stats(rng, 11), _stats(rng, 11)
    eps, tau = 0.5, 0.5
    sp, sn = scoring.contrastive_wanda_scores(w, pos, neg, kind, eps, tau, eps_at=eps_at)
    for j in range(11):
        v = pos.norm_m2[j] / pos.samples + neg.norm_m2[j] / neg.samples
        den = math.sqrt(v + eps) if eps_at == "sqrt" else math.sqrt(v) + eps
        z = (pos.norm_mean[j] - neg.norm_mean[j]) / den
        f = (lambda t: max(t, 0.0)) if kind == "relu" else (lambda t: math.log1p(math.exp(t / tau)))
        for i in range(4):
            assert sp[i, j].item() == pytest.approx(abs(w[i, j].item()) * f(z), rel=1e-6, abs=1e-30)
            assert sn[i, j].item() == pytest.approx(
                abs(w[i, j].item()) * f(-z), rel=1e-6, abs=1e-30
            )


def test_norm_stats_are_per_sample_norm_moments(rng):
    xs = [rng.normal(size=(int(rng.integers(1, 9)), 5)) for _ in range(7)]
    st = ChannelStats.zeros(5)
    for x in xs:
        st.add_batch(x.sum(0), (x**2).sum(0), np.linalg.norm(x, axis=0)[None], x.shape[0])
    norms = np.stack([np.linalg.norm(x, axis=0) for x in xs])
    np.testing.assert_allclose(st.norm_mean, norms.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.norm_var, norms.var(0), rtol=1e-10)


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.7])
def test_contrastive_sparse_matches_loop_and_is_disjoint(rng, sparsity):
    w = torch.from_numpy(rng.normal(size=(5, 12))).float()
    pos, neg = _stats(rng, 12), _stats(rng, 12)
    a = scoring.wanda_scores(w, pos).tolist()
    b = scoring.wanda_scores(w, neg).tolist()
    mp, mn = scoring.contrastive_sparse_masks(torch.tensor(a), torch.tensor(b), sparsity)
    assert not (mp & mn).any()
    k = math.floor((1 - sparsity) * 12 + 1e-9)
    for i in range(5):
        sa, sb = sum(a[i]), sum(b[i])
        na = [x / sa for x in a[i]]
        nb = [x / sb for x in b[i]]
        c = [abs(x - y) for x, y in zip(na, nb, strict=True)]
        for mine, got in (
            ([x > y for x, y in zip(na, nb, strict=True)], mp[i]),
            ([y > x for x, y in zip(na, nb, strict=True)], mn[i]),
        ):
            cand = sorted((j for j in range(12) if mine[j]), key=lambda j: (-c[j], j))[:k]
            assert got.tolist() == [j in cand for j in range(12)]


def test_sparsegpt_matches_direct_inverse(rng):
    x = rng.normal(size=(50, 9))
    x[:, 4] = 0.0  # a dead channel
    gram = x.T @ x
    d = scoring.hinv_diag(gram, 50, damp=0.01)
    h = 2 * gram / 50
    h[4, 4] = 1.0
    h += 0.01 * np.mean(np.diag(h)) * np.eye(9)
    np.testing.assert_allclose(d, np.diag(np.linalg.inv(h)), rtol=1e-9)
    w = torch.from_numpy(rng.normal(size=(3, 9))).float()
    s = scoring.sparsegpt_scores(w, d)
    for i in range(3):
        for j in range(9):
            assert s[i, j].item() == pytest.approx(w[i, j].item() ** 2 / d[j], rel=1e-6)


def test_gram_and_hinv_bits_do_not_depend_on_the_thread_count(rng):
    """X^T X and [H^-1]_jj (SparseGPT) have one set of bits whatever torch's thread count:
    a BLAS splits the token dimension across threads, so left alone a build on 1 core (or a
    torchrun rank) would not reproduce one on 4. The caller's thread count is restored."""
    from maskstore.build.collect import _reduce

    x = torch.from_numpy(rng.normal(size=(3, 700, 96))).float()
    before = torch.get_num_threads()
    got = []
    for n in (1, 4):
        torch.set_num_threads(n)
        try:
            gram = _reduce(x, None, gram=True)["gram"]
            got.append((gram, scoring.hinv_diag(gram, 2100)))
            assert torch.get_num_threads() == n
        finally:
            torch.set_num_threads(before)
    assert np.array_equal(got[0][0], got[1][0]) and np.array_equal(got[0][1], got[1][1])


def test_selection_is_deterministic_across_dtypes(rng):
    # one set of numbers held in bfloat16, float32 and float64 weights gives one mask
    w16 = torch.from_numpy(rng.normal(size=(16, 40))).bfloat16()
    st = _stats(rng, 40)
    masks = [
        scoring.select(scoring.wanda_scores(w16.to(dt), st), 0.5)
        for dt in (torch.bfloat16, torch.float32, torch.float64)
    ]
    fused = [
        scoring.select_fused(w16.to(dt), scoring.wanda_factor(st), 0.5)
        for dt in (torch.bfloat16, torch.float32, torch.float64)
    ]
    assert masks[0].sum() == 16 * 20
    for m in masks[1:] + fused:
        assert torch.equal(masks[0], m)
