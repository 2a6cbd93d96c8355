"""Generation over HTTP, shared by the completion and chat routers: the server's state, the
checks every sampling request passes, the engine's events collected into one answer or
streamed as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..catalog import Catalog
from ..client import EngineClient
from ..engine import Event
from ..engine import Request as GenRequest
from ..limits import DISCONNECTED
from .protocol import (
    ERROR_TYPES,
    MAX_STOPS,
    TOKENIZERS,
    ApiError,
    ChatBody,
    SamplingBody,
    public,
)


@dataclass
class ServerState:
    """What the routes share (``app.state.maskstore``)."""

    engine: EngineClient
    catalog: Catalog
    base_id: str
    api_key: str | None = None
    allow_runtime_loading: bool = False
    open_source: Callable[[str], Any] | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    tokenizing: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(TOKENIZERS))


def state(request: Request) -> ServerState:
    return request.app.state.maskstore


def persona_of(st: ServerState, model: str) -> str | None:
    """The persona a request's ``model`` names (None: the base model); 404 for others."""
    if model == st.base_id:
        return None
    if model not in st.catalog.personas:
        raise ApiError(404, f"The model `{model}` does not exist.", "model")
    return model


async def tokenize(st: ServerState, fn: Callable[[], Any]) -> Any:
    """``fn`` (the tokenizer's work) on a worker thread, a bounded number at once, so a large
    prompt never holds the event loop (and with it /health and every stream)."""
    async with st.tokenizing:
        return await asyncio.to_thread(fn)


def logprobs_doc(st: ServerState, entries: list, kind: str) -> dict:
    """Logprob entries ``(offset, id, logprob, top)`` in OpenAI's shape for ``kind``."""

    def text(t: int) -> str:
        return st.engine.tok.decode([t])

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


async def generate(st: ServerState, body: SamplingBody, ids: list[int], kind: str,
                   request: Request) -> Any:  # fmt: skip
    """Run ``body``'s ``n`` choices for prompt ``ids``: one JSON answer, or server-sent
    events with ``stream``."""
    if (field := body.unsupported()) is not None:
        raise ApiError(400, f"{field} is not supported by this server: leave it out", field)
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options needs stream: true", "stream_options")
    persona = persona_of(st, body.model)
    if not ids:
        raise ApiError(400, "the prompt is empty", "prompt")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS or any(not s or len(s) > 256 for s in stops):
        raise ApiError(400, f"stop: up to {MAX_STOPS} non-empty strings of <= 256 chars", "stop")
    room = st.engine.context - len(ids)
    max_tokens = body.max_tokens if body.max_tokens is not None else min(256, room)
    if room < 1 or len(ids) + max_tokens > st.engine.context:  # room for one token at least
        raise ApiError(400, st.engine.context_error(len(ids), max_tokens), "max_tokens")
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
        st.engine.submit(req)
    rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
    if body.stream:
        return StreamingResponse(
            _stream(
                st,
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
                i, ev = await asyncio.wait_for(events.get(), 0.05)
            except TimeoutError:
                if gone is not None and gone.is_set():  # the client left: stop decoding
                    return JSONResponse({}, status_code=499)
                continue
            if ev.kind == "delta":
                texts[i].append(ev.text)
                lps[i].extend(ev.logprobs or [])
            elif ev.kind == "error":
                raise ApiError(ev.status, public(ev))
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
        lp = None if k is None else logprobs_doc(st, lps[i], kind)
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
    st: ServerState,
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
        doc = None if lp is None else logprobs_doc(st, lp, kind)
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
                err = {"message": public(ev), "type": ERROR_TYPES.get(ev.status, "error"),
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
