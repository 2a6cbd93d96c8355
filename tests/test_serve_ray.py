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


def _serve_on_ray(bundle, *extra: str) -> tuple[subprocess.Popen, str]:
    """``maskstore serve BUNDLE --ray-replicas 2 ...``; the process and its URL (killed if it
    never prints its document)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "maskstore.cli", "serve", str(bundle), "--ray-replicas", "2",
         "--port", str(_free_port()), "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    doc = ""
    try:
        while not doc.rstrip().endswith("}"):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            doc += line
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, json.loads(doc)["url"]


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
    proc, url = _serve_on_ray(b)
    try:
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


def _reference(tiny_dir, bundle, personas: list[str], prompt: str, n: int) -> dict[str, str]:
    """Each persona's greedy text from one process running the engine directly."""
    from maskstore.models import load_model
    from maskstore.runtime import MaskHandle
    from maskstore.serve import Catalog, Engine, Request
    from maskstore.store.opener import open_bundle

    model, tok = load_model(str(tiny_dir))
    engine = Engine(MaskHandle(model, Catalog([("b", open_bundle(bundle))])), tok)
    out: dict[str, str] = {}
    try:
        for p in personas:
            parts, done = [], threading.Event()

            def sink(ev, parts=parts, done=done):
                parts.append(ev.text) if ev.kind == "delta" else done.set()

            engine.submit(Request(p, tok(prompt)["input_ids"], n, sink, temperature=0.0))
            assert done.wait(60)
            out[p] = "".join(parts)
    finally:
        engine.close()
    return out


def test_ray_serve_across_two_nodes_loses_one_without_a_wrong_answer(tmp_path, tiny_dir,
                                                                     calib_files, monkeypatch):  # fmt: skip
    """Two Ray nodes on one machine (``ray.cluster_utils.Cluster``), a model replica on each,
    personas multiplexed over both. The worker node is removed mid-traffic: requests caught on
    it end in an error (OpenAI's shape, never a 200 with other text), every 200 answer is the
    persona's own, and every persona is answered again by the surviving node."""
    from ray.cluster_utils import Cluster
    from test_serve import _build

    b = tmp_path / "b.zarr"
    personas = ["p0", "p1", "p2", "p3"]
    _build(tiny_dir, {p: calib_files["introvert" if i % 2 else "extrovert"]
                      for i, p in enumerate(personas)}, b)  # fmt: skip
    want = _reference(tiny_dir, b, personas, "Hello there", 8)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # the nodes' processes inherit it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    proc = None
    try:
        worker = cluster.add_node(num_cpus=1)
        proc, url = _serve_on_ray(b, "--ray-address", cluster.address)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)

        def ask(p: str) -> tuple[str, str | None]:
            """("ok", text, replica), or ("error", status, body) (status None: no connection)."""
            try:
                raw = client.completions.with_raw_response.create(
                    model=p, prompt="Hello there", max_tokens=8, temperature=0
                )
            except openai.APIStatusError as e:
                return ("error", e.status_code, e.body)
            except openai.APIConnectionError:
                return ("error", None, None)
            return ("ok", raw.parse().choices[0].text, raw.headers["x-maskstore-replica"])

        # personas spread over both replicas (a replica per node)
        replicas: set[str] = set()
        deadline = time.monotonic() + 120
        while len(replicas) < 2:
            assert time.monotonic() < deadline, replicas
            for p in personas:
                kind, text, replica = ask(p)
                assert kind == "ok" and text == want[p], (p, kind, text)
                replicas.add(replica)
        # traffic from 4 clients while the worker node goes away
        answers: list[tuple] = []
        stop = threading.Event()

        def client_loop(p: str) -> None:
            while not stop.is_set():
                answers.append((p, *ask(p)))

        threads = [threading.Thread(target=client_loop, args=(p,)) for p in personas]
        for t in threads:
            t.start()
        time.sleep(2)
        cluster.remove_node(worker, allow_graceful=False)
        time.sleep(8)
        stop.set()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)  # nothing hangs
        oks = [(p, text) for p, kind, text, _ in answers if kind == "ok"]
        assert oks and all(text == want[p] for p, text in oks)  # no wrong answer, ever
        errors = [(status, body) for _, kind, status, body in answers if kind == "error"]
        assert all(isinstance(body, dict) and "message" in body for _, body in errors), errors
        # afterwards every persona is answered again, by the node that is left
        deadline, left = time.monotonic() + 180, set(personas)
        after: set[str] = set()
        while left:
            assert time.monotonic() < deadline, (left, answers[-8:])
            for p in sorted(left):
                kind, text, replica = ask(p)
                if kind == "ok":
                    assert text == want[p], (p, text)
                    after.add(replica)
                    left.discard(p)
            time.sleep(0.5)
        assert len(after) == 1 and after <= replicas, (after, replicas)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        cluster.shutdown()
