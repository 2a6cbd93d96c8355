"""The OpenAI-compatible HTTP API, shaped as vLLM's ``entrypoints/openai``: a router per API
(:mod:`.completions`, :mod:`.chat`, :mod:`.models`, :mod:`.personas`), the request and error
shapes in :mod:`.protocol`, generation shared in :mod:`.generate`, and any engine behind
:class:`~maskstore.serve.client.EngineClient` (in-process or Ray Serve's).

The ``model`` field of a request names the persona, as vLLM names LoRA adapters; the base
model's id means no mask. Errors have OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}`` everywhere, the framework's own refusals (404, 405, bodies that are no JSON)
included.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..catalog import Catalog
from ..client import EngineClient
from ..limits import BoundedBody, Limits, RateLimiter
from . import chat, completions, models, personas
from .generate import ServerState
from .protocol import ERROR_TYPES, ApiError, check_api_key, error_response, union_tag


def create_app(
    engine: EngineClient,
    catalog: Catalog,
    base_id: str,
    api_key: str | None = None,
    allow_runtime_loading: bool = False,
    open_source: Callable[[str], Any] | None = None,
    limits: Limits | None = None,
) -> FastAPI:
    """The FastAPI application.

    Args:
        engine: runs the model (an :class:`~maskstore.serve.client.EngineClient`).
        catalog: the personas served.
        base_id: the ``model`` name of the base model (no mask).
        api_key: when set, every route but ``/health`` needs ``Authorization: Bearer KEY``.
        allow_runtime_loading: enable ``/v1/personas/load`` and ``/v1/personas/unload``.
        open_source: opens a source named in ``/v1/personas/load`` (a
            :class:`~maskstore.serve.sources.SourcePolicy`'s ``open``; None: no sources).
        limits: the body's bounds and the request rate (:class:`~maskstore.serve.limits.Limits`;
            the header and connection bounds are the HTTP server's, set by
            :func:`maskstore.serve.serve`).
    """
    check_api_key(api_key)
    app = FastAPI(title="maskstore", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.maskstore = ServerState(engine, catalog, base_id, api_key, allow_runtime_loading,
                                      open_source)  # fmt: skip
    for api in (completions, chat, models, personas):
        app.include_router(api.router)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.param)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:  # logged by the server too
        return error_response(500, f"internal error ({type(e).__name__}); see the server log")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        # the framework's own refusals (no such route, a method a route does not take, a body
        # that is not JSON: bad UTF-8, nesting past the parser's depth) in OpenAI's shape
        text = {404: "no such route", 405: "method not allowed for this route"}.get(
            e.status_code, "malformed request body: send a JSON object"
        )
        return error_response(e.status_code if e.status_code in ERROR_TYPES else 400, text)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        # a union (str | list[str]) fails once per member: a validator's own error says most
        first = next((x for x in errors if x.get("type") == "value_error"), None)
        first = first or (errors[0] if errors else {})
        loc = [x for x in first.get("loc", ())[1:] if not union_tag(x)]
        where = ".".join(str(x) for x in loc) or None
        msg = first.get("msg", "malformed request body")
        return error_response(400, f"{where + ': ' if where else ''}{msg}", where)

    limits = limits or Limits()
    limiter = RateLimiter(limits.rate) if limits.rate else None

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if request.url.path == "/health":
            return await call_next(request)
        if api_key is not None:
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                return error_response(401, "missing or wrong API key (Authorization: Bearer KEY)")
        if limiter is not None:  # a client: the key when one is required, else the address
            who = "key" if api_key is not None else (request.client or ("?",))[0]
            wait = limiter.take(who)
            if wait:
                r = error_response(429, f"over the server's rate limit of {limits.rate:g} "
                                        "requests a second: retry after the Retry-After seconds")  # fmt: skip
                r.headers["retry-after"] = RateLimiter.retry_after(wait)
                return r
        return await call_next(request)

    app.add_middleware(BoundedBody, limits=limits)  # outermost: before any route
    return app


__all__ = ["ApiError", "check_api_key", "create_app", "error_response"]
