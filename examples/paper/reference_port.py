"""An independent port of the paper's reference code (github Ruimeng-Ye/Persona, ``mask.py`` and
``contra.py``): its statistics and mask formulas in plain torch loops, one sample per forward
pass, ``torch.topk`` per row, exactly as the reference writes them. Nothing here calls maskstore.

Used by ``tests/test_reference.py`` (tiny model) and ``compare_reference.py`` (the embedded
SmolLM2) to measure how many mask bits maskstore's variants share with the reference.
"""

from __future__ import annotations

import torch
from torch import nn

EPS = 1e-6  # contra.py


def _linears(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    named = dict(model.named_modules())
    return {n: named[n] for n in names}


@torch.no_grad()
def sample_norm_stats(model, seqs, names):
    """mask.py / contra.py ``_collect_act_stats``: per forward (one sample) the input's L2 norm
    over (batch, tokens) per channel; mean and population variance over samples."""
    acts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out, n=n: acts[n].append(
                torch.norm(inp[0].detach(), p=2, dim=(0, 1)).float().cpu()
            )
        )
        for n, m in _linears(model, names).items()
    ]
    for ids in seqs:
        model(input_ids=ids.unsqueeze(0))
    for h in hooks:
        h.remove()
    mean = {n: torch.stack(v).mean(dim=0) for n, v in acts.items()}
    var = {n: torch.stack(v).var(dim=0, unbiased=False) for n, v in acts.items()}
    return mean, var


@torch.no_grad()
def token_stats(model, seqs, names):
    """contra.py ``_collect_input_running_stats``: float32 running sums over all tokens; the
    mean and the clamped variance ``E[x^2] - mu^2``."""
    sums: dict[str, torch.Tensor] = {}
    sumsq: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(n):
        def f(mod, inp, out):
            x = inp[0].detach()
            flat = x.reshape(-1, x.shape[-1]).float()
            s, ss = flat.sum(dim=0).cpu(), (flat * flat).sum(dim=0).cpu()
            if n not in sums:
                sums[n], sumsq[n], counts[n] = s.clone(), ss.clone(), flat.shape[0]
            else:
                sums[n] += s
                sumsq[n] += ss
                counts[n] += flat.shape[0]

        return f

    hooks = [m.register_forward_hook(hook(n)) for n, m in _linears(model, names).items()]
    for ids in seqs:
        model(input_ids=ids.unsqueeze(0))
    for h in hooks:
        h.remove()
    mu, var = {}, {}
    for n in sums:
        cnt = float(counts[n])
        m = sums[n] / max(1.0, cnt)
        mu[n] = m
        var[n] = torch.clamp(sumsq[n] / max(1.0, cnt) - m * m, min=0.0)
    return mu, var


def _topk_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        for i in range(scores.size(0)):
            _, idx = torch.topk(scores[i], k=k)
            mask[i, idx] = True
    return mask


def wanda(weight, act_mean, sparsity=0.5):
    """mask.py ``phase2_wanda_mask``: ``|W| * a`` with ``a`` the mean per-sample norm."""
    w_abs = weight.detach().abs().float().cpu()
    s = w_abs * act_mean.cpu().unsqueeze(0)
    return _topk_rows(s, int(w_abs.size(1) * (1.0 - sparsity))), s


def contrastive_wanda(weight, mu_s, var_s, mu_r, var_r, sparsity=0.3, act="relu", tau=2.0):
    """contra.py ``phase2_wanda_mask_contrastive``."""
    w_abs = weight.detach().abs().float().cpu()
    keep_k = max(1, int(w_abs.size(1) * (1.0 - sparsity)))
    z = (mu_s - mu_r) / (var_s + var_r + EPS).sqrt()
    if act == "softplus":
        f_s = nn.functional.softplus(z / max(1e-6, tau))
        f_r = nn.functional.softplus((-z) / max(1e-6, tau))
    else:
        f_s, f_r = torch.relu(z), torch.relu(-z)
    s_seek, s_reject = w_abs * f_s.unsqueeze(0), w_abs * f_r.unsqueeze(0)
    return (_topk_rows(s_seek, keep_k), s_seek), (_topk_rows(s_reject, keep_k), s_reject)


def contrastive_sparse(weight, mu_s, var_s, mu_r, var_r, sparsity=0.3):
    """contra.py ``phase2_sparse_mask_contrastive``: shared ``S``; seek the top-k, reject the
    next top-k after seek's places are set to -inf."""
    w_abs = weight.detach().abs().float().cpu()
    keep_k = max(1, int(w_abs.size(1) * (1.0 - sparsity)))
    score = (mu_s - mu_r).abs() / (var_s + var_r + EPS).sqrt()
    s = w_abs * score.unsqueeze(0)
    m_seek = _topk_rows(s, keep_k)
    s_r = s.clone()
    s_r[m_seek] = -float("inf")
    return (m_seek, s), (_topk_rows(s_r, keep_k), s_r)


def column_norm(weight, sparsity=0.5, block_size=128):
    """mask.py ``phase2_sparsegpt_mask``: whole columns of least L2 norm per block of 128."""
    w = weight.detach().float().cpu()
    mask = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, w.shape[1], block_size):
        end = min(start + block_size, w.shape[1])
        n_prune = int((end - start) * sparsity)
        if n_prune == 0:
            continue
        _, idx = torch.topk(torch.norm(w[:, start:end], dim=0), k=n_prune, largest=False)
        mask[:, start:end][:, idx] = False
    return mask


def decided(mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Places whose bit the scores decide: all but those tied with a row's lowest kept score
    when that tie spans kept and dropped places (where ``torch.topk``'s order chose)."""
    s = torch.where(scores.isnan(), -torch.inf, scores)
    low = torch.where(mask, s, torch.inf).min(dim=1, keepdim=True).values
    tied = s == low
    ambiguous = (tied & ~mask).any(dim=1, keepdim=True) & tied
    return ~ambiguous
