"""Serving personas over an OpenAI-compatible HTTP API (the ``serve`` extra: FastAPI, uvicorn).

``maskstore serve SOURCE...`` calls :func:`serve`; :func:`build_server` gives the pieces to run
in-process. One model, one :class:`~maskstore.runtime.MaskHandle` over a :class:`Catalog` of
every source, one :class:`Engine` thread for all forward passes, and the app of
:mod:`maskstore.serve.http`.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MaskstoreError
from .catalog import Catalog, PersonaCache
from .engine import Engine, Event, Request
from .limits import Limits
from .metrics import Metrics
from .sources import SourcePolicy


@dataclass(kw_only=True)
class ServeConfig:
    """What :func:`serve` runs (the CLI's options, by keyword)."""

    sources: Sequence[str]
    model: str | None = None  # default: the model the first source recorded
    revision: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    served_model_name: str | None = None  # the base model's id (default: the model's name)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allow_runtime_loading: bool = False
    cache_bytes: int = 1 << 30
    device_cache_bytes: int = 2 << 30  # packed masks in GPU memory (device backends)
    max_batch: int = 16
    batching: str = (
        "auto"  # "persona", "mixed" (any personas in one batch) or "auto" (docs/serve.md)
    )
    check_weights: bool = True
    limits: Limits = field(default_factory=Limits)  # body, headers, connections, rate
    bundle_roots: Sequence[str] = ()  # where run-time loading may open sources (none: nowhere)


@dataclass
class Server:
    """What :func:`build_server` made: the app plus the parts behind it."""

    app: Any
    engine: Engine
    catalog: Catalog
    base_id: str
    model_name: str


def open_sources(sources: Sequence[str]) -> Catalog:
    """Every source opened (lazily: metadata only) and joined into one catalog."""
    from ..store.opener import open_bundle

    if not sources:
        raise MaskstoreError("serve needs at least one bundle (a folder, a .zip, REPO@REF)")
    return Catalog((s, open_bundle(s)) for s in sources)


def build_engine(cfg: ServeConfig, log: Callable[[str], None] = lambda s: None) -> Server:
    """Open the sources, load the model (the recorded one by default), attach, start the
    engine; ``app`` is left None.

    Raises:
        MaskstoreError: a source that is not a bundle, bundles of different models, a model
            that is not the one the bundles were built on, ...
    """
    from ..models import load_model, recorded_model
    from ..runtime import MaskHandle

    catalog = open_sources(cfg.sources)
    name, revision = recorded_model(catalog.model_source, cfg.model, cfg.revision)
    log(f"loading model {name or 'embedded SmolLM2-135M-Instruct'}")
    model, tok = load_model(name, dtype=cfg.dtype, device=cfg.device, revision=revision)
    handle = MaskHandle(model, catalog, cache_bytes=0,
                        check_weights=None if cfg.check_weights else False,
                        device_cache_bytes=cfg.device_cache_bytes)  # fmt: skip
    handle.prepare()  # the first request does not pay for copying memory-mapped weights
    base_id = cfg.served_model_name or Path(name or "SmolLM2-135M-Instruct").name
    if base_id in catalog.personas:
        raise MaskstoreError(
            f"a persona is named {base_id!r} like the base model: pass another `served_model_name`"
        )
    engine = Engine(handle, tok, cache_bytes=cfg.cache_bytes, max_batch=cfg.max_batch,
                    batching=cfg.batching)  # fmt: skip
    return Server(None, engine, catalog, base_id, name or "SmolLM2-135M-Instruct")


def build_server(cfg: ServeConfig, log: Callable[[str], None] = lambda s: None) -> Server:
    """:func:`build_engine` plus the FastAPI app over it."""
    from .http import create_app

    policy = SourcePolicy(cfg.bundle_roots)  # checked before the model loads
    server = build_engine(cfg, log)
    server.app = create_app(server.engine, server.catalog, server.base_id, api_key=cfg.api_key,
                            allow_runtime_loading=cfg.allow_runtime_loading,
                            open_source=policy.open if policy else None,
                            limits=cfg.limits)  # fmt: skip
    return server


DRAIN_S = 10.0  # seconds running rows get to finish on SIGTERM


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), refused in one line when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MaskstoreError(
            f"cannot listen on {host}:{port}: {e.strerror}; pick another `port`"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    cfg: ServeConfig,
    log: Callable[[str], None] = lambda s: None,
    ready: Callable[[Server, str], None] | None = None,
) -> None:
    """Run the server until SIGINT/SIGTERM (in-flight requests get up to 10 s to finish)."""
    import uvicorn

    sock = bind(cfg.host, cfg.port)
    server = build_server(cfg, log)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    config = uvicorn.Config(server.app, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=DRAIN_S + 5,
                            **cfg.limits.uvicorn_config())  # fmt: skip
    userver = uvicorn.Server(config)
    _exit, draining = userver.handle_exit, threading.Event()

    def handle_exit(sig: int, frame: Any) -> None:
        # SIGTERM/SIGINT: the engine drains (503 for what has not started, running rows
        # finish for up to DRAIN_S) while uvicorn stops accepting and waits for the answers
        if not draining.is_set():
            draining.set()
            threading.Thread(target=server.engine.drain, args=(DRAIN_S,), daemon=True).start()
        _exit(sig, frame)

    userver.handle_exit = handle_exit  # type: ignore[method-assign]
    if ready is not None:
        _orig = userver.startup

        async def startup(sockets=None) -> None:
            await _orig(sockets=sockets)
            ready(server, url)

        userver.startup = startup  # type: ignore[method-assign]
    try:
        userver.run(sockets=[sock])
    finally:
        server.engine.close()
        sock.close()


def api_key_from_env(key: str | None) -> str | None:
    """``key``, else ``$MASKSTORE_API_KEY`` (None when neither is given). A key given empty
    stays empty, for :func:`maskstore.serve.http.create_app` to refuse: ``--api-key "$KEY"``
    with ``KEY`` unset must not serve without one."""
    return key if key is not None else os.environ.get("MASKSTORE_API_KEY")


__all__ = [
    "Catalog",
    "Engine",
    "Event",
    "Metrics",
    "PersonaCache",
    "Request",
    "ServeConfig",
    "Server",
    "build_engine",
    "build_server",
    "serve",
]
