"""Persona masks in a live model: attach a bundle, switch persona in place, mix personas in
one batch.

- :mod:`.handle`: :class:`MaskHandle` and :func:`attach` (base values, the mask caches, switching,
  mixed blocks);
- :mod:`.kernels`: the device kernels behind them, one backend chosen per device (numba on CPU,
  Triton on CUDA, plain torch ops anywhere; ``MASKSTORE_BACKEND`` forces one);
- :mod:`._switch` · :mod:`._mixed`: the numba CPU kernels (switching; the fused mixed product).
"""

from __future__ import annotations

from .handle import CacheInfo, MaskHandle, WeightsWarning, attach

__all__ = ["CacheInfo", "MaskHandle", "WeightsWarning", "attach"]
