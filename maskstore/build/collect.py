"""Calibration pass: forward hooks on the inputs of the masked ``nn.Linear`` modules.

Memory is bounded by one batch of activations: each hook reduces its input to per-channel sums
at once. Padding tokens never count (the batch's attention mask is applied). Modules fed the
same tensor (q/k/v, gate/up) reduce it once.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ..progress import Progress, counter
from ..store.stats import ChannelStats
from .scoring import one_thread

Batch = Mapping[str, torch.Tensor] | torch.Tensor


_CHUNK_BYTES = 64 << 20  # float64 activations upcast at once, at most


def _reduce(x: torch.Tensor, mask: torch.Tensor | None, gram: bool):
    """Per-batch sums of one input ``x`` (B, T, in) under ``mask`` (B, T).

    Activations are upcast to float64 before they are squared or summed, whatever the model's
    dtype (float16 squares overflow past 256), a few samples at a time.
    """
    x = x.detach()
    if x.ndim == 2:
        x = x.unsqueeze(0)
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
    b, t, d = x.shape
    if mask is None:
        m = torch.ones((b, t), dtype=torch.float64, device=x.device)
    else:
        m = mask.to(device=x.device, dtype=torch.float64).reshape(b, -1)
    sums = torch.zeros(d, dtype=torch.float64, device=x.device)
    per_sample_sq = torch.empty((b, d), dtype=torch.float64, device=x.device)  # (B, in)
    step = max(1, _CHUNK_BYTES // max(t * d * 8, 1))
    for i in range(0, b, step):
        xc = x[i : i + step].to(torch.float64) * m[i : i + step].unsqueeze(-1)
        sums += xc.sum(dim=(0, 1))
        per_sample_sq[i : i + step] = xc.square().sum(dim=1)
    valid = m.sum(dim=1) > 0
    out = {
        "sum": sums.cpu().numpy(),
        "sumsq": per_sample_sq.sum(dim=0).cpu().numpy(),
        "norms": per_sample_sq[valid].sqrt().cpu().numpy(),
        "tokens": int(m.sum().item()),
    }
    if gram:
        flat = (x.float() * m.float().unsqueeze(-1)).reshape(-1, d)
        with one_thread(flat.device):  # bits independent of the thread count
            out["gram"] = (flat.T @ flat).to(torch.float64).cpu().numpy()
    return out


class StatsCollector:
    """Accumulates :class:`ChannelStats` (and optionally ``X^T X``) for named modules.

    Args:
        modules: name -> ``nn.Linear`` to watch.
        gram: also accumulate the Gram matrix ``X^T X`` per module (for SparseGPT).
    """

    def __init__(
        self, modules: Mapping[str, nn.Linear], gram: bool = False, record: bool = False
    ) -> None:
        self.modules = dict(modules)
        self.gram = gram
        self.record = record  # keep each batch's sums apart (``partials``) for a later replay
        self.partials: dict[str, list[tuple[int, dict]]] = {n: [] for n in self.modules}
        self._index = 0
        self.stats = {n: ChannelStats.zeros(m.in_features) for n, m in self.modules.items()}
        self.grams: dict[str, np.ndarray] = {}  # X^T X per input group (first module's name)
        self.gram_tokens: dict[str, int] = {}  # tokens folded into each group's X^T X
        # recording: each batch's X^T X apart, ``(index, gram, tokens)``, for a fold in
        # calibration order across ranks (:func:`maskstore.build.distributed.gather_grams`)
        self.gram_parts: dict[str, list[tuple[int, np.ndarray, int]]] = {}
        self.finished: dict[str, tuple[str, object]] = {}  # group -> what finish() made of it
        self.group_of: dict[str, str] = {}  # module -> the module whose input it shares
        self._mask: torch.Tensor | None = None
        self._last: tuple[torch.Tensor, dict, str] | None = None

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Fold module ``name``'s input ``x`` of the current batch (see :meth:`batch`)."""
        if self._last is not None and self._last[0] is x:
            _, red, group = self._last  # same tensor as the previous module: reduce once
        else:
            red, group = _reduce(x, self._mask, self.gram), name
            self._last = (x, red, group)  # strong ref: its address cannot be reused meanwhile
            if self.gram:
                gram = red.pop("gram")  # not kept with the recorded sums
                if self.record:
                    self.gram_parts.setdefault(group, []).append((self._index, gram, red["tokens"]))
                elif group in self.grams:
                    self.grams[group] += gram
                    self.gram_tokens[group] += red["tokens"]
                else:
                    self.grams[group] = gram
                    self.gram_tokens[group] = red["tokens"]
        self.group_of[name] = group
        if self.record:
            self.partials[name].append((self._index, red))
        else:
            self.stats[name].add_batch(red["sum"], red["sumsq"], red["norms"], red["tokens"])

    @contextlib.contextmanager
    def batch(self, mask: torch.Tensor | None, index: int = 0) -> Iterator[None]:
        """Observe one batch whose padding is ``mask`` (B, T) (None: no padding); ``index`` is
        its place in the whole calibration set (recorded with its partial sums)."""
        self._mask, self._index = mask, index
        try:
            yield
        finally:
            self._mask = None
            self._last = None

    def replay(self, partials: Mapping[str, list[tuple[int, dict]]]) -> dict[str, ChannelStats]:
        """Fold recorded per-batch sums (from every rank) in calibration order, as one process
        folds them batch by batch: the same float64 operations in the same order."""
        for name, parts in partials.items():
            st = self.stats[name]
            for _, red in sorted(parts, key=lambda p: p[0]):
                st.add_batch(red["sum"], red["sumsq"], red["norms"], red["tokens"])
        return self.stats

    def _hook(self, name: str):
        def hook(_mod: nn.Module, args: tuple) -> None:
            self.observe(name, args[0])

        return hook

    def run(
        self,
        model: nn.Module,
        batches: Iterable[Batch],
        progress: Progress | None = None,
        indices: Iterable[int] | None = None,
    ) -> dict[str, ChannelStats]:
        """Run ``model`` over ``batches`` (dicts with ``input_ids``/``attention_mask``, or tensors
        of token ids) and return the statistics per module; ``indices`` are the batches' places
        in the whole calibration set (when recording for a replay). ``progress(done, total)``
        counts samples (``total`` known when ``batches`` is a list)."""
        order = iter(indices) if indices is not None else itertools.count()
        total = None
        if isinstance(batches, list):
            total = sum(int((b if isinstance(b, torch.Tensor) else b["input_ids"]).shape[0])
                        for b in batches)  # fmt: skip
        tick = counter(progress, total)
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        device = next(model.parameters()).device
        try:
            with torch.inference_mode():
                for batch in batches:
                    index = next(order)
                    if isinstance(batch, torch.Tensor):
                        with self.batch(None, index):
                            model(batch.to(device))
                        n = batch.shape[0]
                    else:
                        ids, mask = batch["input_ids"], batch.get("attention_mask")
                        kw = {} if mask is None else {"attention_mask": mask.to(device)}
                        with self.batch(mask, index):
                            model(input_ids=ids.to(device), use_cache=False, **kw)
                        n = ids.shape[0]
                    tick(n)
        finally:
            for h in handles:
                h.remove()
            self._mask = None
            self._last = None
        return self.stats
