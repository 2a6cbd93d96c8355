"""What one client may cost the server, enforced below the routes.

- **Body**: at most ``max_body`` bytes, counted as they arrive whatever the framing (a
  ``Content-Length`` over the bound is refused before a byte is read, a chunked body the moment
  it passes it: 413), and read within ``body_timeout`` seconds (408).
- **Headers**: the HTTP stack is pinned to h11 (httptools, which ``uvicorn[standard]`` brings,
  bounds neither header size nor count): at most ``header_bytes`` of request line and headers
  (larger: 400 and the connection closed), and they must arrive within ``header_timeout``
  seconds of the connection opening or of the previous response (else the connection is
  closed: a client trickling a byte at a time holds a slot for that long at most).
- **Connections**: at most ``max_connections`` requests in flight (503 past it) and
  ``max_per_client`` open connections from one address (closed at once past it).
- **Request rate** (optional): at most ``rate`` requests a second per client, in bursts of up
  to ``max(1, rate)`` (a token bucket): a client is the API key it presents when the server
  requires one (every holder of a key shares its rate), else its address. Past it: 429 with
  ``Retry-After``. ``/health`` is never limited.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Limits:
    max_body: int = 1 << 20
    body_timeout: float = 30.0
    header_bytes: int = 32 << 10
    header_timeout: float = 10.0
    max_connections: int = 1024
    max_per_client: int = 64
    rate: float = 0.0  # requests a second per client; 0: no limit

    def __post_init__(self) -> None:
        from ..errors import MaskstoreError

        if min(self.max_body, self.header_bytes, self.max_connections, self.max_per_client) < 1:
            raise MaskstoreError("--max-body-bytes, --max-connections and "
                                 "--max-connections-per-client must be >= 1")  # fmt: skip
        if not (0 < self.header_timeout <= 3600 and 0 < self.body_timeout <= 3600):
            raise MaskstoreError("--header-timeout must be in (0, 3600] seconds")
        if not (self.rate == 0 or 1e-3 <= self.rate <= 1e6):  # NaN fails both
            raise MaskstoreError("--rate-limit must be 0 (no limit) or 0.001-1000000 requests/s")

    def uvicorn_config(self) -> dict[str, Any]:
        """The ``uvicorn.Config`` arguments that enforce the header and connection bounds."""
        return {
            "http": protocol(self),
            "h11_max_incomplete_event_size": self.header_bytes,
            "limit_concurrency": self.max_connections,
        }


def _error(status: int, message: str) -> list[dict]:
    import json

    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": status}}).encode()  # fmt: skip
    return [
        {"type": "http.response.start", "status": status,
         "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                     (b"content-length", str(len(body)).encode())]},
        {"type": "http.response.body", "body": body},
    ]  # fmt: skip


class RateLimiter:
    """A token bucket per client: ``rate`` tokens a second up to ``max(1, rate)``, a request
    takes one. At most ``clients`` buckets are kept (least recently seen dropped first), so
    many addresses cannot grow it without bound."""

    def __init__(self, rate: float, clients: int = 1 << 16) -> None:
        self.rate, self.capacity, self.clients = rate, max(1.0, rate), clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when

    def take(self, client: str, now: float | None = None) -> float:
        """0.0 when ``client`` may go on (a token taken), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        tokens, then = self._buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self._buckets[client] = (tokens - 1 if wait == 0 else tokens, now)
        while len(self._buckets) > self.clients:
            self._buckets.popitem(last=False)
        return wait

    @staticmethod
    def retry_after(wait: float) -> str:
        """``wait`` as a ``Retry-After`` header's whole seconds (at least 1)."""
        return str(max(1, math.ceil(wait)))


DISCONNECTED = "maskstore_disconnected"  # scope["state"] key: an asyncio.Event set on disconnect


class BoundedBody:
    """ASGI middleware: the request body read up front within its byte and time bounds, then
    handed to the app. After the body only a disconnect can come from the client: a watcher
    waits for it, sets ``scope["state"][DISCONNECTED]`` (a route polls it to stop work for a
    client that left) and answers the app's later ``receive`` calls with it."""

    def __init__(self, app: Any, limits: Limits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        bound = self.limits.max_body
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > bound):
            return await self._refuse(send, 413, f"request body over {bound} bytes")
        chunks, total = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                return await self._refuse(send, 408, "request body not received in time")
            if msg["type"] == "http.disconnect":
                return None  # the client left before sending its body
            part = msg.get("body", b"")
            total += len(part)
            if total > bound:
                return await self._refuse(send, 413, f"request body over {bound} bytes")
            chunks.append(part)
            if not msg.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        scope.setdefault("state", {})[DISCONNECTED] = gone
        watcher = asyncio.create_task(watch())
        try:
            return await self.app(scope, replay, send)
        finally:
            watcher.cancel()

    @staticmethod
    async def _refuse(send: Any, status: int, message: str) -> None:
        for msg in _error(status, message):
            await send(msg)


def protocol(limits: Limits) -> type:
    """uvicorn's h11 protocol with a header deadline and a per-address connection bound."""
    from uvicorn.protocols.http.h11_impl import H11Protocol  # the serve extra

    open_by: Counter[str] = Counter()

    class Bounded(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._who = (self.client or ("?", 0))[0]
            open_by[self._who] += 1
            if open_by[self._who] > limits.max_per_client:
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(limits.header_timeout, self._late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _late(self) -> None:
            self._deadline = None
            if (self.cycle is None or self.cycle.response_complete) and not (
                self.transport.is_closing()
            ):
                self.transport.close()  # no complete request head in time

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request's headers arrived

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers, in time too

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            who = getattr(self, "_who", None)
            if who is not None:
                open_by[who] -= 1
                if open_by[who] <= 0:
                    del open_by[who]
            super().connection_lost(exc)

    return Bounded
