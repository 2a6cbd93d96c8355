"""Every method against a plain, obviously-correct loop over rows on small shapes."""

import math

import numpy as np
import pytest
import torch

from maskstore import scoring
from maskstore.errors import MaskstoreError
from maskstore.stats import ChannelStats


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
    k = math.floor((1 - sparsity) * shape[1] + 1e-9)
    got = scoring.select(s, sparsity).tolist()
    assert got == _naive_keep(s.tolist(), k)


def test_ties_go_to_lowest_index():
    s = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    m = scoring.topk_mask(s, 2)
    assert m.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    nan = torch.tensor([[float("nan"), 1.0, 0.0]])
    assert scoring.topk_mask(nan, 2).tolist() == [[False, True, True]]


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


@pytest.mark.parametrize("kind", ["relu", "softplus"])
def test_contrastive_wanda_matches_loop(rng, kind):
    w = torch.from_numpy(rng.normal(size=(4, 11))).float()
    pos, neg = _stats(rng, 11), _stats(rng, 11)
    eps, tau = 1e-6, 0.5
    sp, sn = scoring.contrastive_wanda_scores(w, pos, neg, kind, eps, tau)
    for j in range(11):
        z = (pos.norm_mean[j] - neg.norm_mean[j]) / (
            math.sqrt(pos.norm_m2[j] / pos.samples + neg.norm_m2[j] / neg.samples) + eps
        )
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
    s = scoring.sparsegpt_scores(w, d, blocksize=4)
    for i in range(3):
        for j in range(9):
            assert s[i, j].item() == pytest.approx(w[i, j].item() ** 2 / d[j], rel=1e-6)


def test_selection_is_deterministic_across_dtypes(rng):
    w = torch.from_numpy(rng.normal(size=(16, 40))).float()
    st = _stats(rng, 40)
    a = scoring.select(scoring.wanda_scores(w, st), 0.5)
    b = scoring.select(scoring.wanda_scores(w.clone(), st), 0.5)
    assert torch.equal(a, b)
