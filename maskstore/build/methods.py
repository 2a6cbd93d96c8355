"""The scoring methods, one registry entry each: what a method needs and how it turns one module's
weight and statistics into masks.

To add a method, write its scores in :mod:`maskstore.build.scoring`, then :func:`register` a
:class:`Method` here, and test it; ``maskstore build --method NAME``, recipes and stored-statistics
builds find it by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import MaskstoreError
from ..store.stats import ChannelStats
from . import scoring


class BuildConfig(Protocol):
    """What a method reads of :class:`maskstore.build.BuildConfig` (declared here, so that the
    registry never imports the pipeline that uses it)."""

    sparsity: float
    selection: str
    n: int
    m: int
    phi: str
    eps: float
    tau: float
    damp: float
    norm: str
    keep: str
    eps_at: str
    ties: str
    block: int


@dataclass(frozen=True)
class Method:
    """One scoring method.

    Attributes:
        name: the name given to ``--method`` and recorded in persona metadata.
        contrastive: scores an opposing pair ``(p+, p-)`` together; else each persona alone.
        params: ``config -> field names``: the :class:`~maskstore.build.BuildConfig` fields it
            records in persona metadata (besides the selection's).
        masks: ``(weight, stats, config) -> masks``; ``stats`` holds one persona's statistics,
            or the pair's ``[p+, p-]`` for contrastive methods; one bool ``(out, in)`` mask each.
        summary: one line for help texts.
        finish: ``(gram, tokens, config) -> (row, vector)``: what it derives from an input
            group's Gram matrix after the calibration pass (SparseGPT: ``diag(H^-1)``), kept in
            each module's statistics under ``row``; None when it needs no Gram matrix.
        required: ``(stats, config) -> missing`` names what stored statistics lack, or None.
        zero_kept: ``(weight, stats, config, masks) -> counts``: per mask, how many kept
            weights scored exactly 0 (places decided by ties alone); None when that cannot
            happen systematically.
    """

    name: str
    contrastive: bool
    params: Callable[[BuildConfig], tuple[str, ...]]
    masks: Callable[[torch.Tensor, list[ChannelStats], BuildConfig], list[torch.Tensor]]
    summary: str
    finish: Callable[[Any, int, BuildConfig], tuple[str, Any]] | None = None
    required: Callable[[ChannelStats, BuildConfig], str | None] | None = None
    zero_kept: (
        Callable[[torch.Tensor, list[ChannelStats], BuildConfig, list[torch.Tensor]], list[int]]
        | None
    ) = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (a second method of the same name is refused)."""
    if method.name in METHODS:
        raise MaskstoreError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    """The method called ``name``, or a one-line error listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise MaskstoreError(f"unknown method {name!r}: use one of {', '.join(METHODS)}") from None


def _sel(config: BuildConfig, contrastive: bool = False) -> dict:
    """The selection's arguments; the reference's contrastive methods keep at least 1 per row."""
    at_least = 1 if contrastive and config.keep == "int" else 0
    return dict(
        sparsity=config.sparsity,
        mode=config.selection,
        n=config.n,
        m=config.m,
        keep=config.keep,
        at_least=at_least,
    )


def _tie_factor(st: ChannelStats, config: BuildConfig):
    """The persona's own plain Wanda factor, which breaks exact score ties (None: by index)."""
    return scoring.wanda_factor(st, config.norm) if config.ties == "wanda" else None


def _zero_kept_fused(weight, factors, masks) -> list[int]:
    a = weight.detach().float().abs()
    out = []
    for f, m in zip(factors, masks, strict=True):
        zero_cols = torch.from_numpy(np.asarray(f, dtype=np.float32) == 0).to(weight.device)
        out.append(int(m[:, zero_cols].sum()) + int((m & (a == 0))[:, ~zero_cols].sum()))
    return out


# ---- Wanda


def _wanda(weight, stats, config):
    f = scoring.wanda_factor(stats[0], config.norm)
    return [scoring.select_fused(weight, f, **_sel(config))]


register(
    Method(
        "wanda",
        contrastive=False,
        params=lambda c: ("norm", "keep"),
        masks=_wanda,
        summary="|W| * ||X_j|| per persona (Sun et al. 2023); --norm tokens or sample-mean",
    )
)


# ---- SparseGPT saliency (mask only)


def _hinv_row(config: BuildConfig) -> str:
    return f"hinv_diag_damp{config.damp:g}"


def _sparsegpt(weight, stats, config):
    hinv = stats[0].extra[_hinv_row(config)]
    return [
        scoring.select_fused(
            weight, hinv, **_sel(config), square=True, tie_factor=_tie_factor(stats[0], config)
        )
    ]


def _sparsegpt_finish(gram: Any, tokens: int, config: BuildConfig) -> tuple[str, Any]:
    return _hinv_row(config), scoring.hinv_diag(gram, tokens, config.damp)


def _sparsegpt_required(st: ChannelStats, config: BuildConfig) -> str | None:
    if _hinv_row(config) in st.extra:
        return None
    return (
        f"SparseGPT's H^-1 diagonal for damp={config.damp:g}: "
        "rebuild from the model with `method`=sparsegpt"
    )


register(
    Method(
        "sparsegpt",
        contrastive=False,
        params=lambda c: ("damp", "keep", "ties") + (("norm",) if c.ties == "wanda" else ()),
        masks=_sparsegpt,
        summary="W^2 / [H^-1]_jj saliency, mask only (Frantar & Alistarh 2023)",
        finish=_sparsegpt_finish,
        required=_sparsegpt_required,
    )
)


# ---- contrastive Wanda


def _cw_factors(stats, config):
    return scoring.contrastive_wanda_factors(
        stats[0], stats[1], config.phi, config.eps, config.tau, config.eps_at
    )


def _contrastive_wanda(weight, stats, config):
    sel = _sel(config, contrastive=True)
    return [
        scoring.select_fused(weight, f, **sel, tie_factor=_tie_factor(st, config))
        for f, st in zip(_cw_factors(stats, config), stats, strict=True)
    ]


register(
    Method(
        "contrastive-wanda",
        contrastive=True,
        params=lambda c: (
            ("phi", "eps", "eps_at", "keep", "ties")
            + (("tau",) if c.phi == "softplus" else ())
            + (("norm",) if c.ties == "wanda" else ())
        ),
        masks=_contrastive_wanda,
        summary="|W| * phi(+-z) over per-sample channel norms of a pair (arXiv 2602.07164)",
        zero_kept=lambda w, st, c, masks: _zero_kept_fused(w, _cw_factors(st, c), masks),
    )
)


# ---- contrastive Sparse, as the paper's text defines it (eq. 9)


def _contrastive_sparse(weight, stats, config):
    s_pos = scoring.wanda_scores(weight, stats[0], config.norm)
    s_neg = scoring.wanda_scores(weight, stats[1], config.norm)
    ties = (s_pos, s_neg) if config.ties == "wanda" else None
    return list(
        scoring.contrastive_sparse_masks(s_pos, s_neg, **_sel(config, contrastive=True), ties=ties)
    )


register(
    Method(
        "contrastive-sparse",
        contrastive=True,
        params=lambda c: ("norm", "keep", "ties"),
        masks=_contrastive_sparse,
        summary="disjoint masks from |S+~ - S-~| of a pair (arXiv 2602.07164, eq. 9)",
    )
)


# ---- contrastive Sparse, as the paper's reference code computes it (contra.py)


def _ranked(weight, stats, config):
    score = scoring.token_zscore(stats[0], stats[1], config.eps)
    ties = None
    if config.ties == "wanda":
        ties = (_tie_factor(stats[0], config), _tie_factor(stats[1], config))
    return list(
        scoring.ranked_pair_masks(weight, score, **_sel(config, contrastive=True), tie_factors=ties)
    )


def _ranked_zero_kept(weight, stats, config, masks):
    score = scoring.token_zscore(stats[0], stats[1], config.eps)
    return _zero_kept_fused(weight, [score, score], masks)


register(
    Method(
        "contrastive-sparse-ref",
        contrastive=True,
        params=lambda c: ("eps", "keep", "ties") + (("norm",) if c.ties == "wanda" else ()),
        masks=_ranked,
        summary="reference code's contrastive Sparse: shared |W| * |mu+ - mu-| / sigma, "
        "p+ the top-k, p- the next top-k",
        zero_kept=_ranked_zero_kept,
    )
)


# ---- the reference code's calibration-free "sparsegpt" (mask.py)


def _column_norm(weight, stats, config):
    return [scoring.column_norm_mask(weight, config.sparsity, config.block, config.keep)]


register(
    Method(
        "column-norm",
        contrastive=False,
        params=lambda c: ("block", "keep"),
        masks=_column_norm,
        summary="calibration-free: prune whole columns of least L2 norm per block "
        "(the reference code's 'sparsegpt')",
    )
)
