"""The OpenAI-compatible HTTP API over an :class:`~maskstore.serve.engine.Engine` (FastAPI).

The ``model`` field of a request names the persona, as vLLM names LoRA adapters; the base
model's id means no mask. Errors have OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}``: 400 for a malformed body or a prompt past the context, 401 without the API key, 404
for an unknown persona, 503 when a persona cannot be loaded or the server is stopping.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MaskstoreError
from .catalog import Catalog
from .engine import Engine, Event
from .engine import Request as GenRequest
from .limits import DISCONNECTED, BoundedBody, Limits

MAX_STOPS = 4
TOKENIZERS = 4  # prompts tokenized at once, on worker threads (never on the event loop)
MAX_N = 8  # choices a request may ask for (each one a batch row)


def _unicode(s: str) -> str:
    """JSON may escape lone UTF-16 surrogates (``"\\ud800"``), which are no text a tokenizer
    can take: refused as a 400 rather than failing inside the tokenizer."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "holds a lone surrogate (\\ud800-\\udfff): send valid Unicode text"
        ) from None
    return s


Text = Annotated[str, AfterValidator(_unicode)]


def _union_tag(part: object) -> bool:
    """A part of a validation error's location that names a union member, not a field
    (``"str"``, ``"list[str]"``, ``"function-after[_unicode(), str]"``)."""
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"})


# OpenAI request fields this server does not implement: a request that sets one (to anything
# but its no-op value) is a 400 naming it, never a 200 that silently ignored it
UNSUPPORTED = {"response_format": None, "tools": None, "tool_choice": None, "functions": None,
               "function_call": None, "logit_bias": None, "presence_penalty": 0,
               "frequency_penalty": 0, "best_of": 1, "echo": False, "suffix": None,
               "parallel_tool_calls": None, "audio": None, "modalities": None,
               "prediction": None, "web_search_options": None}  # fmt: skip


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)

    def unsupported(self) -> str | None:
        """The first OpenAI field set that this server does not implement."""
        extra = self.model_extra or {}
        for name, noop in UNSUPPORTED.items():
            if name in extra and extra[name] is not None and extra[name] != noop:
                return name
        return None


class CompletionBody(_Sampling):
    prompt: Text | list[Text]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)  # each token's, and the k likeliest


class TextPart(BaseModel):
    """A content part of a chat message; only text parts are served (no images or audio)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[TextPart]

    def text(self) -> str:
        """The message's text: its parts joined (as OpenAI reads a list of text parts)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class LoadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    persona: Text | None = None
    source: Text | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "invalid_request_error",
          413: "invalid_request_error", 503: "service_unavailable", 500: "internal_error"}  # fmt: skip


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"message": message, "type": _TYPES.get(status, "error"), "param": param,
            "code": status}  # fmt: skip
    return JSONResponse({"error": body}, status_code=status)


def _public(ev: Event) -> str:
    """An engine error as a client may read it: a 500's cause stays in the server log (its
    text can name paths and every served persona)."""
    if ev.status >= 500 and ev.status != 503:
        return "generation failed (internal error); see the server log"
    return ev.text


