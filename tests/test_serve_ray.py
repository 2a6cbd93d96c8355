"""``maskstore serve --ray-replicas 2`` on a local Ray instance (2 CPUs): the same OpenAI
routes, each persona a multiplexed model id, so once a persona is loaded its requests go to a
replica that holds it (none loads it again), and every answer equals the single-process
engine's."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.slow, pytest.mark.server]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_serve_routes_personas_to_replicas_holding_them(tmp_path, tiny_dir, calib_files):
    from test_serve import _build

    from maskstore.models import load_model
    from maskstore.runtime import MaskHandle
    from maskstore.serve import Catalog, Engine, Request
    from maskstore.store.opener import open_bundle

    b = tmp_path / "b.zarr"
    personas = ["p0", "p1", "p2", "p3"]
    _build(tiny_dir, {p: calib_files["introvert" if i % 2 else "extrovert"]
                      for i, p in enumerate(personas)}, b)  # fmt: skip
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "maskstore.cli", "serve", str(b), "--ray-replicas", "2",
         "--port", str(port), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        doc = ""
        while not doc.rstrip().endswith("}"):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            doc += line
        url = json.loads(doc)["url"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [tiny_dir.name, *personas]

        def ask(model: str) -> tuple[str, str, str]:
            raw = client.completions.with_raw_response.create(
                model=model, prompt="Hello there", max_tokens=8, temperature=0
            )
            h = raw.headers
            return raw.parse().choices[0].text, h["x-maskstore-replica"], h["x-maskstore-loaded"]

        warm = {p: ask(p) for p in personas}  # each persona loads on some replica
        assert all(loaded == "1" for _, _, loaded in warm.values())
        time.sleep(3)  # replicas report the models they hold to Ray's routers
        got: dict[str, list[tuple[str, str, str]]] = {p: [] for p in personas}
        for _ in range(3):
            for p in personas:
                got[p].append(ask(p))
        threads = [threading.Thread(target=lambda p=p: got[p].append(ask(p))) for p in personas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for p, answers in got.items():
            # routed to a replica that already held the persona: nothing was loaded again
            assert all(loaded == "0" for _, _, loaded in answers), (p, answers)
            assert {t for t, _, _ in answers} == {warm[p][0]}, (p, answers)
        with pytest.raises(openai.NotFoundError):
            ask("nobody")
        # /metrics: the replicas' own figures, each with its replica label; the base model
        # is one name (persona "") in every series
        ask(tiny_dir.name)
        import re
        import urllib.request

        text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
        loads = re.findall(r'^maskstore_persona_loads_total\{persona="([^"]+)",replica="([^"]+)"\} '
                           r"(\S+)$", text, re.M)  # fmt: skip
        assert {p for p, _, _ in loads} == set(personas), text
        assert {r for _, r, _ in loads} <= {r for answers in got.values() for _, r, _ in answers}
        assert 'maskstore_requests_total{persona=""}' in text
        assert 'maskstore_generated_tokens_total{persona=""}' in text
        assert f'persona="{tiny_dir.name}"' not in text

        # the same answers as one process running the engine directly
        model, tok = load_model(str(tiny_dir))
        engine = Engine(MaskHandle(model, Catalog([("b", open_bundle(b))])), tok)
        try:
            for p in personas:
                out, done = [], threading.Event()
                ids = tok("Hello there")["input_ids"]

                def sink(ev, out=out, done=done):
                    out.append(ev.text) if ev.kind == "delta" else done.set()

                engine.submit(Request(p, ids, 8, sink, temperature=0.0))
                assert done.wait(60)
                assert "".join(out) == warm[p][0], p
        finally:
            engine.close()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert time.monotonic() - t0 < 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
