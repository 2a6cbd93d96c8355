"""Per-input-channel calibration statistics of one ``nn.Linear``, in a mergeable form.

For a module with ``in`` input channels, over the non-padding tokens ``t`` of samples ``s``:

* ``tokens``       n = number of tokens seen
* ``sum[j]``       sum_t x_tj                    (float64)
* ``sumsq[j]``     sum_t x_tj^2                  (float64); Wanda's ||X_j||_2 = sqrt(sumsq[j])
* ``samples``      m = number of samples seen
* ``norm_mean[j]`` mean over samples of a_sj = ||x_{s,:,j}||_2 (the sample's L2 norm on channel j)
* ``norm_m2[j]``   sum over samples of (a_sj - norm_mean[j])^2 (Welford's M2)

Two sets merge exactly in the algebraic sense (Chan et al.'s parallel update for mean/M2, plain
addition for the sums), so calibration can be split across machines. The contrastive-Wanda
variance is the population variance ``norm_m2 / samples``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ROWS = ("sum", "sumsq", "norm_mean", "norm_m2")


@dataclass
class ChannelStats:
    """Mergeable per-channel statistics; arrays are float64 of shape (in,)."""

    tokens: int
    samples: int
    sum: np.ndarray
    sumsq: np.ndarray
    norm_mean: np.ndarray
    norm_m2: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. sparsegpt's hinv_diag

    @classmethod
    def zeros(cls, in_features: int) -> ChannelStats:
        z = lambda: np.zeros(in_features, dtype=np.float64)  # noqa: E731
        return cls(0, 0, z(), z(), z(), z())

    @property
    def in_features(self) -> int:
        return self.sum.shape[0]

    @property
    def l2(self) -> np.ndarray:
        """||X_j||_2 over all tokens (Wanda's activation norm)."""
        return np.sqrt(self.sumsq)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.tokens, 1)

    @property
    def norm_var(self) -> np.ndarray:
        """Population variance over samples of the per-sample channel L2 norm."""
        return self.norm_m2 / max(self.samples, 1)

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Statistics of the union of both sets of samples (Chan's parallel algorithm).

        ``extra`` rows are not mergeable and are dropped.
        """
        if other.in_features != self.in_features:
            raise ValueError(
                f"cannot merge stats of {self.in_features} and {other.in_features} channels"
            )
        na, nb = self.samples, other.samples
        n = na + nb
        if n == 0:
            mean, m2 = self.norm_mean.copy(), self.norm_m2.copy()
        else:
            delta = other.norm_mean - self.norm_mean
            mean = self.norm_mean + delta * (nb / n)
            m2 = self.norm_m2 + other.norm_m2 + delta * delta * (na * nb / n)
        return ChannelStats(
            self.tokens + other.tokens, n, self.sum + other.sum, self.sumsq + other.sumsq, mean, m2
        )

    def add_batch(
        self, sum_: np.ndarray, sumsq: np.ndarray, norms: np.ndarray, tokens: int
    ) -> None:
        """Fold one batch in place: ``norms`` is (samples, in) per-sample channel L2 norms."""
        self.tokens += tokens
        self.sum += sum_
        self.sumsq += sumsq
        nb = norms.shape[0]
        if nb == 0:
            return
        with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN are refused after the pass
            b_mean = norms.mean(axis=0)
            b_m2 = ((norms - b_mean) ** 2).sum(axis=0)
            na, n = self.samples, self.samples + nb
            delta = b_mean - self.norm_mean
            self.norm_mean += delta * (nb / n)
            self.norm_m2 += b_m2 + delta * delta * (na * nb / n)
        self.samples = n

    def to_array(self) -> tuple[np.ndarray, list[str]]:
        """Stack into the on-disk (rows, in) float64 array and its row names."""
        names = list(ROWS) + sorted(self.extra)
        rows = [getattr(self, r) for r in ROWS] + [self.extra[k] for k in sorted(self.extra)]
        return np.stack(rows).astype(np.float64), names

    @classmethod
    def from_array(
        cls, arr: np.ndarray, names: list[str], tokens: int, samples: int
    ) -> ChannelStats:
        by = dict(zip(names, arr, strict=True))
        extra = {k: v for k, v in by.items() if k not in ROWS}
        return cls(tokens, samples, *(by[r].copy() for r in ROWS), extra=extra)
