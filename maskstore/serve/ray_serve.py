"""Scaling out on Ray Serve (the ``ray`` extra): the same OpenAI routes, personas multiplexed.

Two deployments:

- ``PersonaReplica`` (``num_replicas`` of them): each loads the model and runs an
  :class:`~maskstore.serve.engine.Engine`. A persona is a Ray *multiplexed model id*:
  ``get_persona`` (``@serve.multiplexed``) reads its masks into the replica's cache, and Ray
  routes each request to a replica that already holds its persona, loading it elsewhere only
  when none does (evicting least recently used personas past ``max_personas_per_replica``).
- ``Ingress`` (one, on the head node beside the one HTTP proxy): the FastAPI app of
  :mod:`maskstore.serve.http` over a :class:`RemoteEngine` that forwards each generation to
  ``replicas.options(multiplexed_model_id=PERSONA, stream=True)``. It loads the tokenizer only.
  A node lost takes only its model replicas: requests running there end in a 503, the rest
  go on (``tests/test_serve_ray.py`` removes a node mid-traffic).

``maskstore serve SOURCE... --ray-replicas N [--ray-address auto]`` deploys both; on a Ray
cluster, sources must be paths every node can read (or ``REPO@REF`` on shared storage), and
the address printed is the head node's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import Any

from ..errors import MaskstoreError
from . import ServeConfig
from .engine import Event, Request
from .metrics import Metrics

_REPLICAS: list = []  # the ingress replica's handle to the model replicas (set in its __init__)


# what the ingress counts itself (a replica's count of these would count twice)
_AT_INGRESS = ("maskstore_requests_total", "maskstore_generated_tokens_total")


class RemoteEngine:
    """What the HTTP app needs of an engine, answered by Ray replicas."""

    def __init__(self, tok, context: int, base_id: str) -> None:
        self.tok = tok
        self.context = context
        self.base_id = base_id
        self.metrics = Metrics()

    @property
    def replicas(self):
        """The model replicas' DeploymentHandle: the app and the ingress class reach the
        ingress actor in separate pickles, so they meet in this module's global."""
        if not _REPLICAS:
            raise MaskstoreError("the ingress has no model replicas yet")
        return _REPLICAS[0]

    def context_error(self, prompt: int, max_tokens: int) -> str:
        return (
            f"this model's context is {self.context} tokens; the prompt has {prompt} and "
            f"max_tokens asks for {max_tokens} more: shorten the prompt or lower max_tokens"
        )

    def submit(self, req: Request) -> None:
        # the base model is persona "" in every series, as the in-process engine counts it
        self.metrics.inc("maskstore_requests_total", persona=req.persona or "")
        asyncio.get_running_loop().create_task(self._pump(req))

    async def _pump(self, req: Request) -> None:
        payload = {"ids": req.ids, "max_tokens": req.max_tokens, "temperature": req.temperature,
                   "top_p": req.top_p, "stop": req.stop, "seed": req.seed,
                   "logprobs": req.logprobs}  # fmt: skip
        mid = req.persona if req.persona is not None else self.base_id
        try:
            gen = self.replicas.options(multiplexed_model_id=mid, stream=True).generate.remote(
                payload
            )
            async for ev in gen:
                if req.cancelled.is_set():
                    gen.cancel()
                    return
                if ev["kind"] == "delta":
                    n = len(self.tok(ev["text"], add_special_tokens=False)["input_ids"])
                    self.metrics.inc("maskstore_generated_tokens_total", n,
                                     persona=req.persona or "")  # fmt: skip
                snap = ev.pop("metrics", None)
                if snap is not None:  # the replica's loads, evictions, cache: by replica
                    self.metrics.absorb(str(ev.get("replica") or "?"), snap)
                req.sink(Event(**ev))
        except Exception as e:  # noqa: BLE001 - a replica failed: this request gets a 503
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            req.sink(Event("error", f"no replica could answer: {msg}", status=503))

    def load(self, persona: str) -> None:
        raise MaskstoreError("run-time loading is not available on Ray Serve deployments")

    unload = load


class _Loaded:
    """A persona held by a replica: Ray drops it (LRU) and ``__del__`` frees its masks."""

    def __init__(self, engine, persona: str) -> None:
        self.engine, self.persona = engine, persona

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.unload(self.persona)


