"""Weight scores and mask selection: pure functions over tensors, one module at a time.

Scores are float32 products of float32 factors (statistics are kept in float64 and rounded once),
so every score is one correctly rounded IEEE operation; selection breaks exact ties by an
optional second score (the persona's own plain Wanda score), then by the lowest input index. The
same weights and statistics therefore give the same bits on any machine and device.

Sources: Wanda (Sun et al. 2023, arXiv 2306.11695), SparseGPT (Frantar & Alistarh 2023, arXiv
2301.00774), and the contrastive variants of "Your Language Model Secretly Contains Personality
Subnetworks" (arXiv 2602.07164).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import MaskstoreError
from ..store.stats import ChannelStats

SELECTIONS = ("row", "nm", "layer")
NORMS = ("tokens", "sample-mean")
KEEP_RULES = ("int", "floor")


SCORE_DTYPE = torch.float32
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _f32(x: np.ndarray) -> np.ndarray:
    """A per-channel statistic rounded once from float64 to float32."""
    return np.asarray(x, dtype=np.float64).astype(np.float32)


def _vec(x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A per-channel float64 statistic as a float32 row vector on ``like``'s device."""
    return torch.as_tensor(_f32(x), device=like.device)


def _absw(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(SCORE_DTYPE).abs()


def wanda_factor(stats: ChannelStats, norm: str = "tokens") -> np.ndarray:
    """Wanda's per-input-channel activation factor as float32 ``(in,)``.

    Args:
        norm: ``tokens``: ``||X_j||_2 = sqrt(sum_t x_tj^2)`` over all calibration tokens (the
            Wanda paper, eq. 1); ``sample-mean``: ``mean_s ||x_{s,:,j}||_2``, the mean over
            samples of each sample's L2 norm (the paper's reference code, ``mask.py``).
    """
    if norm == "tokens":
        return _f32(stats.l2)
    if norm == "sample-mean":
        return _f32(stats.norm_mean)
    raise MaskstoreError(f"unknown norm {norm!r}: use tokens or sample-mean")


def wanda_scores(weight: torch.Tensor, stats: ChannelStats, norm: str = "tokens") -> torch.Tensor:
    """Wanda: ``S_ij = |W_ij| * ||X_j||_2`` (Sun et al. 2023, eq. 1).

    Args:
        weight: ``(out, in)`` weight of an ``nn.Linear``.
        stats: the module's input statistics.
        norm: how ``||X_j||`` aggregates over tokens and samples (:func:`wanda_factor`).
    Returns:
        ``(out, in)`` float32 scores.
    """
    return _absw(weight).mul_(_vec(wanda_factor(stats, norm), weight))


def contrastive_z(
    pos: ChannelStats, neg: ChannelStats, eps: float = 1e-6, eps_at: str = "sqrt"
) -> np.ndarray:
    """``z_j = (mu+_j - mu-_j) / sqrt(var+_j + var-_j + eps)`` over per-sample channel L2 norms.

    ``mu`` and ``var`` are the mean and population variance over calibration samples of
    ``a_sj = ||x_{s,:,j}||_2`` (arXiv 2602.07164, contrastive Wanda). ``eps_at="outside"`` gives
    the form of bundles built before the reference defaults, ``/ (sqrt(var+ + var-) + eps)``.
    """
    d = pos.norm_mean - neg.norm_mean
    v = pos.norm_var + neg.norm_var
    if eps_at == "sqrt":
        return d / np.sqrt(v + eps)
    if eps_at == "outside":
        return d / (np.sqrt(v) + eps)
    raise MaskstoreError(f"unknown eps placement {eps_at!r}: use sqrt or outside")


def phi(z: np.ndarray, kind: str = "relu", tau: float = 1.0) -> np.ndarray:
    """``relu(z)`` or ``softplus(z / tau)`` (numerically stable)."""
    if kind == "relu":
        return np.maximum(z, 0.0)
    if kind == "softplus":
        t = z / tau
        return np.logaddexp(0.0, t)
    raise MaskstoreError(f"unknown phi {kind!r}: use relu or softplus")


def contrastive_wanda_factors(
    pos: ChannelStats,
    neg: ChannelStats,
    kind: str = "relu",
    eps: float = 1e-6,
    tau: float = 2.0,
    eps_at: str = "sqrt",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-input-channel factors ``(phi(z), phi(-z))`` of contrastive Wanda, float32 ``(in,)``."""
    z = contrastive_z(pos, neg, eps, eps_at)
    return _f32(phi(z, kind, tau)), _f32(phi(-z, kind, tau))


def contrastive_wanda_scores(
    weight: torch.Tensor,
    pos: ChannelStats,
    neg: ChannelStats,
    kind: str = "relu",
    eps: float = 1e-6,
    tau: float = 2.0,
    eps_at: str = "sqrt",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrastive Wanda: ``S+ = |W| * phi(z)``, ``S- = |W| * phi(-z)`` (arXiv 2602.07164).

    Returns:
        ``(S+, S-)``, each ``(out, in)`` float32.
    """
    f_pos, f_neg = contrastive_wanda_factors(pos, neg, kind, eps, tau, eps_at)
    a = _absw(weight)
    return a * _vec(f_pos, weight), a * _vec(f_neg, weight)


@contextlib.contextmanager
def one_thread(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run CPU linear algebra on one thread inside the block: a BLAS or LAPACK routine splits
    its summed dimension across threads (``X^T X`` over tokens, a Cholesky's updates), so its
    bits would depend on the thread count, and a SparseGPT build on 2 cores would not
    reproduce one on 16, nor a ``torchrun`` rank (one thread each) a single process."""
    if torch.device(device).type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def hinv_diag(gram: np.ndarray, tokens: int, damp: float = 0.01) -> np.ndarray:
    """Diagonal of the inverse damped Hessian ``H = 2 X^T X / n + lambda I`` (SparseGPT, sec. 3).

    ``lambda = damp * mean(diag(H))``; channels never active get ``H_jj = 1`` as in SparseGPT.

    Args:
        gram: ``(in, in)`` accumulated ``X^T X`` (float64).
        tokens: n, the number of tokens accumulated.
    """
    h = torch.from_numpy(gram).to(torch.float64) * (2.0 / max(tokens, 1))
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    diag += damp * diag.mean()
    with one_thread():  # the same bits on any number of cores
        try:
            chol = torch.linalg.cholesky(h)
        except RuntimeError:
            raise MaskstoreError("Hessian is not positive definite: raise `damp`") from None
        return torch.diagonal(torch.cholesky_inverse(chol)).numpy().copy()


def sparsegpt_scores(weight: torch.Tensor, hinv: np.ndarray) -> torch.Tensor:
    """Mask-only SparseGPT saliency ``S_ij = W_ij^2 / [H^-1]_jj`` (Frantar & Alistarh 2023, eq. 3).

    The weights are never updated (no OBS reconstruction): this only decides which weights a
    persona keeps, so SparseGPT's column blocks would not change a single score.
    """
    w = weight.detach().to(SCORE_DTYPE)
    return w.square().div_(_vec(hinv, weight))


def keep_count(in_features: int, sparsity: float, rule: str = "int", at_least: int = 0) -> int:
    """Weights kept per row.

    Args:
        rule: ``int``: ``int(in_features * (1 - sparsity))`` in float64, as the reference code
            computes it; ``floor``: ``floor((1 - sparsity) * in_features + 1e-9)``, the rule of
            bundles built before (they differ by one for some widths, e.g. 1000 at 0.8).
        at_least: the least count (the reference's contrastive methods keep at least 1).
    """
    if rule == "int":
        k = int(in_features * (1.0 - sparsity))
    elif rule == "floor":
        k = int(np.floor((1.0 - sparsity) * in_features + 1e-9))
    else:
        raise MaskstoreError(f"unknown keep rule {rule!r}: use int or floor")
    return max(at_least, k)


def _first_need(tied: torch.Tensor, tie: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """Per row, the ``need`` tied places with the largest ``tie`` (then lowest index)."""
    tb = torch.where(tie.isnan(), -torch.inf, tie)
    order = torch.sort(tb, dim=1, descending=True, stable=True).indices
    first = torch.sort(tied.gather(1, order).to(torch.int8), dim=1, descending=True, stable=True)
    order = order.gather(1, first.indices)  # tied places first, each part by tie desc, index asc
    rank = torch.arange(tied.shape[1], device=tied.device).expand_as(tied)
    return torch.zeros_like(tied).scatter_(1, order, rank < need)


def topk_mask(scores: torch.Tensor, k: int, tie: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the ``k`` largest scores; exact ties go to the largest ``tie`` score (if given),
    then to the lowest column index; NaN counts as ``-inf``.

    On CPU, float32 (and the lossless float16/bfloat16) rows go to a compiled selection kernel
    (``maskstore.build._select``). Elsewhere: one ``kthvalue`` per row for the threshold, a comparison,
    and, only in rows with more tied values than places left, a ranking of the tied values.
    Both paths give the same bits.
    """
    rows, n = scores.shape
    if k <= 0 or n == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if scores.device.type == "cpu" and scores.dtype in _KERNEL_DTYPES:
        from ._select import topk_rows  # numba: imported on first use

        t = None if tie is None else tie.detach().float().numpy()
        return torch.from_numpy(topk_rows(scores.detach().float().numpy(), k, t))
    s = (
        torch.nan_to_num(scores, nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
        if scores.isnan().any()
        else scores
    )
    thr = torch.kthvalue(s, n - k + 1, dim=1, keepdim=True).values
    keep = s >= thr
    extra = keep.sum(dim=1) > k  # rows where tied values outnumber the places left
    if extra.any():
        sub, t = s[extra], thr[extra]
        tied = sub == t
        need = k - (sub > t).sum(dim=1, keepdim=True)
        if tie is None:
            keep[extra] = (sub > t) | (tied & (torch.cumsum(tied, dim=1) <= need))
        else:
            keep[extra] = (sub > t) | _first_need(tied, tie[extra], need)
    return keep


def select(
    scores: torch.Tensor,
    sparsity: float,
    mode: str = "row",
    n: int = 2,
    m: int = 4,
    keep: str = "int",
    at_least: int = 0,
    tie: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn ``(out, in)`` scores into a bool keep-mask.

    Args:
        mode: ``row`` keeps ``keep_count(in, sparsity)`` per output row; ``nm`` keeps ``n`` of
            every ``m`` consecutive inputs (sparsity ignored); ``layer`` keeps
            ``keep_count(out * in, sparsity)`` under one threshold for the whole module.
        keep, at_least: the keep-count rule (:func:`keep_count`).
        tie: ``(out, in)`` second score that breaks exact ties before the index does.
    """
    out, inp = scores.shape
    if mode == "row":
        return topk_mask(scores, keep_count(inp, sparsity, keep, at_least), tie)
    flat = None if tie is None else tie.reshape(1, -1)
    if mode == "layer":
        k = keep_count(out * inp, sparsity, keep, at_least)
        return topk_mask(scores.reshape(1, -1), k, flat).reshape(out, inp)
    if mode == "nm":
        if not 0 < n <= m or inp % m:
            raise MaskstoreError(
                f"N:M = {n}:{m} needs 0 < N <= M and in_features ({inp}) divisible by M"
            )
        t = None if tie is None else tie.reshape(-1, m)
        return topk_mask(scores.reshape(-1, m), n, t).reshape(out, inp)
    raise MaskstoreError(f"unknown selection {mode!r}: use row, nm or layer")


def select_fused(
    weight: torch.Tensor,
    factor: np.ndarray,
    sparsity: float,
    mode: str = "row",
    n: int = 2,
    m: int = 4,
    keep: str = "int",
    at_least: int = 0,
    square: bool = False,
    tie_factor: np.ndarray | None = None,
) -> torch.Tensor:
    """``select(scores, ...)`` for scores formed per column from the weights, bit for bit:
    ``|W_ij| * f_j`` (Wanda, contrastive Wanda) or, with ``square``, ``W_ij^2 / f_j`` (SparseGPT
    with ``f = diag(H^-1)``); exact ties go to the larger ``|W_ij| * tie_factor_j``.

    On CPU with per-row selection the scores are never materialised: the compiled kernel forms
    each row's float32 scores in cache and selects from them.

    Args:
        weight: ``(out, in)`` weight.
        factor: ``(in,)`` per-input-channel factor (rounded to float32 once).
        tie_factor: ``(in,)`` per-input-channel factor of the tie-break score, or None.
    """
    inp = weight.shape[1]
    k = keep_count(inp, sparsity, keep, at_least)
    if (
        mode == "row"
        and weight.device.type == "cpu"
        and weight.dtype in _KERNEL_DTYPES
        and 0 < k < inp
    ):
        from ._select import topk_fused_rows  # numba: imported on first use

        w = weight.detach().float().numpy()
        tf = None if tie_factor is None else _f32(tie_factor)
        return torch.from_numpy(topk_fused_rows(w, _f32(factor), k, square, tf))
    tie = None if tie_factor is None else _absw(weight).mul_(_vec(tie_factor, weight))
    if square:
        scores = sparsegpt_scores(weight, factor)
    else:
        scores = _absw(weight).mul_(_vec(factor, weight))
    return select(scores, sparsity, mode, n, m, keep, at_least, tie)


def contrastive_sparse_masks(
    s_pos: torch.Tensor,
    s_neg: torch.Tensor,
    sparsity: float,
    mode: str = "row",
    n: int = 2,
    m: int = 4,
    keep: str = "int",
    at_least: int = 0,
    ties: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrastive Sparse as the paper's text defines it (arXiv 2602.07164, eq. 9): disjoint
    masks for an opposing pair.

    ``S~ = S / sum_k S_ik`` per persona (rows summing to zero stay zero), ``C = |S~+ - S~-|``. A
    parameter goes to the persona whose normalised score is strictly larger (exact ties go to
    neither). Each persona then keeps, per row, its assigned parameters with the largest ``C``,
    up to the keep count; a row with fewer assigned parameters keeps all of them, so the
    realised sparsity can exceed the requested one. The masks never overlap.

    Args:
        ties: each persona's tie-break scores (its plain Wanda scores), or None.
    """

    def norm(s: torch.Tensor) -> torch.Tensor:
        tot = s.sum(dim=1, keepdim=True)
        return torch.where(tot > 0, s / torch.where(tot > 0, tot, 1.0), 0.0)

    a, b = norm(s_pos), norm(s_neg)
    c = (a - b).abs_()
    neg_inf = torch.tensor(-torch.inf, dtype=c.dtype, device=c.device)
    masks = []
    for i, mine in enumerate((a > b, b > a)):
        tie = None if ties is None else ties[i]
        sel = select(torch.where(mine, c, neg_inf), sparsity, mode, n, m, keep, at_least, tie)
        masks.append(sel & mine)
    return masks[0], masks[1]


def token_zscore(pos: ChannelStats, neg: ChannelStats, eps: float = 1e-6) -> np.ndarray:
    """``|mu+_j - mu-_j| / sqrt(v+_j + v-_j + eps)`` over the raw activations of all tokens
    (``mu = sum / n``, ``v = max(sumsq / n - mu^2, 0)``), the reference code's contrastive
    Sparse channel score (``contra.py``)."""

    def mv(st: ChannelStats) -> tuple[np.ndarray, np.ndarray]:
        n = max(st.tokens, 1)
        mu = st.sum / n
        return mu, np.maximum(st.sumsq / n - mu * mu, 0.0)

    (mp, vp), (mn, vn) = mv(pos), mv(neg)
    return np.abs(mp - mn) / np.sqrt(vp + vn + eps)


def ranked_pair_masks(
    weight: torch.Tensor,
    score: np.ndarray,
    sparsity: float,
    mode: str = "row",
    n: int = 2,
    m: int = 4,
    keep: str = "int",
    at_least: int = 1,
    tie_factors: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference code's contrastive Sparse: one shared score ``S = |W| * score``; the first
    persona keeps the top-k of each row of ``S``, the second the next top-k once the first's
    places are set to ``-inf``. When ``k`` exceeds half a row, the second persona's remaining
    places go to ``-inf``-scored weights, so its mask overlaps the first's; its tie-break score
    (its own plain Wanda score) decides which.

    Args:
        score: ``(in,)`` channel score (:func:`token_zscore`).
        tie_factors: each persona's plain Wanda factor, or None (lowest index).
    """
    tf = (None, None) if tie_factors is None else tie_factors
    first = select_fused(weight, score, sparsity, mode, n, m, keep, at_least, tie_factor=tf[0])
    s = _absw(weight).mul_(_vec(score, weight)).masked_fill_(first, -torch.inf)
    tie = None if tf[1] is None else _absw(weight).mul_(_vec(tf[1], weight))
    return first, select(s, sparsity, mode, n, m, keep, at_least, tie)


def column_norm_mask(
    weight: torch.Tensor, sparsity: float, block: int = 128, keep: str = "int"
) -> torch.Tensor:
    """The reference code's calibration-free ``sparsegpt`` (``mask.py``), under an honest name:
    in each block of ``block`` consecutive input columns, prune the ``int(cols * sparsity)``
    columns of smallest L2 norm over the output rows (of equal norms, the lowest index is kept),
    whole columns at once. The mask does not depend on any calibration data, so every persona gets the same one.
    """
    out, inp = weight.shape
    norms = weight.detach().to(torch.float32).norm(dim=0)  # (in,)
    keep_cols = torch.zeros(inp, dtype=torch.bool, device=weight.device)
    for start in range(0, inp, block):
        seg = norms[start : start + block]
        cols = seg.shape[0]
        prune = int(cols * sparsity) if keep == "int" else cols - keep_count(cols, sparsity, keep)
        k = cols - prune
        keep_cols[start : start + cols] = topk_mask(seg.reshape(1, -1), k).reshape(-1)
    return keep_cols.unsqueeze(0).expand(out, inp).clone()
