"""The kernels behind switching and mixed batches, one backend chosen per device (as vLLM's
punica selector or PEFT's dispatch list choose theirs).

| backend | default on | switch (``W = W0 * G``) | mixed batch (``y = x (W * G_p)^T``) |
| --- | --- | --- | --- |
| ``numba`` | CPU tensors | :mod:`.._switch` (delta writes over packed words) | :mod:`.._mixed` (fused) |
| ``triton`` | CUDA, when Triton imports | :func:`.triton_ops.gate` (one fused pass) | :func:`.triton_ops.sgmv` |
| ``torch`` | any other device | :func:`.torch_ops.gate` (row blocks, no host syncs) | :func:`.torch_ops.sgmv` |

``MASKSTORE_BACKEND=numba|torch|triton`` forces one: the device backends run on CPU tensors
too (Triton under its interpreter, ``TRITON_INTERPRET=1`` set before the first import), which
is how CI checks them without a GPU. Every device backend implements the same two functions:

- ``gate(w, base, cur, new, gamma, same_gamma)``: rewrite ``w`` (out, in) as ``base * G_new`` where
  ``G = M + gamma (1 - M)`` from the packed mask ``new`` (out, ceil(in/8)) uint8 on ``w``'s
  device (None: every weight kept, ``w = base``); ``cur`` is the packed mask ``w`` holds now
  (None: the base weights) and ``same_gamma`` whether it was gated with this ``gamma``, which
  lets a backend skip the weights whose gate does not change.
  Gating multiplies (``-0.0`` stays ``-0.0``), so the result is bitwise ``torch.mul(base, G)``.
- ``sgmv(x, w, masks, gamma, seg_start, seg_slot)``: rows ``seg_start[s]:seg_start[s+1]`` of
  ``x`` (m, in) times ``(w * G_p)^T`` with ``p = masks[seg_slot[s]]`` (a slot of -1: the base
  weight); ``masks`` (slots, out, ceil(in/8)) uint8. Each row's output is computed the same way
  whatever its batch-mates (no split-K, no tuning on the batch).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from ...errors import MaskstoreError

BACKENDS = ("numba", "torch", "triton")
ENV = "MASKSTORE_BACKEND"


def forced() -> str | None:
    """The backend ``MASKSTORE_BACKEND`` names (None when unset), checked."""
    name = os.environ.get(ENV, "").strip()
    if not name:
        return None
    if name not in BACKENDS:
        raise MaskstoreError(
            f"{ENV}={name[:40]!r} is not a backend: use one of {', '.join(BACKENDS)} "
            "(or unset it to choose by device)"
        )
    return name


def triton_usable(device_type: str) -> bool:
    """Whether Triton can run kernels on tensors of ``device_type`` here: CUDA with Triton
    installed, or any tensors under the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def select(device: Any) -> str:
    """The backend for weights on ``device`` (a ``torch.device`` or its type name)."""
    kind = getattr(device, "type", device)
    name = forced()
    if name == "numba" and kind != "cpu":
        raise MaskstoreError(
            f"{ENV}=numba runs on CPU tensors only, and these weights are on {kind}: "
            "use torch or triton"
        )
    if name == "triton" and not triton_usable(kind):
        raise MaskstoreError(
            f"{ENV}=triton cannot run on {kind} tensors here: install Triton "
            "(pip install 'maskstore[triton]') and, without a GPU, set TRITON_INTERPRET=1 "
            "before Python starts"
        )
    if name is not None:
        return name
    if kind == "cpu":
        return "numba"
    return "triton" if triton_usable(kind) else "torch"


def get(name: str) -> ModuleType:
    """The module implementing ``gate`` and ``sgmv`` for a device backend."""
    if name == "torch":
        from . import torch_ops

        return torch_ops
    if name == "triton":
        from . import triton_ops

        return triton_ops
    raise MaskstoreError(f"{name!r} is not a device backend (torch or triton)")