def application(cfg: ServeConfig, num_replicas: int = 2, max_personas_per_replica: int = 8,
                replica_cpus: float = 1.0):  # fmt: skip
    """The Ray Serve application: ``serve.run(application(cfg))``.

    Args:
        cfg: what every replica serves (sources, model, dtype, ...).
        num_replicas: model replicas.
        max_personas_per_replica: personas a replica holds before Ray evicts the least used.
        replica_cpus: CPUs Ray reserves per replica.
    """
    from fastapi import FastAPI
    from ray import serve

    from ..models import load_tokenizer, model_folder, recorded_model
    from ..store.opener import open_bundle
    from . import build_engine, open_sources
    from .http import create_app

    @serve.deployment(num_replicas=num_replicas, ray_actor_options={"num_cpus": replica_cpus},
                      max_ongoing_requests=64)  # fmt: skip
    class PersonaReplica:
        def __init__(self, cfg: ServeConfig) -> None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            self.server = build_engine(cfg)
            ctx = serve.get_replica_context()
            rid = getattr(ctx, "replica_id", None)
            self.replica = str(getattr(rid, "unique_id", rid) or getattr(ctx, "replica_tag", ""))
            self._lock = threading.Lock()

        @serve.multiplexed(max_num_models_per_replica=max_personas_per_replica)
        async def get_persona(self, persona: str) -> _Loaded:
            await asyncio.to_thread(self.server.engine.load, persona)
            return _Loaded(self.server.engine, persona)

        async def generate(self, payload: dict):
            mid = serve.get_multiplexed_model_id()
            persona = None if mid == self.server.base_id else mid
            loaded = persona is not None and persona not in self.server.engine.cache
            if persona is not None:
                try:
                    await self.get_persona(persona)
                except Exception as e:  # noqa: BLE001 - this persona fails, the replica serves on
                    msg = " ".join(str(e).split())[:300]
                    yield {**dataclasses.asdict(Event("error", f"persona {persona!r} could not "
                           f"be loaded: {msg}", status=503)), "replica": self.replica}  # fmt: skip
                    return
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[Event] = asyncio.Queue()
            req = Request(persona, list(payload["ids"]), int(payload["max_tokens"]),
                          lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                          float(payload["temperature"]), float(payload["top_p"]),
                          list(payload["stop"]), payload["seed"],
                          payload.get("logprobs"))  # fmt: skip
            self.server.engine.submit(req)
            done = False
            try:
                while not done:
                    ev = await events.get()
                    done = ev.kind != "delta"
                    out = {**dataclasses.asdict(ev), "replica": self.replica,
                           "loaded": loaded and done}  # fmt: skip
                    if done:  # this replica's own figures ride on the last event
                        out["metrics"] = self.server.engine.metrics.snapshot(skip=_AT_INGRESS)
                    yield out
            finally:
                if not done:
                    req.cancel()

    # the ingress: tokenizer and persona names only, no model
    catalog = open_sources(cfg.sources)
    name, revision = recorded_model(catalog.model_source, cfg.model, cfg.revision)
    folder = model_folder(name, revision)
    tok = load_tokenizer(folder)
    context = int(json.loads((folder / "config.json").read_text()).get(
        "max_position_embeddings", 2048))  # fmt: skip
    base_id = cfg.served_model_name or Path(name or "SmolLM2-135M-Instruct").name
    remote = RemoteEngine(tok, context, base_id)
    api: FastAPI = create_app(remote, catalog, base_id, api_key=cfg.api_key,
                              open_source=open_bundle, limits=cfg.limits)  # fmt: skip

    # on the head node, beside the one HTTP proxy: losing another node never cuts the routes
    @serve.deployment(num_replicas=1, ray_actor_options={
        "num_cpus": 0, "resources": {"node:__internal_head__": 0.001}})  # fmt: skip
    @serve.ingress(api)
    class Ingress:
        def __init__(self, replicas: Any) -> None:
            # this class is pickled by value (with copies of the globals it names): reach the
            # module itself, as RemoteEngine (pickled by reference) does
            from maskstore.serve import ray_serve

            ray_serve._REPLICAS[:] = [replicas]

    return Ingress.bind(PersonaReplica.bind(cfg))


def run(cfg: ServeConfig, num_replicas: int, address: str | None = None,
        ready=None, log=lambda s: None) -> None:  # fmt: skip
    """Deploy on Ray (a local instance, or the cluster at ``address``) and block until
    SIGINT/SIGTERM, then shut the application down."""
    import signal

    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    stop = threading.Event()
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=max(2, os.cpu_count() or 2), log_to_driver=False,
                 include_dashboard=False)  # fmt: skip
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        # one HTTP proxy, on the head node: the address printed (nodes on one machine would
        # each bind the port otherwise)
        serve.start(proxy_location="HeadOnly", http_options={"host": cfg.host, "port": cfg.port})
        app = application(cfg, num_replicas=num_replicas,
                          replica_cpus=min(1.0, (os.cpu_count() or 2) / (num_replicas + 1)))  # fmt: skip
        log(f"deploying {num_replicas} replicas on Ray")
        serve.run(app, blocking=False, route_prefix="/", name="maskstore")
        ours = set() if address else _descendants(os.getpid())
        if ready is not None:
            ready(f"http://{cfg.host}:{cfg.port}")
        stop.wait()
    finally:
        ours = locals().get("ours") or set()
        serve.shutdown()
        ray.shutdown()
        for pid in ours:  # the local instance's agents outlive the raylet: end them
            with contextlib.suppress(Exception):
                os.kill(pid, signal.SIGKILL)


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from ``/proc``)."""
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(Exception):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out
