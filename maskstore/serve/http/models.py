"""``GET /v1/models``, ``/health`` and ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from .generate import state
from .protocol import printable

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    engine = state(request).engine
    handle = getattr(engine, "handle", None)
    if handle is not None and handle.backend != "numba":  # the device's mask LRU
        info = handle.device_cache_info()
        engine.metrics.set("maskstore_device_cache_bytes", info.bytes)
        engine.metrics.set("maskstore_device_cache_entries", info.entries)
        engine.metrics.set("maskstore_device_cache_evictions_total", info.evictions)
    return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: Request) -> dict:
    st = state(request)

    def card(mid: str, parent: str | None) -> dict:
        return {"id": mid, "object": "model", "created": st.created, "owned_by": "maskstore",
                "root": st.base_id, "parent": parent}  # fmt: skip

    data = [card(st.base_id, None)] + [card(printable(p), st.base_id) for p in st.catalog.personas]
    return {"object": "list", "data": data}
