"""``maskstore serve``: personas over an OpenAI-compatible HTTP API."""

from __future__ import annotations

from typing import Annotated

import typer

from maskstore.errors import MaskstoreError

from ._common import emit_json, err_console, safe
from .app import DeviceOpt, JsonOpt, ModelOpt, app, choice

_ServeSourcesOpt = Annotated[
    list[str],
    typer.Argument(help="bundles to serve: folders, .zip files, REPO@REF (several join)"),
]
_ServeRevisionOpt = Annotated[str | None, typer.Option(help="with a Hub id: branch, tag or commit")]
_ServeDtypeOpt = Annotated[
    choice("float32", "bfloat16", "float16"), typer.Option(help="weights dtype")
]
_ServeServedModelNameOpt = Annotated[
    str | None, typer.Option(help="the base model's id in requests (default: its folder name)")
]
_ServeApiKeyOpt = Annotated[
    str | None,
    typer.Option(help="require 'Authorization: Bearer KEY' (default: $MASKSTORE_API_KEY)"),
]
_ServeAllowRuntimeLoadingOpt = Annotated[
    bool,
    typer.Option("--allow-runtime-loading", help="enable POST /v1/personas/load and unload"),
]
_ServeCacheBytesOpt = Annotated[
    int, typer.Option(help="bound of the packed masks held in memory (LRU by persona)")
]
_ServeDeviceCacheBytesOpt = Annotated[
    int,
    typer.Option(help="bound of the packed masks held in GPU memory (LRU by module mask)"),
]
_ServeBundleRootOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="with --allow-runtime-loading: a folder or s3:// prefix sources may come "
        "from (repeat; default: none, only served names load)"
    ),
]
_ServeMaxBodyOpt = Annotated[int, typer.Option(help="bytes a request body may have (413 past it)")]
_ServeHeaderTimeoutOpt = Annotated[
    float, typer.Option(help="seconds a connection has to send a request's headers")
]
_ServeMaxConnectionsOpt = Annotated[
    int, typer.Option(help="requests in flight at most (503 past it)")
]
_ServeMaxPerClientOpt = Annotated[
    int, typer.Option(help="open connections from one address at most")
]
_ServeRateLimitOpt = Annotated[
    float,
    typer.Option(help="requests a second per API key (else per address) at most; 0: no limit"),
]
_ServeBatchingOpt = Annotated[
    choice("auto", "persona", "mixed"),
    typer.Option(
        help="persona: one persona a batch; mixed: any personas in one batch; auto: mixed "
        "from as many personas as a mixed step wins here (measured at start), else persona"
    ),
]
_ServeRayReplicasOpt = Annotated[
    int,
    typer.Option(help="deploy N model replicas on Ray Serve, personas multiplexed (0: off)"),
]
_ServeRayAddressOpt = Annotated[
    str | None, typer.Option(help="with --ray-replicas: a Ray cluster ('auto'; default local)")
]
_ServeCheckWeightsOpt = Annotated[
    bool,
    typer.Option("--check-weights/--no-check-weights", help="check the weights' hash"),
]


@app.command()
def serve(
    sources: _ServeSourcesOpt,
    model: ModelOpt = None,
    revision: _ServeRevisionOpt = None,
    dtype: _ServeDtypeOpt = "float32",  # fmt: skip
    device: DeviceOpt = "cpu",
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on (0: any free port)")] = 8000,
    served_model_name: _ServeServedModelNameOpt = None,
    api_key: _ServeApiKeyOpt = None,
    allow_runtime_loading: _ServeAllowRuntimeLoadingOpt = False,
    bundle_root: _ServeBundleRootOpt = None,
    cache_bytes: _ServeCacheBytesOpt = 1 << 30,
    device_cache_bytes: _ServeDeviceCacheBytesOpt = 2 << 30,
    max_body_bytes: _ServeMaxBodyOpt = 1 << 20,
    header_timeout: _ServeHeaderTimeoutOpt = 10.0,
    max_connections: _ServeMaxConnectionsOpt = 1024,
    max_connections_per_client: _ServeMaxPerClientOpt = 64,
    rate_limit: _ServeRateLimitOpt = 0.0,
    max_batch: Annotated[int, typer.Option(help="requests decoded together at most")] = 16,
    batching: _ServeBatchingOpt = "auto",
    ray_replicas: _ServeRayReplicasOpt = 0,
    ray_address: _ServeRayAddressOpt = None,
    check_weights: _ServeCheckWeightsOpt = True,
    json_out: JsonOpt = False,
) -> None:
    """Serve personas over an OpenAI-compatible API: the request's model field names one."""
    from maskstore.serve import Limits, ServeConfig, api_key_from_env, serve
    from maskstore.serve.http import check_api_key
    from maskstore.serve.sources import SourcePolicy

    if not 0 <= port <= 65535:
        raise MaskstoreError(f"--port {port}: use 0-65535")
    if max_batch < 1 or min(cache_bytes, device_cache_bytes) < 0:
        raise MaskstoreError("--max-batch must be >= 1, --cache-bytes/--device-cache-bytes >= 0")
    limits = Limits(max_body=max_body_bytes, header_timeout=header_timeout,  # checked now,
                    max_connections=max_connections, max_per_client=max_connections_per_client,
                    rate=rate_limit)  # fmt: skip
    check_api_key(api_key_from_env(api_key))  # as these are: before the model loads
    SourcePolicy(bundle_root or ())
    given = dict(locals())  # the options by their ServeConfig names
    cfg = ServeConfig(**{k: given[k] for k in ServeConfig.__dataclass_fields__ if k in given})
    cfg.api_key, cfg.bundle_roots = api_key_from_env(api_key), tuple(bundle_root or ())

    def log(msg: str) -> None:
        err_console.print(safe(msg), highlight=False)

    def ready(server, url: str) -> None:
        if json_out:
            emit_json({"url": url, "model": server.base_id, "personas": server.catalog.personas})
        else:
            log(f"serving {len(server.catalog.personas)} personas and {server.base_id} at {url}/v1")

    if ray_replicas < 0:
        raise MaskstoreError("--ray-replicas must be >= 0")
    if ray_replicas and (allow_runtime_loading or bundle_root):
        raise MaskstoreError("--allow-runtime-loading is not available with --ray-replicas (the "
                             "replicas' sources are fixed when they deploy): drop one of them")  # fmt: skip
    if ray_replicas:
        from pathlib import Path

        from maskstore.models import recorded_model
        from maskstore.serve import open_sources
        from maskstore.serve.ray_serve import run

        if port == 0:
            raise MaskstoreError("--ray-replicas needs a fixed --port (Ray Serve binds it)")
        catalog = open_sources(sources)
        name, _ = recorded_model(catalog.model_source, model, revision)
        base_id = served_model_name or Path(name or "SmolLM2-135M-Instruct").name

        def ray_ready(url: str) -> None:
            if json_out:
                emit_json({"url": url, "model": base_id, "personas": catalog.personas})
            else:
                log(f"serving on Ray at {url}/v1")

        run(cfg, ray_replicas, address=ray_address, ready=ray_ready, log=log)
        return
    serve(cfg, log=log, ready=ready)
