"""``maskstore serve`` as a real process on loopback, driven by the official ``openai`` client:
routes, errors, streaming, 16 concurrent clients over 4 personas in mixed batches, lazy loading
and eviction in ``/metrics``, run-time loading, a persona that cannot be loaded, a client that
leaves mid-stream, and SIGTERM."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key"
PERSONAS = ("p0", "p1", "p2", "p3")
CHAT = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _build(model: Path, texts: dict[str, Path], out: Path) -> None:
    args = [a for p, t in texts.items() for a in ("--persona", f"{p}={t}")]
    r = subprocess.run([sys.executable, "-m", "maskstore.cli", "build", "--model", str(model),
                        "--max-tokens", "16", "--sparsity", "0.5", *args, "--out", str(out)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr


def start(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """``maskstore serve ... --port 0 --json``; returns the process and its URL."""
    p = subprocess.Popen(
        [sys.executable, "-m", "maskstore.cli", "serve", *map(str, args), "--port", "0", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip
    doc, deadline = "", time.monotonic() + 180
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"serve exited: {p.stderr.read()}")
        doc += line
        if line.startswith("}"):
            break
    from _helpers import check_cli_document

    check_cli_document("serve", 0, doc)
    return p, json.loads(doc)["url"]


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_dir, calib_files):
    """A server over two sources: a bundle with p0..p3 and a repository version holding p0 and
    ``solo`` (so p0 is served as ``SOURCE#p0`` from both), plus ``broken`` whose chunks are
    removed after start. The mask cache holds about two personas."""
    from _tiny import byte_tokenizer

    tmp = tmp_path_factory.mktemp("serve")
    model = tmp / "tiny"
    shutil.copytree(tiny_dir, model)
    tok = byte_tokenizer()
    tok.chat_template = CHAT
    tok.save_pretrained(model)
    texts = {p: calib_files["introvert" if i % 2 else "extrovert"] for i, p in enumerate(PERSONAS)}
    b = tmp / "b.zarr"
    _build(model, texts, b)
    other = tmp / "other.zarr"
    _build(model, {"p0": calib_files["introvert"], "solo": calib_files["extrovert"]}, other)
    repo = tmp / "repo"
    for args in (("init",), ("commit", str(other), "-m", "x"), ("tag", "v1")):
        r = subprocess.run([sys.executable, "-m", "maskstore.cli", *args, "--repo", str(repo)],
                           capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0, r.stderr
    broken = tmp / "broken.zarr"
    _build(model, {"broken": calib_files["introvert"]}, broken)
    roots = tmp / "roots"  # the only place run-time loading may open sources
    roots.mkdir()
    proc, url = start(b, f"{repo}@v1", broken, "--api-key", KEY, "--allow-runtime-loading",
                      "--bundle-root", roots, "--cache-bytes", "30000",
                      "--batching", "mixed")  # fmt: skip
    gone = [
        f for f in (broken / "personas" / "broken").rglob("*") if f.is_file() and "c" in f.parts
    ]
    assert gone
    for f in gone:  # its chunks vanish after start: metadata opened, masks not readable
        f.unlink()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    yield {"proc": proc, "url": url, "client": client, "b": b, "tmp": tmp, "repo": repo}
    stop(proc)


def metrics(url: str) -> str:
    req = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    return urllib.request.urlopen(req, timeout=30).read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    tags = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.escape(f"{name}{{{tags}}}" if tags else name) + r" (\S+)"
    m = re.search(rf"^{pat}$", text, re.M)
    return float(m.group(1)) if m else 0.0


def complete(client, model: str, prompt: str, n: int = 12, **kw) -> str:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, **kw)
    return r.choices[0].text


def test_models_lists_the_base_and_every_persona_by_source(served):
    ids = [m.id for m in served["client"].models.list().data]
    repo = f"{served['repo']}@v1"
    assert ids[0] == "tiny"
    assert set(ids[1:]) == {f"{served['b']}#p0", "p1", "p2", "p3", f"{repo}#p0", "solo", "broken"}


def test_completions_chat_and_streaming(served):
    c = served["client"]
    text = complete(c, "p1", "Hello there", n=10)
    assert text == complete(c, "p1", "Hello there", n=10)  # greedy: the same again
    assert text != complete(c, "tiny", "Hello there", n=10)  # the mask changes the output
    chunks = list(c.completions.create(model="p1", prompt="Hello there", max_tokens=10,
                                       temperature=0, stream=True))  # fmt: skip
    assert "".join(ch.choices[0].text for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"
    r = c.chat.completions.create(model="p2", messages=[{"role": "user", "content": "Hi"}],
                                  max_tokens=6, temperature=0)  # fmt: skip
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 6
    stream = c.chat.completions.create(model="p2", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=6, temperature=0, stream=True)  # fmt: skip
    assert (
        "".join(ch.choices[0].delta.content or "" for ch in stream) == r.choices[0].message.content
    )
    # sampling with a seed is reproducible; a stop string ends the text before it
    s1 = c.completions.create(model="p3", prompt="abc", max_tokens=8, temperature=1.0, seed=7)
    s2 = c.completions.create(model="p3", prompt="abc", max_tokens=8, temperature=1.0, seed=7)
    assert s1.choices[0].text == s2.choices[0].text
    full = complete(c, "p3", "abc", n=8)
    if len(full) > 3:
        cut = complete(c, "p3", "abc", n=8, stop=[full[2:4]])
        assert cut == full[: full.index(full[2:4])]


def test_openai_fields_not_implemented_are_a_400_naming_them(served):
    """response_format, tools, penalties, logit_bias... set to anything but their no-op value
    are a 400 naming the field (they were a 200 that ignored them); their no-op values and
    stream_options.include_usage are served (usage arrives as a last chunk, as OpenAI sends it)."""
    c = served["client"]
    msgs = [{"role": "user", "content": "Hi"}]
    for field, value in (("response_format", {"type": "json_object"}), ("presence_penalty", 0.5),
                         ("frequency_penalty", -1.0), ("logit_bias", {"1": 5}),
                         ("tools", [{"type": "function", "function": {"name": "f"}}]),
                         ("tool_choice", "auto")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="p1", messages=msgs, max_tokens=2, **{field: value})
        assert e.value.body["param"] == field and field in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="p1", prompt="x", max_tokens=2, echo=True)
    r = c.chat.completions.create(model="p1", messages=msgs, max_tokens=2, presence_penalty=0,
                                  frequency_penalty=0, temperature=0)  # fmt: skip
    assert r.choices[0].finish_reason
    chunks = list(c.chat.completions.create(model="p1", messages=msgs, max_tokens=3, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 3
    assert chunks[-1].usage.total_tokens == (chunks[-1].usage.prompt_tokens
                                             + chunks[-1].usage.completion_tokens)  # fmt: skip
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="p1", messages=msgs, max_tokens=2,
                                  stream_options={"include_usage": True})  # fmt: skip


def test_chat_content_parts_and_text_that_is_no_unicode(served):
    """Chat content given as text parts (as the OpenAI client may send it) reads as their joined
    text; a non-text part is a 400. Lone UTF-16 surrogates, which JSON can escape but no
    tokenizer takes, are a 400 in OpenAI's shape wherever text goes (they were a plain 500)."""
    c, url = served["client"], served["url"]

    def chat(content, **kw):
        r = c.chat.completions.create(model="p2", messages=[{"role": "user", "content": content}],
                                      max_tokens=6, temperature=0, **kw)  # fmt: skip
        return r.choices[0].message.content

    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo there"}]
    assert chat(parts) == chat("Hello there")
    with pytest.raises(openai.BadRequestError):
        chat([{"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}])
    bodies = [
        {"model": "p1", "prompt": "\ud800hi", "max_tokens": 2},
        {"model": "p1", "prompt": ["a\udfff"], "max_tokens": 2},
        {"model": "p1", "prompt": "hi", "max_tokens": 2, "stop": ["\udc00"]},
        {"model": "p1\ud800", "prompt": "hi", "max_tokens": 2},
    ]
    chats = [
        {"model": "p2", "messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2},
        {"model": "p2", "messages": [{"role": "user", "content": [{"type": "text",
                                                                    "text": "x\udbff"}]}]},
    ]  # fmt: skip
    for route, body in [("completions", b) for b in bodies] + [("chat/completions", b)
                                                               for b in chats]:  # fmt: skip
        raw = json.dumps(body).encode()  # json escapes the surrogates as \\uXXXX
        assert b"\\ud" in raw or b"\\udc" in raw or b"\\udf" in raw
        req = urllib.request.Request(f"{url}/v1/{route}", data=raw, headers={
            "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        err = json.loads(e.value.read())["error"]
        assert e.value.code == 400 and "surrogate" in err["message"], (body, err)
    assert complete(c, "p1", "Hello there", n=4)  # the server goes on


def test_n_choices_are_rows_of_their_own(served):
    """``n`` choices: greedy ones equal the single answer; sampled ones (choice i with seed
    + i) are reproducible and differ; streamed chunks carry their choice's index and join to
    the unstreamed choices; usage counts every choice's tokens."""
    c = served["client"]
    alone = c.completions.create(model="p1", prompt="Hello there", max_tokens=8, temperature=0)
    r = c.completions.create(model="p1", prompt="Hello there", max_tokens=8, temperature=0, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert all(ch.text == alone.choices[0].text for ch in r.choices)
    assert r.usage.completion_tokens == 3 * alone.usage.completion_tokens
    assert r.usage.prompt_tokens == alone.usage.prompt_tokens

    def sampled(**kw):
        return c.chat.completions.create(model="p2", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=8, temperature=1.0, seed=3, n=4, **kw)  # fmt: skip

    a, b = sampled(), sampled()
    texts = [ch.message.content for ch in a.choices]
    assert texts == [ch.message.content for ch in b.choices]  # reproducible
    assert len(set(texts)) > 1  # four seeds, not one
    by: dict[int, str] = {}
    finished = set()
    for ch in sampled(stream=True):
        for choice in ch.choices:
            by[choice.index] = by.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished.add(choice.index)
    assert [by[i] for i in range(4)] == texts and finished == {0, 1, 2, 3}


def test_logprobs_in_both_shapes_streamed_or_not(served):
    """``logprobs`` (completions: k alternatives; chat: ``logprobs`` + ``top_logprobs``):
    one entry a generated token, the greedy choice the likeliest of its alternatives, the
    alternatives sorted and probabilities; streamed chunks carry the same entries; none when
    not asked; ``top_logprobs`` alone is a 400."""
    import math

    c = served["client"]
    r = c.completions.create(model="p1", prompt="Hello there", max_tokens=8, temperature=0,
                             logprobs=3)  # fmt: skip
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == r.usage.completion_tokens or r.choices[0].finish_reason == "stop"
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        values = list(top.values())
        assert len(values) <= 3 and values == sorted(values, reverse=True)
        assert chosen <= 0 and math.isclose(chosen, values[0], abs_tol=1e-9)  # greedy: the top
        assert sum(math.exp(v) for v in values) <= 1 + 1e-9
    streamed = c.completions.create(model="p1", prompt="Hello there", max_tokens=8,
                                    temperature=0, logprobs=3, stream=True)  # fmt: skip
    got = [t for ch in streamed if ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert got == lp.tokens
    assert complete_choice(c).logprobs is None

    chat = c.chat.completions.create(model="p2", messages=[{"role": "user", "content": "Hi"}],
                                     max_tokens=6, temperature=0, logprobs=True,
                                     top_logprobs=2)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert content and len(content) <= chat.usage.completion_tokens
    for e in content:
        assert e.bytes == list(e.token.encode()) and len(e.top_logprobs) == 2
        assert math.isclose(e.logprob, e.top_logprobs[0].logprob, abs_tol=1e-9)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="p2", messages=[{"role": "user", "content": "Hi"}],
                                  max_tokens=4, top_logprobs=2)  # fmt: skip
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="p1", prompt="hi", max_tokens=4, logprobs=6)


def complete_choice(c):
    return c.completions.create(model="p1", prompt="Hello", max_tokens=4, temperature=0).choices[0]


def test_errors_have_openai_shapes(served):
    c, url = served["client"], served["url"]
    with pytest.raises(openai.NotFoundError):
        complete(c, "nobody", "hi")
    with pytest.raises(openai.NotFoundError):
        complete(c, "../../etc/passwd", "hi")  # a name that is a path is only a name
    for kw in ({"temperature": 5}, {"top_p": 0}, {"n": 9}, {"n": 0}, {"max_tokens": 10_000},
               {"stop": ["a", "b", "c", "d", "e"]}):  # fmt: skip
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="p1", prompt="hi", **{"max_tokens": 4, **kw})
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="p1", prompt="x" * 300, max_tokens=4)  # past the context
    assert "context" in str(e.value)
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert json.loads(urllib.request.urlopen(f"{url}/health").read())["status"] == "ok"
    for body in (b"{not json", b'{"model": "p1"}', b"[]"):
        req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={
            "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 400 and "error" in json.loads(e.value.read())
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:  # a 2 MiB body announced
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nAuthorization: Bearer " + KEY.encode() +
                     b"\r\nContent-Length: 2097152\r\n\r\n{")  # fmt: skip
        assert sock.recv(100).startswith(b"HTTP/1.1 413")


def test_sixteen_clients_over_four_personas_match_each_alone(served):
    """Every answer of 16 concurrent requests (4 personas, prompts of different lengths, so
    rows are padded and leave the batch at different steps) equals the same request alone."""
    c, url = served["client"], served["url"]
    names = ["p1", "p2", "p3", "tiny"]
    jobs = [(names[i % 4], "Tell me " + "more " * (i % 5), 4 + (i * 3) % 9) for i in range(16)]
    alone = [complete(c, m, p, n) for m, p, n in jobs]
    before = metrics(url)
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        together = list(ex.map(lambda j: complete(c, *j), jobs))
    assert together == alone
    after = metrics(url)
    batches = metric(after, "maskstore_batch_rows_count") - metric(
        before, "maskstore_batch_rows_count"
    )
    assert batches < 16  # requests were decoded together


def test_lazy_loading_and_eviction_show_in_metrics(served):
    c, url = served["client"], served["url"]
    m0 = metrics(url)
    assert metric(m0, "maskstore_persona_loads_total", persona="solo") == 0  # never asked for
    complete(c, "solo", "hi", n=2)
    m1 = metrics(url)
    assert metric(m1, "maskstore_persona_loads_total", persona="solo") == 1
    assert metric(m1, "maskstore_requests_total", persona="solo") == 1
    assert metric(m1, "maskstore_generated_tokens_total", persona="solo") >= 1
    for p in ("p1", "p2", "p3", "solo", "p1"):  # more than the cache holds: evictions, reloads
        complete(c, p, "hi", n=2)
    m2 = metrics(url)
    assert 0 < metric(m2, "maskstore_persona_cache_bytes") <= 30000
    assert sum(metric(m2, "maskstore_persona_evictions_total", persona=p) for p in
               ("p1", "p2", "p3", "solo")) >= 1  # fmt: skip
    assert metric(m2, "maskstore_persona_loads_total", persona="p1") >= 2  # reloaded on demand
    assert "maskstore_switch_seconds_bucket" in m2 and "maskstore_persona_load_seconds_sum" in m2


def test_a_persona_that_cannot_be_loaded_fails_alone(served):
    c = served["client"]
    with pytest.raises(openai.InternalServerError) as e:  # 503
        complete(c, "broken", "hi", n=2)
    assert e.value.status_code == 503 and "could not be loaded" in str(e.value)
    assert complete(c, "p2", "hi", n=3) == complete(c, "p2", "hi", n=3)  # others still serve
    assert served["proc"].poll() is None


def test_runtime_load_and_unload(served, tmp_path, calib_files):
    url, c = served["url"], served["client"]

    def post(route: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(f"{url}/v1/personas/{route}", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {KEY}",
                                              "Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    import zipfile

    from maskstore.serve.sources import REFUSED

    roots = served["tmp"] / "roots"
    extra = roots / "extra.zarr"
    _build(served["tmp"] / "tiny", {"late": calib_files["introvert"]}, extra)
    outside = tmp_path / "outside.zarr"
    shutil.copytree(extra, outside)
    (roots / "link.zarr").symlink_to(outside, target_is_directory=True)
    os.mkfifo(roots / "fifo.zip")
    with zipfile.ZipFile(roots / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zarr.json", b" " * (64 << 20))  # 64 MiB of metadata in a ~64 KiB zip
    with zipfile.ZipFile(roots / "bad.zip", "w") as z:
        z.writestr("zarr.json", b"{not json")
    assert post("load", {"source": str(extra)}) == (200, {"loaded": ["late"]})
    assert complete(c, "late", "hi", n=3)
    # every refusal is the same line: nothing tells what exists on the server's disk
    fd = len(os.listdir(f"/proc/{served['proc'].pid}/fd"))
    refused = [str(roots / "missing"), str(calib_files["introvert"]), str(outside), "/etc",
               str(roots / "link.zarr"), str(roots / "fifo.zip"), str(roots / "bomb.zip"),
               str(roots / "bad.zip"), f"{roots}/../outside.zarr",
               "zip://zarr.json::http://127.0.0.1:9/a.zip", "ftp://127.0.0.1:21/x",
               "tar://x::file:///etc/hosts", "reference://x", "http://127.0.0.1:9/b.zarr",
               "file:///etc", "s3://bucket/x", f"{served['repo']}@v1"]  # fmt: skip
    for source in refused:
        assert post("load", {"source": source}) == (400, {"error": {
            "message": REFUSED, "type": "invalid_request_error", "param": "source",
            "code": 400}}), source  # fmt: skip
    for _ in range(300):  # refused zips leave no file descriptor open
        assert post("load", {"source": str(roots / "bad.zip")})[0] == 400
    assert len(os.listdir(f"/proc/{served['proc'].pid}/fd")) <= fd
    assert post("load", {"persona": "nobody"})[0] == 404
    for source in ("x" * 100_000, "a/" * 3000 + "x", "s3://Bad_Bucket/x"):  # never a 500
        code, body = post("load", {"source": source})
        assert code == 400 and len(body["error"]["message"]) < 400, (code, body)
    assert post("unload", {"persona": "late"}) == (200, {"unloaded": "late"})
    with pytest.raises(openai.NotFoundError):
        complete(c, "late", "hi")
    assert post("load", {"bogus": 1})[0] == 400


def test_a_client_leaving_mid_stream_frees_its_slot(served):
    import http.client

    url = served["url"]
    host, port = url.removeprefix("http://").split(":")
    m0 = metric(metrics(url), "maskstore_generated_tokens_total", persona="p3")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    # four rows of 240 tokens: long enough that the server notices the client leave before
    # they end (the engine-level test below checks the cancel itself without a race)
    body = json.dumps({"model": "p3", "prompt": "go", "max_tokens": 240, "temperature": 0,
                       "stream": True, "n": 4})  # fmt: skip
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}",
                                                  "Content-Type": "application/json"})  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.readline()  # the first event
    conn.sock.close()
    conn.close()
    time.sleep(3)
    made = metric(metrics(url), "maskstore_generated_tokens_total", persona="p3") - m0
    assert made < 4 * 240  # the rows left the batch when their client did
    assert complete(served["client"], "p1", "hi", n=2) is not None


@pytest.mark.server
def test_sigterm_answers_every_request_in_flight(tmp_path, tiny_dir, calib_files):
    """SIGTERM with a batch decoding and more requests queued: running rows finish (200),
    queued ones get a 503 at once, none is cut without an answer, and the server exits; a
    non-streamed request whose client leaves stops decoding."""
    b = tmp_path / "b.zarr"
    _build(tiny_dir, {"a": calib_files["introvert"]}, b)
    # two rows at a time in the slower mixed kernel, 16 requests of 200 tokens: seconds of
    # work, so most requests are still queued when SIGTERM comes
    proc, url = start(b, "--max-batch", "2", "--batching", "mixed")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)

    def ask():
        try:
            r = client.completions.create(model="a", prompt="go", max_tokens=200, temperature=0)
            return r.choices[0].finish_reason
        except openai.APIStatusError as e:
            return e.status_code
        except openai.APIConnectionError:
            return "cut"

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        futs = [ex.submit(ask) for _ in range(16)]
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert time.monotonic() - t0 < 20
        got = [f.result(timeout=30) for f in futs]
    assert "cut" not in got, got
    assert set(got) <= {"length", "stop", 503} and 503 in got, got
    assert proc.returncode is not None


@pytest.mark.server
def test_a_client_leaving_a_non_streamed_request_stops_its_decoding(tmp_path, tiny_dir,
                                                                     calib_files):  # fmt: skip
    from urllib.parse import urlsplit

    b = tmp_path / "b.zarr"
    _build(tiny_dir, {"a": calib_files["introvert"]}, b)
    proc, url = start(b, "--batching", "mixed")  # the slower kernel: 240 tokens take a while
    host, port = urlsplit(url).hostname, urlsplit(url).port
    try:
        body = json.dumps({"model": "a", "prompt": "go", "max_tokens": 240, "temperature": 0,
                           "stop": None}).encode()  # fmt: skip
        s = __import__("socket").create_connection((host, port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
        time.sleep(0.1)
        s.close()  # the client leaves
        time.sleep(1.0)

        def tokens():
            req = urllib.request.Request(f"{url}/metrics")
            text = urllib.request.urlopen(req, timeout=30).read().decode()
            return metric(text, "maskstore_generated_tokens_total", persona="a")

        first = tokens()
        time.sleep(1.5)
        assert tokens() == first < 240  # no more tokens for nobody
    finally:
        stop(proc)


def test_serve_refuses_bad_input_in_one_line(tmp_path, tiny_dir, cli):
    code, _, err = cli("serve", tmp_path / "missing.zarr", "--port", "0")
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, err = cli("serve", tmp_path, "--port", "70000")
    assert code == 2 and "--port" in err
    code, _, err = cli("serve", tmp_path, "--batching", "../auto")
    assert code == 2 and "--batching" in err and "auto" in err
    code, _, err = cli("serve", tmp_path, "--device-cache-bytes", "-1")
    assert code == 2 and "--device-cache-bytes" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("serve", tmp_path, "--ray-replicas", "2", "--allow-runtime-loading")
    assert code == 2 and "--allow-runtime-loading" in err and len(err.strip().splitlines()) == 1
    for flag, value in (("--max-body-bytes", "0"), ("--header-timeout", "-1"),
                        ("--header-timeout", "1e9"), ("--max-connections", "0"),
                        ("--max-connections-per-client", "-5"), ("--rate-limit", "-1"),
                        ("--rate-limit", "nan"), ("--rate-limit", "inf"),
                        ("--rate-limit", "1e9")):  # fmt: skip
        code, _, err = cli("serve", tmp_path, flag, value)
        assert code == 2 and flag.split("-per")[0] in err and len(err.strip().splitlines()) == 1
    for bad in ("http://x", "s3://Bad_Bucket/x", str(tmp_path / "no-such-folder")):
        code, _, err = cli("serve", tmp_path, "--allow-runtime-loading", "--bundle-root", bad)
        assert code == 2 and "--bundle-root" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("key", ["", " ", "a b", "key\n", "k\x1b[31m"])
def test_an_empty_or_unprintable_api_key_is_refused_not_dropped(tmp_path, cli, monkeypatch, key):
    """``--api-key "$KEY"`` with KEY unset gives an empty key: the server refuses to start
    (it served without a key before), as it does for keys a header cannot carry; from
    ``$MASKSTORE_API_KEY`` too. Nothing is loaded first."""
    monkeypatch.delenv("MASKSTORE_API_KEY", raising=False)
    for args, env in ((["--api-key", key], None), ([], key)):
        if env is not None:
            monkeypatch.setenv("MASKSTORE_API_KEY", env)
        code, _, err = cli("serve", tmp_path / "missing.zarr", "--port", "0", *args)
        assert code == 2 and "API key" in err and len(err.strip().splitlines()) == 1, err


def test_a_cancelled_request_leaves_the_batch_at_the_next_step(tmp_path):
    """In-process and without a race: the client goes away (``cancel``) while its first token
    is being sent; the engine makes no further token for it, ends it without a ``done``, and
    keeps serving."""
    import threading

    from _tiny import byte_tokenizer, tiny_llama

    from maskstore import create_bundle
    from maskstore.modules import maskable_modules, model_fingerprint
    from maskstore.runtime import MaskHandle
    from maskstore.serve import Catalog, Engine, Request
    from maskstore.store.opener import open_bundle

    model = tiny_llama(seed=4)
    mods = maskable_modules(model)
    with create_bundle(tmp_path / "b", model_fingerprint(model, mods, hash_weights=True)):
        pass
    tok = byte_tokenizer()
    engine = Engine(MaskHandle(model, Catalog([("b", open_bundle(tmp_path / "b"))])), tok)
    try:
        events: list = []
        req: Request

        def sink(ev) -> None:  # on the engine thread, before its next step
            events.append((ev, len(req.out)))
            req.cancel()

        req = Request(None, tok("go")["input_ids"], 200, sink, temperature=0.0)
        engine.submit(req)
        other: list = []
        finished = threading.Event()
        engine.submit(Request(None, tok("hi")["input_ids"], 3,
                              lambda ev: (other.append(ev), ev.kind == "done" and finished.set()),
                              temperature=0.0))  # fmt: skip
        assert finished.wait(60)
        assert [e.kind for e, _ in events] == ["delta"]  # no done: it was cancelled
        assert len(req.out) == events[0][1] < 200  # and no token made after the cancel
    finally:
        engine.close()


def _three_personas(tmp_path: Path, rng, seed: int):
    """A tiny model with a handle on a bundle of random personas ``a``, ``b`` and ``c``, and
    its tokenizer, for in-process engine tests."""
    from _tiny import byte_tokenizer, tiny_llama

    from maskstore import create_bundle
    from maskstore.modules import maskable_modules, model_fingerprint
    from maskstore.runtime import MaskHandle
    from maskstore.serve import Catalog
    from maskstore.store.opener import open_bundle

    model = tiny_llama(seed=seed)
    mods = maskable_modules(model)
    with create_bundle(tmp_path / "b", model_fingerprint(model, mods, hash_weights=True)) as b:
        for p in ("a", "b", "c"):
            with b.persona_writer(p, method="t") as w:
                for n, m in mods.items():
                    w.write_mask(n, rng.random((m.out_features, m.in_features)) < 0.5)
    return MaskHandle(model, Catalog([("b", open_bundle(tmp_path / "b"))])), byte_tokenizer()


def test_requests_join_running_batches_with_the_tokens_they_get_alone(tmp_path, rng):
    """Continuous batching: requests submitted while a batch runs join it at a step boundary
    (any persona when the batch is mixed, new to it or the base model; its own persona in
    persona mode), and every request gets the tokens it gets alone. While a request that
    cannot join waits, none joins."""
    from _helpers import run_with_joiners

    from maskstore.serve import Engine

    handle, tok = _three_personas(tmp_path, rng, seed=5)
    cases = {
        "mixed": ([("a", "hello", 24), ("b", "hi there", 24)],
                  [("c", "x y", 6), (None, "q", 5), ("a", "more text", 4)], 3),
        "persona": ([("a", "hello", 24)], [("a", "more", 5), ("a", "x y z", 7)], 2),
        "waiting": ([("a", "hello", 24)], [("b", "hi", 5), ("a", "more", 5)], 0),
        "no joins": ([("a", "hello", 24)], [("a", "more", 5), ("a", "x y z", 7)], 0),
    }  # fmt: skip
    single = Engine(handle, tok, batching="persona", window_s=0.0)  # alone: no window to wait
    try:
        jobs = list(dict.fromkeys(j for first, later, _ in cases.values() for j in first + later))
        by_job = {j: run_with_joiners(single, tok, [j], [], 3)[0] for j in jobs}
    finally:
        single.close()
    for case, (first, later, joins) in cases.items():
        mode = case if case in ("mixed", "persona") else "persona"
        engine = Engine(handle, tok, batching=mode, window_s=0.1)
        if case == "no joins":  # as for a model whose KV cache cannot be joined
            engine.joins = False
        try:
            for p in ("a", "b", "c"):
                engine.load(p)
            alone = [by_job[j] for j in first + later]
            before = engine.metrics.get("maskstore_joined_rows_total")
            assert run_with_joiners(engine, tok, first, later, 3) == alone, case
            assert engine.metrics.get("maskstore_joined_rows_total") - before == joins, case
        finally:
            engine.close()


def test_a_failing_step_fails_every_row_joined_or_not_and_the_engine_goes_on(tmp_path, rng):
    """A forward pass that raises mid-batch sends one 500 to each request still running in
    it, those that joined included, and none to those that had ended; the next batch runs."""
    import threading

    from maskstore.serve import Engine, Request

    handle, tok = _three_personas(tmp_path, rng, seed=7)
    engine = Engine(handle, tok, window_s=0.1, mix_from=2)
    calls, real = [0], engine._forward

    def flaky(*a, **k):
        calls[0] += 1
        if calls[0] == 8:
            raise RuntimeError("device lost")
        return real(*a, **k)

    engine._forward = flaky
    events: dict[int, list] = {}
    over = {i: threading.Event() for i in range(4)}

    def sink(i):
        def f(ev):
            events.setdefault(i, []).append(ev)
            if ev.kind in ("done", "error"):
                over[i].set()
            if i == 0 and ev.kind == "delta" and len(events[0]) == 2:
                submit(2, "b", 50)  # joins at the next step boundary
                submit(3, "c", 50)

        return f

    def submit(i, persona, n):
        ids = tok("hello")["input_ids"]
        engine.submit(Request(persona, ids, n, sink(i), temperature=0.0))

    try:
        for p in ("a", "b", "c"):
            engine.load(p)
        submit(0, "a", 50)
        submit(1, None, 1)  # ends at its first token, before the failure
        assert all(e.wait(60) for e in over.values())
        ends = {i: [e.kind for e in evs if e.kind != "delta"] for i, evs in events.items()}
        assert ends == {0: ["error"], 1: ["done"], 2: ["error"], 3: ["error"]}, ends
        assert all(evs[-1].status == 500 and "device lost" in evs[-1].text
                   for i, evs in events.items() if i != 1)  # fmt: skip
        again = threading.Event()
        engine.submit(Request("a", tok("hi")["input_ids"], 3,
                              lambda ev: ev.kind == "done" and again.set(), temperature=0.0))  # fmt: skip
        assert again.wait(60)
    finally:
        engine.close()


def test_a_batch_is_never_longer_than_its_longest_row(tmp_path, rng):
    """When rows leave, positions that are padding in every row left are cut from the attention
    mask and the KV cache (a batch that requests keep joining never drains), and the row left
    goes on with the tokens it gets alone."""
    from maskstore.serve import Engine, Request

    handle, tok = _three_personas(tmp_path, rng, seed=8)
    engine = Engine(handle, tok, batching="persona")
    try:
        handle.use(None)
        reqs = [Request(None, tok(t)["input_ids"], 6, lambda ev: None, temperature=0.0)
                for t in ("a long prompt of many bytes", "hi")]  # fmt: skip
        with torch.inference_mode():
            run = engine._prefill(reqs)
            out = engine._forward(run.ids, run.attn, run.cache)
            run.cache = out.cache
            engine._sample(run.reqs, out.logits)
            assert run.attn.shape == (2, len(reqs[0].ids) + 1)
            run.select([1])  # the long one leaves
            assert run.attn.shape == (1, len(reqs[1].ids) + 1) and bool(run.attn.all())
            keys = run.cache.layers[0].keys
            assert keys.shape[0] == 1 and keys.shape[2] == len(reqs[1].ids) + 1
            run.next_step()
            for _ in range(2):
                out = engine._forward(run.ids, run.attn, run.cache)
                run.cache = out.cache
                engine._sample(run.reqs, out.logits)
                run.next_step()
        alone = Request(None, tok("hi")["input_ids"], 6, lambda ev: None, temperature=0.0)
        with torch.inference_mode():
            one = engine._prefill([alone])
            for _ in range(3):
                out = engine._forward(one.ids, one.attn, one.cache)
                one.cache = out.cache
                engine._sample(one.reqs, out.logits)
                one.next_step()
        assert reqs[1].out == alone.out
    finally:
        engine.close()


def test_caches_that_cannot_be_joined_mean_no_joins():
    """Only a plain transformers DynamicCache is padded, cut and joined (either layout); a
    sliding-window cache or anything else is refused in one line, and an engine whose model
    has one lets waiting requests wait for the next batch (tested below with ``joins``)."""
    from types import SimpleNamespace as NS

    from maskstore.errors import MaskstoreError
    from maskstore.serve.engine import _KV

    t = torch.zeros(1, 2, 3, 4)
    for bad, words in ((object(), "not object"),
                       (NS(layers=[NS(is_sliding=True, keys=t, values=t)]), "sliding-window")):  # fmt: skip
        with pytest.raises(MaskstoreError, match=words):
            _KV(bad)
    old = NS(key_cache=[t], value_cache=[t + 1])  # older transformers releases
    kv = _KV(old)
    assert len(kv) == 1 and torch.equal(kv[0][1], t + 1)
    kv[0] = (t[:, :, 1:], t[:, :, 2:])
    assert old.key_cache[0].shape[2] == 2 and old.value_cache[0].shape[2] == 1


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_engine_batching_modes_give_the_same_tokens(tmp_path, rng, monkeypatch, backend):
    """In-process: the engine with mixed batches and with one persona a batch gives every
    request the tokens it gets alone; persona mode never mixes personas in a batch. On a
    device backend too (torch ops on CPU tensors), where auto mixes with its kernel."""
    import threading

    from maskstore.serve import Engine, Request

    monkeypatch.setenv("MASKSTORE_BACKEND", backend)
    handle, tok = _three_personas(tmp_path, rng, seed=3)
    assert handle.backend == backend

    def run(engine: Engine, jobs: list) -> list[str]:
        done = [threading.Event() for _ in jobs]
        out = [""] * len(jobs)

        def sink(i):
            def f(ev):
                if ev.kind == "delta":
                    out[i] += ev.text
                else:
                    assert ev.kind == "done", ev
                    done[i].set()

            return f

        for i, (p, prompt, n) in enumerate(jobs):
            ids = tok(prompt)["input_ids"]
            engine.submit(Request(p, ids, n, sink(i), temperature=0.0))
        assert all(d.wait(60) for d in done)
        return out

    jobs = [("a", "hello", 5), ("b", "hi there you", 7), (None, "x", 3), ("c", "hello", 6),
            ("a", "more text here", 4), ("b", "q", 8)]  # fmt: skip
    single = Engine(handle, tok, batching="mixed", window_s=0.0)  # alone: no window to wait
    try:
        alone = [run(single, [j])[0] for j in jobs]
    finally:
        single.close()
    engines = {m: Engine(handle, tok, batching=m, window_s=0.2) for m in ("mixed", "persona",
                                                                          "auto")}  # fmt: skip
    try:
        seen = []
        orig = engines["persona"]._run
        engines["persona"]._run = lambda batch: (seen.append({r.persona for r in batch}),
                                                 orig(batch))  # fmt: skip
        for mode, engine in engines.items():
            assert run(engine, jobs) == alone, mode
        assert seen and all(len(s) == 1 for s in seen) and len(seen) < len(jobs)
        with pytest.raises(Exception, match="batching"):
            Engine(handle, tok, batching="nope")
        auto = Engine(handle, tok)  # the default: auto where a fused kernel runs
        auto.close()
        assert handle.fused_mixing and auto.batching == "auto"
    finally:
        for e in engines.values():
            e.close()


@pytest.mark.server
def test_served_from_an_s3_version_and_a_remote_that_goes_down(tmp_path, tiny_dir, calib_files):
    """Personas served from ``s3://.../repo@v1`` on a moto server of this test's own: while it
    is up they load; once it is down, a persona not yet loaded gets a 503 and a loaded one
    keeps answering."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    proc = None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        b, repo = tmp_path / "b.zarr", tmp_path / "repo"
        _build(tiny_dir, {"up": calib_files["introvert"], "late": calib_files["extrovert"]}, b)
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="test", aws_secret_access_key="test",
                     ).create_bucket(Bucket="down")  # fmt: skip
        for args in (("commit", str(b), "-m", "x"), ("tag", "v1"), ("push", "s3://down/r", "v1")):
            r = subprocess.run([sys.executable, "-m", "maskstore.cli", *args, "--repo", str(repo)],
                               capture_output=True, text=True, env={**os.environ, **env})  # fmt: skip
            assert r.returncode == 0, r.stderr
        proc, url = start("s3://down/r@v1", env=env)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        assert {m.id for m in c.models.list().data} == {"model", "up", "late"}
        first = complete(c, "up", "hi", n=4)
        moto.kill()
        moto.wait()
        with pytest.raises(openai.InternalServerError) as e:
            complete(c, "late", "hi", n=4)
        assert e.value.status_code == 503
        assert complete(c, "up", "hi", n=4) == first  # loaded before: still served
        assert complete(c, "model", "hi", n=2) is not None  # the base model too
    finally:
        if proc is not None:
            stop(proc)
        if moto.poll() is None:
            moto.kill()


def test_an_unexpected_failure_is_a_500_in_openai_shape_and_the_server_goes_on(tmp_path, rng):
    """A failure the routes do not foresee (here the tokenizer raising once) answers 500 with
    OpenAI's error body naming only the exception's type, not a plain-text page; the next
    request is served."""
    from fastapi.testclient import TestClient

    from maskstore.serve import Engine
    from maskstore.serve.app import create_app

    handle, tok = _three_personas(tmp_path, rng, seed=5)
    engine = Engine(handle, tok)
    try:
        app = create_app(engine, handle.bundle, "tiny")
        calls = {"n": 0}
        real = engine.tok

        class Flaky:
            def __getattr__(self, name):
                return getattr(real, name)

            def __call__(self, *a, **kw):
                calls["n"] += 1
                if calls["n"] == 1:
                    raise RuntimeError("secret /path/in/message")
                return real(*a, **kw)

        engine.tok = Flaky()
        with TestClient(app, raise_server_exceptions=False) as client:
            body = {"model": "a", "prompt": "hi", "max_tokens": 2, "temperature": 0}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 500
            err = r.json()["error"]
            assert err["code"] == 500 and "RuntimeError" in err["message"]
            assert "secret" not in err["message"]
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"]
    finally:
        engine.close()


def test_metrics_show_the_device_mask_cache_and_its_evictions(tmp_path, rng, monkeypatch):
    """On a device backend, /metrics reports the packed masks held in device memory, bounded
    by the handle's device_cache_bytes, and counts what the bound evicted."""
    from fastapi.testclient import TestClient

    from maskstore.serve import Engine
    from maskstore.serve.app import create_app

    monkeypatch.setenv("MASKSTORE_BACKEND", "torch")
    handle, tok = _three_personas(tmp_path, rng, seed=6)
    persona = sum(m.out_features * ((m.in_features + 7) // 8) for m in handle.modules.values())
    handle._dcache.limit = persona  # one persona's masks
    engine = Engine(handle, tok, batching="persona")
    try:
        app = create_app(engine, handle.bundle, "tiny")
        with TestClient(app) as client:
            for p in ("a", "b"):
                body = {"model": p, "prompt": "hi", "max_tokens": 2, "temperature": 0}
                assert client.post("/v1/completions", json=body).status_code == 200
            text = client.get("/metrics").text
    finally:
        engine.close()
    values = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
              if ln.startswith("maskstore_device_cache")}  # fmt: skip
    assert values["maskstore_device_cache_bytes"] == persona
    assert values["maskstore_device_cache_entries"] == len(handle.modules)
    assert values["maskstore_device_cache_evictions_total"] == len(handle.modules)


def _raw(host: str, port: int, data: bytes, wait: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection; everything the server answers until it closes
    (or ``wait`` s pass)."""
    import socket

    s = socket.create_connection((host, port), timeout=wait)
    try:
        s.sendall(data)
        out = b""
        while True:
            try:
                part = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not part:
                break
            out += part
            if b"\r\n\r\n" in out and b"content-length" in out.lower():
                head, _, body = out.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                if len(body) >= length:
                    break
        return out
    finally:
        s.close()


@pytest.mark.server
def test_bodies_headers_and_slow_clients_are_bounded(served):
    """A chunked body past --max-body-bytes is a 413 as a declared one is; a header block past
    the bound (one huge header, or thousands) is refused, never served; connections that
    trickle their headers are closed after --header-timeout while other clients are served;
    one address opens at most --max-connections-per-client connections."""
    import socket
    from urllib.parse import urlsplit

    proc, url = start(served["b"], "--header-timeout", "1", "--max-body-bytes", "4096",
                      "--max-connections-per-client", "4")  # fmt: skip
    host, port = urlsplit(url).hostname, urlsplit(url).port
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    try:
        chunked = head + b"Transfer-Encoding: chunked\r\n\r\n"
        chunked += b"".join(b"400\r\n" + b"x" * 1024 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"
        out = _raw(host, port, chunked)
        assert out.startswith(b"HTTP/1.1 413") and b'"code": 413' in out, out[:300]
        out = _raw(host, port, head + b"Content-Length: 100000\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 413"), out[:300]
        small = json.dumps({"model": "p0", "prompt": "hi", "max_tokens": 1}).encode()
        out = _raw(host, port, head + b"Content-Length: %d\r\n\r\n" % len(small) + small)
        assert out.startswith(b"HTTP/1.1 200"), out[:300]  # under the bound: served
        for block in (b"X-Big: " + b"a" * (1 << 20) + b"\r\n",
                      b"".join(b"X-%d: 1\r\n" % i for i in range(20000))):  # fmt: skip
            out = _raw(host, port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + block + b"\r\n")
            assert not out.startswith(b"HTTP/1.1 200"), out[:200]
        # three clients trickling their headers: closed within the timeout, others served
        slow = [socket.create_connection((host, port), timeout=10) for _ in range(3)]
        for s in slow:
            s.sendall(b"GET /health HTTP/1.1\r\nHo")
        assert _raw(host, port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
            b"HTTP/1.1 200"
        )
        t0 = time.monotonic()
        for s in slow:
            try:
                s.sendall(b"s")  # still trickling
                assert s.recv(100) == b""  # closed by the server
            except (ConnectionResetError, BrokenPipeError):
                pass  # closed by the server, and said so
            s.close()
        assert time.monotonic() - t0 < 8
        # one address: four connections at most, the fifth closed at once
        held = [socket.create_connection((host, port), timeout=10) for _ in range(4)]
        extra = socket.create_connection((host, port), timeout=10)
        t0 = time.monotonic()
        try:
            try:
                assert extra.recv(100) == b""
            except ConnectionResetError:
                pass
            assert time.monotonic() - t0 < 0.9  # at once, not at the header deadline
        finally:
            extra.close()
            for s in held:
                s.close()
        time.sleep(0.3)
        assert _raw(host, port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
            b"HTTP/1.1 200"
        )
    finally:
        stop(proc)


def test_every_refusal_has_openai_shape_and_prompts_without_room_are_400(tmp_path, rng):
    """In-process: no such route (404), a method a route does not take (405), a body that is
    no UTF-8 or nested past the parser (400) all answer OpenAI's error shape; a prompt that
    fills the context is a 400 even when max_tokens is unset; the base model cannot be
    unloaded; tokenizing runs off the event loop (a slow tokenizer does not stall /health)."""
    import threading

    from fastapi.testclient import TestClient

    from maskstore.serve import Engine
    from maskstore.serve.app import create_app

    handle, tok = _three_personas(tmp_path, rng, seed=7)
    engine = Engine(handle, tok)
    try:
        app = create_app(engine, handle.bundle, "tiny", allow_runtime_loading=True)
        with TestClient(app, raise_server_exceptions=False) as client:

            def shaped(r, status):
                assert r.status_code == status, (r.status_code, r.text)
                err = r.json()["error"]
                assert err["code"] == status and err["type"] and err["message"]

            shaped(client.get("/v1/nowhere"), 404)
            shaped(client.get("/v1/completions"), 405)
            head = {"content-type": "application/json"}
            shaped(
                client.post("/v1/completions", content=b'{"model": "\xff\xfe"}', headers=head), 400
            )
            deep = b'{"model": "a", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            shaped(client.post("/v1/completions", content=deep, headers=head), 400)
            full = "x" * (engine.context + 10)  # the byte tokenizer: a token a character
            for route, body in (("/v1/completions", {"prompt": full}),
                                ("/v1/chat/completions",
                                 {"messages": [{"role": "user", "content": full}]})):  # fmt: skip
                r = client.post(route, json={"model": "a", **body})
                if (
                    route.endswith("chat/completions")
                    and r.status_code == 400
                    and ("chat template" in r.text)
                ):
                    continue  # this tokenizer has no chat template
                shaped(r, 400)
                assert "context" in r.json()["error"]["message"]
            shaped(client.post("/v1/personas/unload", json={"persona": "tiny"}), 400)
            assert client.get("/v1/models").status_code == 200

            real = engine.tok

            class Slow:
                def __getattr__(self, name):
                    return getattr(real, name)

                def __call__(self, *a, **kw):
                    time.sleep(2.0)
                    return real(*a, **kw)

            engine.tok = Slow()
            body = {"model": "a", "prompt": "hi", "max_tokens": 1, "temperature": 0}
            t = threading.Thread(
                target=client.post, args=("/v1/completions",), kwargs={"json": body}
            )
            t.start()
            time.sleep(0.3)
            t0 = time.monotonic()
            assert client.get("/health").status_code == 200
            assert time.monotonic() - t0 < 1.0  # not behind the tokenizer
            t.join()
    finally:
        engine.close()


def test_a_persona_loaded_at_run_time_never_takes_the_base_models_id(tmp_path, rng):
    """A bundle loaded at run time whose persona is named like the base model is served as
    ``SOURCE#NAME`` (reachable), never as the base id (where it was accepted and unreachable)."""
    from fastapi.testclient import TestClient

    from maskstore import create_bundle
    from maskstore.modules import model_fingerprint
    from maskstore.serve import Engine
    from maskstore.serve.app import create_app
    from maskstore.store.opener import open_bundle

    handle, tok = _three_personas(tmp_path / "one", rng, seed=8)
    mods = handle.modules
    other = tmp_path / "other.zarr"
    with create_bundle(other, model_fingerprint(handle.model, mods, hash_weights=True)) as b:
        with b.persona_writer("tiny", method="t") as w:
            for n, m in mods.items():
                w.write_mask(n, rng.random((m.out_features, m.in_features)) < 0.5)
    engine = Engine(handle, tok)
    try:
        app = create_app(engine, handle.bundle, "tiny", allow_runtime_loading=True,
                         open_source=open_bundle)  # fmt: skip
        with TestClient(app) as client:
            r = client.post("/v1/personas/load", json={"source": str(other)})
            assert r.status_code == 200, r.text
            (name,) = r.json()["loaded"]
            assert name == f"{other}#tiny"
            ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
            assert ids.count("tiny") == 1 and name in ids
            body = {"model": name, "prompt": "hi", "max_tokens": 2, "temperature": 0}
            assert client.post("/v1/completions", json=body).status_code == 200
    finally:
        engine.close()


def test_masks_read_for_an_unloaded_persona_are_never_served_for_a_new_one(tmp_path, rng):
    """The race, made deterministic: persona ``a`` is being read when it is unloaded and a
    bundle holding another ``a`` is loaded; the first read finishes last. Its masks are
    dropped (the unload started a new generation of the name), the request waiting for the
    old ``a`` ends alone with a 404, and a request for the new ``a`` gets the new masks."""
    import threading

    from maskstore import create_bundle
    from maskstore.modules import model_fingerprint
    from maskstore.serve import Engine, Request
    from maskstore.store.opener import open_bundle

    handle, tok = _three_personas(tmp_path / "one", rng, seed=9)
    catalog, mods = handle.bundle, handle.modules
    with create_bundle(
        tmp_path / "two", model_fingerprint(handle.model, mods, hash_weights=True)
    ) as b:
        with b.persona_writer("a", method="t") as w:
            for n, m in mods.items():
                w.write_mask(n, rng.random((m.out_features, m.in_features)) < 0.5)
    engine = Engine(handle, tok, batching="persona")
    entered, release = threading.Event(), threading.Event()
    real = handle.read_masks

    def held(p):
        masks = real(p)
        if p == "a" and not entered.is_set():
            entered.set()
            release.wait(30)  # read, not yet cached
        return masks

    handle.read_masks = held
    events: dict[int, list] = {0: [], 1: []}
    done = [threading.Event(), threading.Event()]

    def sink(i):
        def f(ev):
            events[i].append(ev)
            if ev.kind in ("done", "error"):
                done[i].set()

        return f

    import numpy as np

    ids = tok("hi")["input_ids"]
    try:
        engine.submit(Request("a", list(ids), 2, sink(0), temperature=0.0))
        assert entered.wait(30)
        catalog.remove("a")
        engine.unload("a")
        assert catalog.add("two", open_bundle(tmp_path / "two")) == ["a"]
        engine.submit(Request("a", list(ids), 2, sink(1), temperature=0.0))
        release.set()
        assert done[0].wait(60) and done[1].wait(60)
        assert events[0][-1].kind == "error" and events[0][-1].status == 404
        assert events[1][-1].kind == "done", events[1]
        cached = engine.cache.get("a")
        new = open_bundle(tmp_path / "two")
        assert all(np.array_equal(cached[n], new.read_packed("a", n)) for n in mods)
    finally:
        release.set()
        engine.close()


class _FakeEngine:
    """An EngineClient that answers every request with its prompt reversed: the routes are
    tested without a model."""

    def __init__(self, tok, context: int = 64) -> None:
        from maskstore.serve.metrics import Metrics

        self.tok, self.context, self.metrics = tok, context, Metrics()
        self.seen: list = []
        self.unloaded: list = []

    def submit(self, req) -> None:
        from maskstore.serve.engine import Event

        self.seen.append(req)
        text = self.tok.decode(req.ids[::-1][: req.max_tokens])
        for ch in text:
            req.sink(Event("delta", ch))
        req.sink(Event("done", finish_reason="length", prompt_tokens=len(req.ids),
                       completion_tokens=len(text)))  # fmt: skip

    def context_error(self, prompt: int, max_tokens: int) -> str:
        return f"context {self.context}: prompt {prompt} + {max_tokens}"

    def load(self, persona: str) -> None:
        pass

    def unload(self, persona: str) -> bool:
        self.unloaded.append(persona)
        return True


def test_routes_run_over_any_engine_client(tmp_path, rng):
    """The HTTP layer needs only the EngineClient surface: the in-process Engine and Ray's
    RemoteEngine implement it, and every route works over a fake engine (no model)."""
    from _tiny import byte_tokenizer
    from fastapi.testclient import TestClient

    from maskstore.serve import Engine
    from maskstore.serve.client import EngineClient
    from maskstore.serve.http import create_app
    from maskstore.serve.ray_serve import RemoteEngine

    tok = byte_tokenizer()
    tok.chat_template = CHAT
    fake = _FakeEngine(tok)
    handle, _ = _three_personas(tmp_path, rng, seed=10)
    engine = Engine(handle, tok)
    try:
        assert isinstance(engine, EngineClient) and isinstance(fake, EngineClient)
        assert isinstance(RemoteEngine(tok, 64, "tiny"), EngineClient)
    finally:
        engine.close()
    app = create_app(fake, handle.bundle, "tiny", allow_runtime_loading=True)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "a", "prompt": "abc", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "cba"
        assert fake.seen[-1].persona == "a" and fake.seen[-1].max_tokens == 3
        r = client.post("/v1/chat/completions",
                        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert r.status_code == 200 and fake.seen[-1].persona is None
        assert r.json()["usage"]["prompt_tokens"] == len(fake.seen[-1].ids)
        r = client.post("/v1/completions", json={"model": "b", "prompt": "xy", "max_tokens": 2,
                                                 "stream": True})  # fmt: skip
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny", "a", "b", "c"]
        assert (
            client.post("/v1/completions", json={"model": "zz", "prompt": "x"}).status_code == 404
        )
        r = client.post("/v1/completions", json={"model": "a", "prompt": "x" * 80})
        assert r.status_code == 400 and "context 64" in r.json()["error"]["message"]
        assert client.post("/v1/personas/unload", json={"persona": "c"}).status_code == 200
        assert fake.unloaded == ["c"] and "c" not in handle.bundle.personas


def test_metrics_absorb_replica_figures_under_a_replica_label():
    """What Ray replicas report rides to the ingress as plain data and renders beside the
    ingress's own series, each with its replica label; a replica's newer report replaces
    its older one."""
    from maskstore.serve.metrics import Metrics

    rep, ingress = Metrics(), Metrics()
    rep.inc("maskstore_persona_loads_total", persona="p0")
    rep.set("maskstore_persona_cache_bytes", 1234)
    rep.inc("maskstore_requests_total", persona="p0")
    snap = rep.snapshot(skip=("maskstore_requests_total",))
    assert json.loads(json.dumps(snap)) == snap  # plain data
    ingress.inc("maskstore_requests_total", persona="p0")
    ingress.absorb("r1", snap)
    ingress.absorb("r2", [["maskstore_persona_loads_total", [["persona", "p1"]], 2.0],
                          ["not_a_metric", [], 1.0]])  # fmt: skip
    text = ingress.render()
    assert 'maskstore_persona_loads_total{persona="p0",replica="r1"} 1' in text
    assert 'maskstore_persona_loads_total{persona="p1",replica="r2"} 2' in text
    assert 'maskstore_persona_cache_bytes{replica="r1"} 1234' in text
    assert 'maskstore_requests_total{persona="p0"} 1' in text and "not_a_metric" not in text
    ingress.absorb("r1", [])
    assert 'replica="r1"' not in ingress.render()


def test_source_policy_admits_only_what_lies_under_its_roots(tmp_path):
    """Paths are resolved (links followed, '..' folded) before they are compared with the
    roots; a root of / admits everything local; s3 roots admit only their prefix."""
    from maskstore.errors import MaskstoreError
    from maskstore.serve.sources import REFUSED, SourcePolicy

    root = tmp_path / "root"
    (root / "in.zarr").mkdir(parents=True)
    (tmp_path / "out.zarr").mkdir()
    (root / "link.zarr").symlink_to(tmp_path / "out.zarr", target_is_directory=True)
    p = SourcePolicy([str(root) + "/"])
    assert p.resolve(str(root / "in.zarr")) == str((root / "in.zarr").resolve())
    assert p.resolve(f"{root}/in.zarr@v1") == f"{(root / 'in.zarr').resolve()}@v1"
    for bad in (str(tmp_path / "out.zarr"), str(root / "link.zarr"), f"{root}/../out.zarr",
                str(root), "zip://a::" + str(root / "in.zarr"), "s3://bucket/x", ""):  # fmt: skip
        with pytest.raises(MaskstoreError) as e:
            p.resolve(bad)
        assert str(e.value) == REFUSED, bad
    assert SourcePolicy(["/"]).resolve(str(tmp_path / "out.zarr")) == str(
        (tmp_path / "out.zarr").resolve()
    )
    s3 = SourcePolicy(["s3://team-bucket/bundles"])
    assert s3.resolve("s3://team-bucket/bundles/a.zarr") == "s3://team-bucket/bundles/a.zarr"
    for bad in ("s3://team-bucket/other/a.zarr", "s3://team-bucket/bundles/../x",
                "s3://team-bucket/bundlesX/a", "/etc"):  # fmt: skip
        with pytest.raises(MaskstoreError):
            s3.resolve(bad)


def test_auto_runs_one_persona_in_place_and_mixes_when_another_joins(tmp_path, rng):
    """batching="auto": a batch of one persona decodes in place (the BLAS, no mixed block);
    when a request of another persona joins it mid-decode, the batch becomes a mixed block at
    that step boundary; every request still gets the tokens it gets alone."""
    import threading

    from maskstore.serve import Engine, Request

    handle, tok = _three_personas(tmp_path, rng, seed=11)
    engine = Engine(handle, tok, batching="auto", window_s=0.01, mix_from=2)
    seen: list[tuple[bool, object]] = []
    forward = engine._forward

    def spy(*a, **kw):
        seen.append((handle._mixing, handle.active))
        return forward(*a, **kw)

    engine._forward = spy

    def run(jobs, gap=None):
        out, done = [""] * len(jobs), [threading.Event() for _ in jobs]
        started = threading.Event()

        def sink(i):
            def f(ev):
                if ev.kind == "delta":
                    out[i] += ev.text
                    started.set()
                else:
                    assert ev.kind == "done", ev
                    done[i].set()

            return f

        for i, (p, prompt, n) in enumerate(jobs):
            if i and gap:
                assert started.wait(30)  # the first is decoding before the next arrives
            engine.submit(Request(p, tok(prompt)["input_ids"], n, sink(i), temperature=0.0))
        assert all(d.wait(60) for d in done)
        return out

    try:
        alone = [run([j])[0] for j in (("a", "hello there", 30), ("b", "hi", 5))]
        seen.clear()
        assert run([("a", "hello there", 30), ("a", "x", 4)])[0] == alone[0]
        assert seen and all(not mixing and active == "a" for mixing, active in seen)
        seen.clear()
        got = run([("a", "hello there", 30), ("b", "hi", 5)], gap=True)
        assert got == alone
        assert seen[0] == (False, "a") and any(mixing for mixing, _ in seen)  # in place, then mixed
        assert handle.active is None or handle.active == "a"
    finally:
        engine.close()


def test_auto_mixes_only_from_the_measured_persona_count(tmp_path, rng):
    """batching="auto" mixes a batch only when at least ``mix_from`` personas share it: the
    engine measures it at start (a mixed step against one in-place step a persona, on this
    machine, reported as a gauge); below it, requests of other personas wait for their own
    in-place batch, and every request still gets the tokens it gets alone."""

    from _helpers import run_with_joiners

    from maskstore.serve import Engine

    handle, tok = _three_personas(tmp_path, rng, seed=12)
    measured = Engine(handle, tok)  # mix_from="measure": on a thread of its own, at start
    try:
        assert measured.mixing_measured.wait(120)
        speedups = measured.mixing_speedups
        assert sorted(speedups) == [2, 4, 8] and all(0 < v < 1e4 for v in speedups.values())
        wins = [k for k in speedups if all(speedups[j] > 1 for j in speedups if j >= k)]
        assert measured.mix_from == (min(wins) if wins else None)
        text = measured.metrics.render()
        for k, v in speedups.items():
            line = f'maskstore_mixing_speedup{{personas="{k}"}} '
            assert float(text.split(line)[1].split()[0]) == pytest.approx(v, rel=1e-5)
    finally:
        measured.close()
    for bad in (1, 0, -3, "fast", 2.5):
        with pytest.raises(Exception, match="mix_from"):
            Engine(handle, tok, mix_from=bad)
    with pytest.raises(Exception, match="rows >= personas >= 2"):
        handle.mixing_speedup(rows=1, personas=2)
    with handle.mixed(["a", "b"]), pytest.raises(Exception, match="inside a mixed"):
        handle.mixing_speedup()  # it would swap the block's own forwards

    jobs = [("a", "hello", 6), ("b", "hi there", 5), ("a", "x", 4), ("c", "more", 5)]
    single = Engine(handle, tok, batching="persona", window_s=0.0)
    try:
        for p in ("a", "b", "c"):
            single.load(p)
        alone = [run_with_joiners(single, tok, [job], [], 3)[0] for job in jobs]
    finally:
        single.close()
    for mix_from, mixes in ((None, False), (3, True), (4, False)):
        engine = Engine(handle, tok, window_s=0.2, mix_from=mix_from)
        seen: list[set] = []
        real = engine._run
        engine._run = lambda batch, real=real, seen=seen: (
            seen.append({r.persona for r in batch}), real(batch))  # fmt: skip
        try:
            for p in ("a", "b", "c"):
                engine.load(p)
            assert run_with_joiners(engine, tok, jobs, [], 0) == alone, mix_from
            assert seen, mix_from
            if mixes:  # 3 personas in the window: one mixed batch
                assert seen[0] == {"a", "b", "c"}, seen
            else:  # never more than one persona a batch
                assert all(len(s) == 1 for s in seen), (mix_from, seen)
        finally:
            engine.close()


def test_the_rate_limiter_refills_bounds_its_clients_and_says_when():
    """A token bucket per client: bursts of max(1, rate), refilled at rate; the wait it gives
    is exact; past ``clients`` buckets the least recently seen is dropped (so it cannot grow
    without bound)."""
    from maskstore.serve.limits import RateLimiter

    lim = RateLimiter(2.0, clients=3)
    assert [lim.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.25 * 2]
    assert lim.take("a", now=0.25) == pytest.approx(0.25)  # half a token came back
    assert lim.take("a", now=0.5) == 0.0  # one whole token
    assert lim.take("b", now=0.5) == 0.0  # another client has its own bucket
    slow = RateLimiter(0.1)
    assert slow.take("x", now=0.0) == 0.0 and slow.take("x", now=1.0) == pytest.approx(9.0)
    assert RateLimiter.retry_after(9.0) == "9" and RateLimiter.retry_after(0.01) == "1"
    for c in ("c", "d", "e"):
        lim.take(c, now=0.6)
    assert len(lim._buckets) == 3 and "a" not in lim._buckets


def test_requests_past_the_rate_limit_are_429_per_key_or_address(tmp_path, rng):
    """--rate-limit: per API key when the server requires one (wrong keys are 401 and cost
    nothing), else per client address; past the burst a 429 in OpenAI's shape with
    Retry-After; /health is never limited; refused requests never reach the engine."""
    from fastapi.testclient import TestClient

    from maskstore.serve.http import create_app
    from maskstore.serve.limits import Limits

    handle, tok = _three_personas(tmp_path, rng, seed=13)
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    for key in (None, "sekrit"):
        fake = _FakeEngine(tok)
        app = create_app(fake, handle.bundle, "tiny", api_key=key, limits=Limits(rate=0.01))
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        with TestClient(app, client=("10.0.0.1", 1)) as one, \
                TestClient(app, client=("10.0.0.2", 1)) as two:  # fmt: skip
            if key:
                for _ in range(3):  # wrong keys: 401, the bucket untouched
                    assert one.post("/v1/completions", json=body).status_code == 401
            assert one.post("/v1/completions", json=body, headers=auth).status_code == 200
            r = one.post("/v1/completions", json=body, headers=auth)
            assert r.status_code == 429 and r.json()["error"]["code"] == 429, r.text
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert 1 <= int(r.headers["retry-after"]) <= 100
            assert one.get("/health").status_code == 200  # never limited
            other = two.post("/v1/completions", json=body, headers=auth).status_code
            assert other == (429 if key else 200)  # one key shares a bucket; addresses do not
            assert len(fake.seen) == (1 if key else 2)
    # many clients of one key at once: the burst (1) passes, every other request is a 429
    app = create_app(_FakeEngine(tok), handle.bundle, "tiny", api_key="k", limits=Limits(rate=0.01))
    with TestClient(app) as c:
        from concurrent.futures import ThreadPoolExecutor

        def post(_):
            return c.post("/v1/completions", json=body,
                          headers={"Authorization": "Bearer k"}).status_code  # fmt: skip

        with ThreadPoolExecutor(8) as ex:
            codes = sorted(ex.map(post, range(24)))
    assert codes == [200] + [429] * 23, codes


def test_the_http_stack_stays_bounded_h11_where_httptools_is_installed():
    """uvicorn picks httptools when it is installed (it bounds neither header size nor
    count); serve's uvicorn config pins its bounded h11 protocol whatever is installed (the
    live header attacks in test_bodies_headers_and_slow_clients_are_bounded run against it)."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from maskstore.serve.limits import Limits

    pytest.importorskip("httptools")

    async def app(scope, receive, send):  # pragma: no cover - never called
        pass

    default = uvicorn.Config(app)
    default.load()
    assert default.http_protocol_class.__module__.endswith("httptools_impl")
    pinned = uvicorn.Config(app, **Limits(header_bytes=1000).uvicorn_config())
    pinned.load()
    assert issubclass(pinned.http_protocol_class, H11Protocol)
    assert pinned.h11_max_incomplete_event_size == 1000


@pytest.mark.parametrize("when", ["before the check", "after the check"])
def test_unloading_a_persona_mid_batch_never_fails_the_batch(tmp_path, rng, when):
    """A mixed batch of ``a`` and ``b`` decoding when ``b`` is unloaded (the unload route's
    two steps: out of the catalog, then the engine's next generation), as requests for ``c``
    and ``b`` arrive to join it. The running rows of both finish with the tokens they get
    alone (they hold their masks) and ``c`` joins. The late ``b`` request: unloaded before
    the engine checks the joiners, it gets a 404; unloaded after the check (reproduced by
    unloading inside it), it joins with the masks it was admitted with and gets the tokens
    it gets alone. The batch never fails."""
    import threading

    from maskstore.serve import Engine, Request

    handle, tok = _three_personas(tmp_path, rng, seed=14)
    catalog = handle.bundle
    jobs = [("a", "hello there", 24), ("b", "hi", 24), ("c", "more", 4), ("b", "x", 4)]
    single = Engine(handle, tok, batching="mixed", window_s=0.0)
    try:
        alone = []
        for p, prompt, n in jobs:
            out, done = [], threading.Event()
            single.submit(Request(p, tok(prompt)["input_ids"], n,
                                  lambda ev, out=out, done=done: out.append(ev.text)
                                  if ev.kind == "delta" else done.set(), temperature=0.0))  # fmt: skip
            assert done.wait(60)
            alone.append("".join(out))
    finally:
        single.close()
    engine = Engine(handle, tok, batching="mixed", window_s=0.2)
    try:
        for p in ("a", "b", "c"):
            engine.load(p)

        events: dict[int, list] = {i: [] for i in range(len(jobs))}
        over = {i: threading.Event() for i in range(len(jobs))}
        real_served = engine._served

        def unload_b() -> None:
            catalog.remove("b")
            engine.unload("b")

        def served_then_unload(reqs):
            out = real_served(reqs)
            if any(r.persona == "b" for r in out) and "b" in catalog.personas:
                unload_b()  # lands after the check, before the join
            return out

        def sink(i):
            def f(ev):
                events[i].append(ev)
                if ev.kind != "delta":
                    over[i].set()
                elif i == 0 and sum(e.kind == "delta" for e in events[0]) == 3:
                    for k in (2, 3):  # on the engine thread, mid-batch
                        p, prompt, n = jobs[k]
                        engine.submit(Request(p, tok(prompt)["input_ids"], n, sink(k),
                                              temperature=0.0))  # fmt: skip
                    if when == "before the check":
                        unload_b()
                    else:
                        engine._served = served_then_unload

            return f

        for i in (0, 1):
            p, prompt, n = jobs[i]
            engine.submit(Request(p, tok(prompt)["input_ids"], n, sink(i), temperature=0.0))
        assert all(over[i].wait(60) for i in range(len(jobs)))
        text = {i: "".join(e.text for e in ev if e.kind == "delta") for i, ev in events.items()}
        served = (0, 1, 2) if when == "before the check" else (0, 1, 2, 3)
        for i in served:
            assert events[i][-1].kind == "done", (i, events[i][-1])
            assert text[i] == alone[i], i
        assert engine.metrics.get("maskstore_joined_rows_total") >= 1  # c joined the batch
        if when == "before the check":
            last = events[3][-1]
            assert last.kind == "error" and last.status == 404 and "unloaded" in last.text
        assert "b" not in catalog.personas and "b" not in engine.cache
    finally:
        engine.close()
