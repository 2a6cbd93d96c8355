"""The scoring methods, one registry entry each: what a method needs and how it turns one module's
weight and statistics into masks.

To add a method, write its scores in :mod:`maskstore.scoring`, then :func:`register` a
:class:`Method` here, and test it; ``maskstore build --method NAME``, recipes and stored-statistics
builds find it by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import scoring
from .errors import MaskstoreError
from .stats import ChannelStats

if TYPE_CHECKING:
    import torch

    from .build import BuildConfig


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
        needs_gram: the calibration pass accumulates ``X^T X`` per input group.
        finish: ``(gram, tokens, config) -> (row, vector)``: what it derives from an input
            group's Gram matrix after the calibration pass (SparseGPT: ``diag(H^-1)``), kept in
            each module's statistics under ``row``; None when it needs no Gram matrix.
        required: ``(stats, config) -> missing`` names what stored statistics lack, or None.
        summary: one line for help texts.
    """

    name: str
    contrastive: bool
    params: Callable[[BuildConfig], tuple[str, ...]]
    masks: Callable[[torch.Tensor, list[ChannelStats], BuildConfig], list[torch.Tensor]]
    summary: str
    finish: Callable[[Any, int, BuildConfig], tuple[str, Any]] | None = None
    required: Callable[[ChannelStats, BuildConfig], str | None] | None = None


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


def _sel(config: BuildConfig) -> dict:
    return dict(sparsity=config.sparsity, mode=config.selection, n=config.n, m=config.m)


# ---- Wanda


def _wanda(weight, stats, config):
    return [scoring.select_fused(weight, scoring.wanda_factor(stats[0]), **_sel(config))]


register(
    Method(
        "wanda",
        contrastive=False,
        params=lambda c: (),
        masks=_wanda,
        summary="|W| * ||X||_2 per persona (Sun et al. 2023)",
    )
)


# ---- SparseGPT saliency (mask only)


def _hinv_row(config: BuildConfig) -> str:
    return f"hinv_diag_damp{config.damp:g}"


def _sparsegpt(weight, stats, config):
    hinv = stats[0].extra[_hinv_row(config)]
    return [scoring.select_fused(weight, hinv, **_sel(config), square=True)]


def _sparsegpt_finish(gram: Any, tokens: int, config: BuildConfig) -> tuple[str, Any]:
    return _hinv_row(config), scoring.hinv_diag(gram, tokens, config.damp)


def _sparsegpt_required(st: ChannelStats, config: BuildConfig) -> str | None:
    if _hinv_row(config) in st.extra:
        return None
    return (
        f"SparseGPT's H^-1 diagonal for damp={config.damp:g}: "
        "rebuild from the model with --method sparsegpt"
    )


register(
    Method(
        "sparsegpt",
        contrastive=False,
        params=lambda c: ("damp",),
        masks=_sparsegpt,
        summary="W^2 / [H^-1]_jj saliency, mask only (Frantar & Alistarh 2023)",
        finish=_sparsegpt_finish,
        required=_sparsegpt_required,
    )
)


# ---- contrastive Wanda


def _contrastive_wanda(weight, stats, config):
    f_pos, f_neg = scoring.contrastive_wanda_factors(
        stats[0], stats[1], config.phi, config.eps, config.tau
    )
    return [
        scoring.select_fused(weight, f_pos, **_sel(config)),
        scoring.select_fused(weight, f_neg, **_sel(config)),
    ]


register(
    Method(
        "contrastive-wanda",
        contrastive=True,
        params=lambda c: ("phi", "eps", "tau") if c.phi == "softplus" else ("phi", "eps"),
        masks=_contrastive_wanda,
        summary="|W| * phi(+-z) over per-sample channel norms of a pair (arXiv 2602.07164)",
    )
)


# ---- contrastive Sparse


def _contrastive_sparse(weight, stats, config):
    a, b = scoring.contrastive_sparse_masks(
        scoring.wanda_scores(weight, stats[0]),
        scoring.wanda_scores(weight, stats[1]),
        **_sel(config),
    )
    return [a, b]


register(
    Method(
        "contrastive-sparse",
        contrastive=True,
        params=lambda c: (),
        masks=_contrastive_sparse,
        summary="disjoint masks from |S+~ - S-~| of a pair (arXiv 2602.07164)",
    )
)