def _printable(name: str) -> str:
    """A persona id as JSON can carry it: a source path that is no UTF-8 keeps its bytes as
    escapes (it was a 500 for /v1/models)."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def check_api_key(key: str | None) -> None:
    """Refuse an API key that is empty (a ``--api-key "$KEY"`` whose variable is unset) or
    that holds whitespace or control characters (a header cannot carry it reliably); None
    means no key."""
    if key is not None and (not key or not all(0x21 <= ord(c) <= 0x7E for c in key)):
        raise MaskstoreError(
            "the API key is empty or holds spaces or control characters: give one of visible "
            "ASCII characters, or none to serve without a key"
        )


def create_app(
    engine: Engine,
    catalog: Catalog,
    base_id: str,
    api_key: str | None = None,
    allow_runtime_loading: bool = False,
    open_source: Callable[[str], Any] | None = None,
    limits: Limits | None = None,
) -> FastAPI:
    """The FastAPI application.

    Args:
        engine: runs the model (its handle attaches ``catalog``).
        catalog: the personas served.
        base_id: the ``model`` name of the base model (no mask).
        api_key: when set, every route but ``/health`` needs ``Authorization: Bearer KEY``.
        allow_runtime_loading: enable ``/v1/personas/load`` and ``/v1/personas/unload``.
        open_source: opens a source named in ``/v1/personas/load`` (as the opener does).
        limits: the body's bounds (:class:`~maskstore.serve.limits.Limits`; the header and
            connection bounds are the HTTP server's, set by :func:`maskstore.serve.serve`).
    """
    check_api_key(api_key)
    limits = limits or Limits()
    app = FastAPI(title="maskstore", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

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
        return error_response(e.status_code if e.status_code in _TYPES else 400, text)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        # a union (str | list[str]) fails once per member: a validator's own error says most
        first = next((x for x in errors if x.get("type") == "value_error"), None)
        first = first or (errors[0] if errors else {})
        loc = [x for x in first.get("loc", ())[1:] if not _union_tag(x)]
        where = ".".join(str(x) for x in loc) or None
        msg = first.get("msg", "malformed request body")
        return error_response(400, f"{where + ': ' if where else ''}{msg}", where)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                return error_response(401, "missing or wrong API key (Authorization: Bearer KEY)")
        return await call_next(request)

    app.add_middleware(BoundedBody, limits=limits)  # outermost: bodies bounded before any route

    def logprobs_doc(entries: list, kind: str) -> dict:
        """Logprob entries ``(offset, id, logprob, top)`` in OpenAI's shape for ``kind``."""

        def text(t: int) -> str:
            return engine.tok.decode([t])

        if kind == "chat.completion":
            return {"content": [
                {"token": text(t), "logprob": lp, "bytes": list(text(t).encode()),
                 "top_logprobs": [{"token": text(a), "logprob": v, "bytes": list(text(a).encode())}
                                  for a, v in top]}
                for _, t, lp, top in entries]}  # fmt: skip
        return {"tokens": [text(t) for _, t, _, _ in entries],
                "token_logprobs": [lp for _, _, lp, _ in entries],
                "top_logprobs": [{text(a): v for a, v in top} for _, _, _, top in entries],
                "text_offset": [off for off, _, _, _ in entries]}  # fmt: skip

    def persona_of(model: str) -> str | None:
        if model == base_id:
            return None
        if model not in catalog.personas:
            raise ApiError(404, f"The model `{model}` does not exist.", "model")
        return model

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        handle = getattr(engine, "handle", None)
        if handle is not None and handle.backend != "numba":  # the device's mask LRU
            info = handle.device_cache_info()
            engine.metrics.set("maskstore_device_cache_bytes", info.bytes)
            engine.metrics.set("maskstore_device_cache_entries", info.entries)
            engine.metrics.set("maskstore_device_cache_evictions_total", info.evictions)
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        def card(mid: str, parent: str | None) -> dict:
            return {"id": mid, "object": "model", "created": created, "owned_by": "maskstore",
                    "root": base_id, "parent": parent}  # fmt: skip

        data = [card(base_id, None)] + [card(_printable(p), base_id) for p in catalog.personas]
        return {"object": "list", "data": data}

    tokenizing = asyncio.Semaphore(TOKENIZERS)

    async def tokenize(fn: Callable[[], Any]) -> Any:
        """``fn`` (the tokenizer's work) on a worker thread, a bounded number at once, so a
        large prompt never holds the event loop (and with it /health and every stream)."""
        async with tokenizing:
            return await asyncio.to_thread(fn)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "give one prompt per request", "prompt")
            prompt = prompt[0]
        ids = await tokenize(lambda: engine.tok(prompt, add_special_tokens=True)["input_ids"])
        return await _generate(body, ids, "text_completion", request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        if not getattr(engine.tok, "chat_template", None):
            raise ApiError(400, "the model's tokenizer has no chat template: use /v1/completions")
        msgs = [{"role": m.role, "content": m.text()} for m in body.messages]

        def chat_ids() -> list[int]:
            text = engine.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return engine.tok(text, add_special_tokens=False)["input_ids"]

        try:
            ids = await tokenize(chat_ids)
        except Exception as e:  # noqa: BLE001 - the template's own error, said in one line
            raise ApiError(400, f"chat template: {' '.join(str(e).split())[:300]}") from None
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await _generate(body, ids, "chat.completion", request)

    async def _generate(body: _Sampling, ids: list[int], kind: str, request: Request):
        if (field := body.unsupported()) is not None:
            raise ApiError(400, f"{field} is not supported by this server: leave it out", field)
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options needs stream: true", "stream_options")
        persona = persona_of(body.model)
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > 256 for s in stops):
            raise ApiError(
                400, f"stop: up to {MAX_STOPS} non-empty strings of <= 256 chars", "stop"
            )
        room = engine.context - len(ids)
        max_tokens = body.max_tokens if body.max_tokens is not None else min(256, room)
        if room < 1 or len(ids) + max_tokens > engine.context:  # room for one token at least
            raise ApiError(400, engine.context_error(len(ids), max_tokens), "max_tokens")
        if isinstance(body, ChatBody):
            if body.top_logprobs is not None and not body.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            k = (body.top_logprobs or 0) if body.logprobs else None
        else:
            k = body.logprobs
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()  # (choice index, event)

        def sink_of(i: int) -> Callable[[Event], None]:
            def sink(ev: Event) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (i, ev))
                except RuntimeError:  # the event loop is gone: nobody is listening
                    pass

            return sink

        # n choices are n rows; with a seed, choice i samples with seed + i (reproducible)
        reqs = [
            GenRequest(persona, list(ids), max_tokens, sink_of(i), body.temperature, body.top_p,
                       stops, None if body.seed is None else (body.seed + i) % 2**63, k)
            for i in range(body.n)
        ]  # fmt: skip
        for req in reqs:
            engine.submit(req)
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        if body.stream:
            return StreamingResponse(
                _stream(
                    reqs,
                    events,
                    rid,
                    kind,
                    body.model,
                    bool(body.stream_options and body.stream_options.include_usage),
                ),
                media_type="text/event-stream",
            )
        texts: list[list[str]] = [[] for _ in reqs]
        lps: list[list] = [[] for _ in reqs]
        done: dict[int, Event] = {}
        gone = request.scope.get("state", {}).get(DISCONNECTED)
        try:
            while len(done) < len(reqs):
                try:
                    i, ev = await asyncio.wait_for(events.get(), 0.25)
                except TimeoutError:
                    if gone is not None and gone.is_set():  # the client left: stop decoding
                        return JSONResponse({}, status_code=499)
                    continue
                if ev.kind == "delta":
                    texts[i].append(ev.text)
                    lps[i].extend(ev.logprobs or [])
                elif ev.kind == "error":
                    raise ApiError(ev.status, _public(ev))
                else:
                    done[i] = ev
        finally:
            for i, req in enumerate(reqs):
                if i not in done:
                    req.cancel()
        completion = sum(ev.completion_tokens for ev in done.values())
        usage = {"prompt_tokens": done[0].prompt_tokens, "completion_tokens": completion,
                 "total_tokens": done[0].prompt_tokens + completion}  # fmt: skip
        choices = []
        for i in range(len(reqs)):
            out, finish = "".join(texts[i]), done[i].finish_reason
            lp = None if k is None else logprobs_doc(lps[i], kind)
            if kind == "chat.completion":
                choices.append({"index": i, "message": {"role": "assistant", "content": out},
                                "logprobs": lp, "finish_reason": finish})  # fmt: skip
            else:
                choices.append({"index": i, "text": out, "logprobs": lp,
                                "finish_reason": finish})  # fmt: skip
        doc = {"id": rid, "object": kind, "created": int(time.time()), "model": body.model,
               "choices": choices, "usage": usage}  # fmt: skip
        headers = None
        if done[0].replica:
            headers = {"x-maskstore-replica": done[0].replica,
                       "x-maskstore-loaded": "1" if done[0].loaded else "0"}  # fmt: skip
        return JSONResponse(doc, headers=headers)

    async def _stream(
        reqs: list[GenRequest],
        events: asyncio.Queue,
        rid: str,
        kind: str,
        model: str,
        usage: bool = False,
    ) -> AsyncIterator[str]:
        chat = kind == "chat.completion"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(
            i: int,
            text: str | None,
            finish: str | None,
            first: bool = False,
            lp: list | None = None,
        ) -> str:
            doc = None if lp is None else logprobs_doc(lp, kind)
            if chat:
                delta = {"role": "assistant", "content": ""} if first else {}
                if text:
                    delta["content"] = text
                c = {"index": i, "delta": delta, "logprobs": doc, "finish_reason": finish}
            else:
                c = {"index": i, "text": text or "", "logprobs": doc, "finish_reason": finish}
            doc = {"id": rid, "object": obj, "created": int(time.time()), "model": model,
                   "choices": [c]}  # fmt: skip
            return f"data: {json.dumps(doc)}\n\n"

        ended: set[int] = set()
        finals: dict[int, Event] = {}
        try:
            if chat:
                for i in range(len(reqs)):
                    yield chunk(i, None, None, first=True)
            while len(ended) < len(reqs):
                i, ev = await events.get()
                if ev.kind == "delta":
                    yield chunk(i, ev.text, None, lp=ev.logprobs)
                elif ev.kind == "error":
                    err = {"message": _public(ev), "type": _TYPES.get(ev.status, "error"),
                           "param": None, "code": ev.status}  # fmt: skip
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    break
                else:
                    ended.add(i)
                    finals[i] = ev
                    yield chunk(i, None, ev.finish_reason)
            if usage and len(finals) == len(reqs):  # stream_options.include_usage: one more
                done = sum(e.completion_tokens for e in finals.values())  # chunk, as OpenAI's
                doc = {"id": rid, "object": obj, "created": int(time.time()), "model": model,
                       "choices": [], "usage": {"prompt_tokens": finals[0].prompt_tokens,
                                                "completion_tokens": done,
                                                "total_tokens": finals[0].prompt_tokens + done}}  # fmt: skip
                yield f"data: {json.dumps(doc)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for i, req in enumerate(reqs):
                if i not in ended:
                    req.cancel()  # the client went away (or a choice failed): free the slots

    @app.post("/v1/personas/load")
    async def load(body: LoadBody) -> dict:
        if not allow_runtime_loading:
            raise ApiError(404, "run-time loading is off: start the server with "
                                "--allow-runtime-loading")  # fmt: skip
        added: list[str] = []
        if body.source is not None:
            if open_source is None:
                raise ApiError(400, "this server opens no new sources: start it with "
                                    "--bundle-root DIR", "source")  # fmt: skip
            bundle = None
            try:
                bundle = await asyncio.to_thread(open_source, body.source)
                added = catalog.add(body.source, bundle, clash={base_id})  # never the base's id
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
            persona_of(p)
            try:
                await asyncio.to_thread(engine.load, p)
            except MaskstoreError as e:
                raise ApiError(503, f"persona {p!r} could not be loaded: {e}") from None
        return {"loaded": names}

    @app.post("/v1/personas/unload")
    async def unload(body: LoadBody) -> dict:
        if not allow_runtime_loading:
            raise ApiError(404, "run-time loading is off: start the server with "
                                "--allow-runtime-loading")  # fmt: skip
        if body.persona is None:
            raise ApiError(400, "give the persona to unload", "persona")
        if persona_of(body.persona) is None:
            raise ApiError(400, "the base model is not a persona: it cannot be unloaded", "persona")
        catalog.remove(body.persona)  # first: no read can start for it after this
        engine.unload(body.persona)  # then its next generation: reads in flight are dropped
        return {"unloaded": body.persona}

    return app
