"""``POST /v1/personas/load`` and ``/unload``: run-time loading (``--allow-runtime-loading``),
sources opened by the server's policy (:mod:`maskstore.serve.sources`)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from ...errors import MaskstoreError
from .generate import ServerState, persona_of, state
from .protocol import ApiError, LoadBody

router = APIRouter()


def _loading(request: Request) -> ServerState:
    """The server's state, when it allows run-time loading (404 otherwise, as if the routes
    were not there)."""
    st = state(request)
    if not st.allow_runtime_loading:
        raise ApiError(404, "run-time loading is off: start the server with "
                            "--allow-runtime-loading")  # fmt: skip
    return st


@router.post("/v1/personas/load")
async def load(body: LoadBody, request: Request) -> dict:
    st = _loading(request)
    added: list[str] = []
    if body.source is not None:
        if st.open_source is None:
            raise ApiError(400, "this server opens no new sources: start it with "
                                "--bundle-root DIR", "source")  # fmt: skip
        bundle = None
        try:
            bundle = await asyncio.to_thread(st.open_source, body.source)
            added = st.catalog.add(body.source, bundle, clash={st.base_id})  # never the base's id
        except MaskstoreError as e:
            if bundle is not None:  # opened, then refused (another model): close it
                bundle.close()
                raise ApiError(400, "source refused: its personas are of another model "
                                    "than this server's", "source") from None  # fmt: skip
            raise ApiError(400, str(e), "source") from None
    names = [body.persona] if body.persona is not None else added
    if not names:
        raise ApiError(400, "give persona (a served name) or source (a bundle)")
    for p in names:
        persona_of(st, p)
        try:
            await asyncio.to_thread(st.engine.load, p)
        except MaskstoreError as e:
            raise ApiError(503, f"persona {p!r} could not be loaded: {e}") from None
    return {"loaded": names}


@router.post("/v1/personas/unload")
async def unload(body: LoadBody, request: Request) -> dict:
    st = _loading(request)
    if body.persona is None:
        raise ApiError(400, "give the persona to unload", "persona")
    if persona_of(st, body.persona) is None:
        raise ApiError(400, "the base model is not a persona: it cannot be unloaded", "persona")
    st.catalog.remove(body.persona)  # first: no read can start for it after this
    st.engine.unload(body.persona)  # then its next generation: reads in flight are dropped
    return {"unloaded": body.persona}
