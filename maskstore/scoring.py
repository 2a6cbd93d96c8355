"""Weight scores and mask selection: pure functions over tensors, one module at a time.

Scores are float32 products of float32 factors (statistics are kept in float64 and rounded once),
so every score is one correctly rounded IEEE operation; selection breaks ties by the lowest input
index. The same weights and statistics therefore give the same bits on any machine and device.

Sources: Wanda (Sun et al. 2023, arXiv 2306.11695), SparseGPT (Frantar & Alistarh 2023, arXiv
2301.00774), and the contrastive variants of "Your Language Model Secretly Contains Personality
Subnetworks" (arXiv 2602.07164).
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import MaskstoreError
from .stats import ChannelStats

SELECTIONS = ("row", "nm", "layer")


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


def wanda_factor(stats: ChannelStats) -> np.ndarray:
    """Wanda's per-input-channel factor ``||X_j||_2 = sqrt(sumsq_j)`` as float32 ``(in,)``."""
    return _f32(stats.l2)


def wanda_scores(weight: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    """Wanda: ``S_ij = |W_ij| * ||X_j||_2`` (Sun et al. 2023, eq. 1).

    Args:
        weight: ``(out, in)`` weight of an ``nn.Linear``.
        stats: the module's input statistics; ``||X_j||_2 = sqrt(sumsq_j)`` over all tokens.
    Returns:
        ``(out, in)`` float32 scores.
    """
    return _absw(weight).mul_(_vec(wanda_factor(stats), weight))


def contrastive_z(pos: ChannelStats, neg: ChannelStats, eps: float = 1e-6) -> np.ndarray:
    """``z_j = (mu+_j - mu-_j) / (sqrt(var+_j + var-_j) + eps)`` over per-sample channel L2 norms.

    ``mu`` and ``var`` are the mean and population variance over calibration samples of
    ``a_sj = ||x_{s,:,j}||_2`` (arXiv 2602.07164, contrastive Wanda).
    """
    return (pos.norm_mean - neg.norm_mean) / (np.sqrt(pos.norm_var + neg.norm_var) + eps)


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
    tau: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-input-channel factors ``(phi(z), phi(-z))`` of contrastive Wanda, float32 ``(in,)``."""
    z = contrastive_z(pos, neg, eps)
    return _f32(phi(z, kind, tau)), _f32(phi(-z, kind, tau))


def contrastive_wanda_scores(
    weight: torch.Tensor,
    pos: ChannelStats,
    neg: ChannelStats,
    kind: str = "relu",
    eps: float = 1e-6,
    tau: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrastive Wanda: ``S+ = |W| * phi(z)``, ``S- = |W| * phi(-z)`` (arXiv 2602.07164).

    Returns:
        ``(S+, S-)``, each ``(out, in)`` float32.
    """
    f_pos, f_neg = contrastive_wanda_factors(pos, neg, kind, eps, tau)
    a = _absw(weight)
    return a * _vec(f_pos, weight), a * _vec(f_neg, weight)


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
    try:
        chol = torch.linalg.cholesky(h)
    except RuntimeError:
        raise MaskstoreError("Hessian is not positive definite: raise --damp") from None
    return torch.diagonal(torch.cholesky_inverse(chol)).numpy().copy()


def sparsegpt_scores(weight: torch.Tensor, hinv: np.ndarray) -> torch.Tensor:
    """Mask-only SparseGPT saliency ``S_ij = W_ij^2 / [H^-1]_jj`` (Frantar & Alistarh 2023, eq. 3).

    The weights are never updated (no OBS reconstruction): this only decides which weights a
    persona keeps, so SparseGPT's column blocks would not change a single score.
    """
    w = weight.detach().to(SCORE_DTYPE)
    return w.square().div_(_vec(hinv, weight))


def keep_count(in_features: int, sparsity: float) -> int:
    """Weights kept per row: ``floor((1 - sparsity) * in_features)``."""
    return int(np.floor((1.0 - sparsity) * in_features + 1e-9))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the ``k`` largest scores; ties go to the lowest column index; NaN counts as
    ``-inf``.

    On CPU, float32 (and the lossless float16/bfloat16) rows go to a compiled selection kernel
    (``maskstore._select``). Elsewhere: one ``kthvalue`` per row for the threshold, a comparison,
    and a cumulative sum to split ties only in rows with more tied values than places left.
    Both paths give the same bits.
    """
    rows, n = scores.shape
    if k <= 0 or n == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if scores.device.type == "cpu" and scores.dtype in _KERNEL_DTYPES:
        from ._select import topk_rows  # numba: imported on first use

        return torch.from_numpy(topk_rows(scores.detach().float().numpy(), k))
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
        keep[extra] = (sub > t) | (tied & (torch.cumsum(tied, dim=1) <= need))
    return keep


def select(
    scores: torch.Tensor, sparsity: float, mode: str = "row", n: int = 2, m: int = 4
) -> torch.Tensor:
    """Turn ``(out, in)`` scores into a bool keep-mask.

    Args:
        mode: ``row`` keeps ``floor((1 - sparsity) * in)`` per output row; ``nm`` keeps ``n`` of
            every ``m`` consecutive inputs (sparsity ignored); ``layer`` keeps
            ``floor((1 - sparsity) * out * in)`` under one threshold for the whole module.
    """
    out, inp = scores.shape
    if mode == "row":
        return topk_mask(scores, keep_count(inp, sparsity))
    if mode == "layer":
        return topk_mask(scores.reshape(1, -1), keep_count(out * inp, sparsity)).reshape(out, inp)
    if mode == "nm":
        if not 0 < n <= m or inp % m:
            raise MaskstoreError(
                f"N:M = {n}:{m} needs 0 < N <= M and in_features ({inp}) divisible by M"
            )
        return topk_mask(scores.reshape(-1, m), n).reshape(out, inp)
    raise MaskstoreError(f"unknown selection {mode!r}: use row, nm or layer")


def select_fused(
    weight: torch.Tensor,
    factor: np.ndarray,
    sparsity: float,
    mode: str = "row",
    n: int = 2,
    m: int = 4,
    square: bool = False,
) -> torch.Tensor:
    """``select(scores, ...)`` for scores formed per column from the weights, bit for bit:
    ``|W_ij| * f_j`` (Wanda, contrastive Wanda) or, with ``square``, ``W_ij^2 / f_j`` (SparseGPT
    with ``f = diag(H^-1)``).

    On CPU with per-row selection the scores are never materialised: the compiled kernel forms
    each row's float32 scores in cache and selects from them.

    Args:
        weight: ``(out, in)`` weight.
        factor: ``(in,)`` per-input-channel factor (rounded to float32 once).
    """
    inp = weight.shape[1]
    k = keep_count(inp, sparsity)
    if (
        mode == "row"
        and weight.device.type == "cpu"
        and weight.dtype in _KERNEL_DTYPES
        and 0 < k < inp
    ):
        from ._select import topk_fused_rows  # numba: imported on first use

        w = weight.detach().float().numpy()
        return torch.from_numpy(topk_fused_rows(w, _f32(factor), k, square))
    if square:
        return select(sparsegpt_scores(weight, factor), sparsity, mode, n, m)
    return select(_absw(weight).mul_(_vec(factor, weight)), sparsity, mode, n, m)


def contrastive_sparse_masks(
    s_pos: torch.Tensor,
    s_neg: torch.Tensor,
    sparsity: float,
    mode: str = "row",
    n: int = 2,
    m: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrastive Sparse (arXiv 2602.07164): disjoint masks for an opposing pair.

    ``S~ = S / sum_k S_ik`` per persona (rows summing to zero stay zero), ``C = |S~+ - S~-|``. A
    parameter goes to the persona whose normalised score is strictly larger (exact ties go to
    neither). Each persona then keeps, per row, its assigned parameters with the largest ``C``,
    up to ``floor((1 - sparsity) * in)``; a row with fewer assigned parameters keeps all of them,
    so the realised sparsity can exceed the requested one. The masks never overlap.
    """

    def norm(s: torch.Tensor) -> torch.Tensor:
        tot = s.sum(dim=1, keepdim=True)
        return torch.where(tot > 0, s / torch.where(tot > 0, tot, 1.0), 0.0)

    a, b = norm(s_pos), norm(s_neg)
    c = (a - b).abs_()
    neg_inf = torch.tensor(-torch.inf, dtype=c.dtype, device=c.device)
    masks = []
    for mine in (a > b, b > a):
        masks.append(select(torch.where(mine, c, neg_inf), sparsity, mode, n, m) & mine)
    return masks[0], masks[1]
