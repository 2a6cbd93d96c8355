"""The serving engine: one thread runs every forward pass; requests of any personas are decoded
together in mixed-persona batches.

Reading order:

1. :class:`Request` is one generation: token ids, sampling settings, and a ``sink`` that gets
   :class:`Event` s (text deltas, the end, or an error) on the engine's thread.
2. :meth:`Engine.submit` queues it. A persona whose masks are not loaded is read on a loader
   thread (:meth:`MaskHandle.read_masks`, no lock held), so other personas keep decoding; its
   requests join the ready queue once loaded (a failed load fails only them, 503).
3. The engine thread takes the ready requests (up to ``max_batch``, after a short window for
   others to join). With ``batching="persona"`` a batch has one persona, switched in place;
   with ``"mixed"`` it runs in a ``handle.mixed(...)`` block, whatever its personas (on CPU a
   fused kernel: a request's tokens do not depend on its batch-mates). ``"auto"`` mixes a
   batch only when enough personas share it for the mixed step to beat one in-place step a
   persona on this machine (``mix_from``, measured when the engine starts), else it batches
   like ``"persona"``. It decodes step by step with a KV cache (:class:`_Rows`).
4. At each step boundary rows leave (finished, stopped or cancelled: the cache and the row
   groups are cut down to the rows still running) and waiting requests join (continuous
   batching): their prompts run as a batch of their own, and their caches are left-padded to
   the running batch's length and appended to it. In persona mode only the batch's persona
   joins, and none while a request of another persona waits, so the batch drains and the
   next one starts with the oldest waiting request.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MaskstoreError
from .catalog import PersonaCache
from .metrics import Metrics


@dataclass
class Event:
    """What the engine tells a request: ``kind`` is ``delta`` (``text``), ``done``
    (``finish_reason``, ``prompt_tokens``, ``completion_tokens``) or ``error`` (``status``,
    ``text`` the message)."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 200
    replica: str = ""  # which server replica answered (Ray Serve deployments)
    loaded: bool = False  # that replica read the persona's masks for this request
    # with Request.logprobs: (offset in the text, token id, logprob, [(id, logprob)] top)
    # for the tokens whose text this event sends
    logprobs: list | None = None


@dataclass
class Request:
    """One generation. ``persona`` None is the base model; ``temperature`` 0 is greedy."""

    persona: str | None
    ids: list[int]
    max_tokens: int
    sink: Callable[[Event], None]
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: off; k: each token's logprob and the k likeliest
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled by the engine
    out: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded output already sent
    masks: dict | None = None
    lp: list = field(default_factory=list)  # logprob entries, in token order
    lp_sent: int = 0  # entries already sent
    text_len: int = 0  # characters of the decoded output at the previous step
    gen: torch.Generator | None = None  # its sampling generator (seeded from ``seed``)
    ended: bool = False  # its last event (done or an error) was sent, or it was cancelled
    next: int = 0  # the token sampled last, fed to the next step

    def cancel(self) -> None:
        """The client went away: the row leaves the batch at the next step."""
        self.cancelled.set()


class Engine:
    """Runs every forward pass of ``handle.model`` on one thread (see the module docstring)."""

    def __init__(
        self,
        handle,
        tokenizer,
        cache_bytes: int = 1 << 30,
        max_batch: int = 16,
        window_s: float = 0.01,
        loaders: int = 2,
        metrics: Metrics | None = None,
        batching: str = "auto",
        mix_from: int | None | str = "measure",
    ) -> None:
        self.handle = handle
        self.tok = tokenizer
        self.model = handle.model
        self.device = next(self.model.parameters()).device
        self.max_batch = max_batch
        self.window_s = window_s
        if batching not in ("auto", "mixed", "persona"):
            raise MaskstoreError(f"batching is 'auto', 'mixed' or 'persona', not {batching!r}")
        if batching == "auto" and not handle.fused_mixing:  # mixing would copy weights
            batching = "persona"
        # persona: a batch holds one persona's requests only; mixed: any; auto: a batch of one
        # persona runs in place (the BLAS), and becomes a mixed block (the fused kernel) when
        # at least `mix_from` personas share it (None: never), else it batches like persona
        self.batching = batching
        if mix_from != "measure" and not (mix_from is None or (isinstance(mix_from, int)
                                                               and mix_from >= 2)):  # fmt: skip
            raise MaskstoreError(f"mix_from is 'measure', None or a count >= 2, not {mix_from!r}")
        self.mix_from = mix_from
        self.mixing_speedups: dict[int, float] = {}  # personas in a step -> measured speedup
        self.mixing_measured = threading.Event()  # set once mix_from is known
        self._held: list[Request] = []  # taken from the queue for a later batch
        self.joins: bool | None = None  # whether requests can join running batches (the cache)
        self.metrics = metrics or Metrics()
        self.cache = PersonaCache(cache_bytes, on_evict=self._evicted)
        self.eos = _eos_ids(self.model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        import inspect

        # transformers 5 names the KV cache argument `cache` (`past_key_values` before)
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._ready: queue.Queue[Request | None] = queue.Queue()
        self._pending: dict[str, list[Request]] = {}  # persona -> requests waiting for its load
        # persona -> generation, bumped by unload: masks read for an earlier generation (a
        # persona unloaded while they were read, perhaps loaded again from another bundle
        # under the same name) are never cached or served
        self._gen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(loaders, thread_name_prefix="maskstore-load")
        self._stopping = threading.Event()
        self._draining = threading.Event()  # no new requests; running rows may finish
        self._busy = threading.Event()  # a batch is decoding
        self._thread = threading.Thread(target=self._loop, name="maskstore-engine", daemon=True)
        self._thread.start()
        if self.batching == "auto" and self.mix_from == "measure":
            # on a thread of its own, so the first requests do not wait for it; until it is
            # known, auto batches by persona
            self.mix_from = None
            threading.Thread(target=self._measure, name="maskstore-measure-mixing",
                             daemon=True).start()  # fmt: skip
        else:
            self.mix_from = None if self.mix_from == "measure" else self.mix_from
            self.mixing_measured.set()

    # ---- requests
    def submit(self, req: Request) -> None:
        """Queue ``req``; its events arrive through ``req.sink`` on other threads."""
        if self._stopping.is_set() or self._draining.is_set():
            req.sink(Event("error", "the server is shutting down", status=503))
            return
        if len(req.ids) + req.max_tokens > self.context:
            req.sink(Event("error", self.context_error(len(req.ids), req.max_tokens), status=400))
            return
        self.metrics.inc("maskstore_requests_total", persona=_label(req.persona))
        if req.persona is None:
            self._ready.put(req)
            return
        masks = self.cache.get(req.persona)
        if masks is not None:
            req.masks = masks
            self._ready.put(req)
            return
        with self._lock:
            waiting = self._pending.setdefault(req.persona, [])
            waiting.append(req)
            if len(waiting) == 1:
                self._loader.submit(self._load, req.persona)

    def context_error(self, prompt: int, max_tokens: int) -> str:
        return (
            f"this model's context is {self.context} tokens; the prompt has {prompt} and "
            f"max_tokens asks for {max_tokens} more: shorten the prompt or lower max_tokens"
        )

    def load(self, persona: str) -> None:
        """Read ``persona``'s masks into the cache now (blocking; raises on failure)."""
        if self.cache.get(persona) is None:
            gen = self._generation(persona)
            self._put(persona, self._read(persona), gen)

    def unload(self, persona: str) -> bool:
        """Drop ``persona``'s masks from the cache and start its next generation: a read in
        flight is not cached, and requests still waiting for it fail (404). Rows already
        decoding keep the masks they hold and finish."""
        with self._lock:
            self._gen[persona] = self._gen.get(persona, 0) + 1
            waiting = self._pending.pop(persona, [])
            dropped = self.cache.drop(persona)
        self.metrics.set("maskstore_persona_cache_bytes", self.cache.bytes)
        for req in waiting:
            req.sink(Event("error", f"persona {persona!r} was unloaded", status=404))
        return dropped

    def _generation(self, persona: str) -> int:
        with self._lock:
            return self._gen.get(persona, 0)

    def _read(self, persona: str) -> dict:
        t0 = time.perf_counter()
        masks = self.handle.read_masks(persona)
        self.metrics.observe("maskstore_persona_load_seconds", time.perf_counter() - t0)
        self.metrics.inc("maskstore_persona_loads_total", persona=persona)
        return masks

    def _put(self, persona: str, masks: dict, gen: int) -> bool:
        """Cache ``masks`` if ``persona`` is still at generation ``gen`` (else drop them)."""
        with self._lock:
            if self._gen.get(persona, 0) != gen:
                return False
            self.cache.put(persona, masks)
        self.metrics.set("maskstore_persona_cache_bytes", self.cache.bytes)
        return True

    def _load(self, persona: str) -> None:
        """On a loader thread: read, cache, release the persona's waiting requests."""
        gen = self._generation(persona)
        try:
            masks = self._read(persona)
            if not self._put(persona, masks, gen):  # unloaded meanwhile: read it anew
                with self._lock:
                    if self._pending.get(persona):
                        self._loader.submit(self._load, persona)
                return
            err = None
        except MaskstoreError as e:
            masks, err = None, f"persona {persona!r} could not be loaded: {e}"
        except Exception as e:  # noqa: BLE001 - a remote down, a read error: fail its requests
            masks, err = None, f"persona {persona!r} could not be loaded: {type(e).__name__}: {e}"
        with self._lock:
            waiting = self._pending.pop(persona, [])
        for req in waiting:
            if err is None:
                req.masks = masks
                self._ready.put(req)
            else:
                self.metrics.inc("maskstore_load_failures_total", persona=persona)
                req.sink(Event("error", " ".join(err.split())[:500], status=503))

    def _evicted(self, persona: str) -> None:
        self.metrics.inc("maskstore_persona_evictions_total", persona=persona)

    # ---- the engine thread
    def drain(self, timeout: float = 10.0) -> None:
        """Shut down as a server should: admit nothing more (503), answer every request not
        yet decoding with a 503 now, let the running batch finish for up to ``timeout`` s,
        then :meth:`close` (rows still running end with a 503)."""
        self._draining.set()
        with self._lock:
            waiting = [r for rs in self._pending.values() for r in rs]
            self._pending.clear()
        for req in waiting:
            req.sink(Event("error", "the server is shutting down", status=503))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self._busy.is_set() or not self._ready.empty()):
            time.sleep(0.02)
        self.close(timeout=max(1.0, deadline - time.monotonic()))

    def close(self, timeout: float = 10.0) -> None:
        """Stop: requests still queued fail (503), the running batch ends at its next step."""
        self._stopping.set()
        self._ready.put(None)
        self._thread.join(timeout)
        waiting_held, self._held = self._held, []
        self._loader.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            waiting = [r for rs in self._pending.values() for r in rs] + waiting_held
            self._pending.clear()
        while True:
            try:
                req = self._ready.get_nowait()
            except queue.Empty:
                break
            if req is not None:
                waiting.append(req)
        for req in waiting:
            req.sink(Event("error", "the server is shutting down", status=503))

    def _take(self) -> list[Request]:
        """The next batch: the first ready request and those that arrive within the window
        (up to ``max_batch``; with ``batching="persona"``, of the first one's persona only,
        the others held for the next batches in their order)."""
        held, self._held = self._held, []
        first = held.pop(0) if held else self._ready.get()
        if first is None:
            return []
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            if held:
                req = held.pop(0)
            else:
                left = deadline - time.monotonic()
                try:
                    req = self._ready.get(timeout=left) if left > 0 else self._ready.get_nowait()
                except queue.Empty:
                    break
            if req is None:
                self._ready.put(None)  # leave the stop mark for the loop
                break
            if self.batching == "persona" and req.persona != first.persona:
                self._held.append(req)
            else:
                batch.append(req)
        back: list[Request] = []  # auto with too few personas to mix: a batch by persona
        kinds = len({r.persona for r in batch})
        if kinds > 1 and not self._mixes(kinds):
            back = [r for r in batch if r.persona != first.persona]
            batch = [r for r in batch if r.persona == first.persona]
        self._held = back + held + self._held  # the older ones first
        return batch

    def measure_mixing(self, counts: tuple[int, ...] = (2, 4, 8), repeats: int = 2) -> int | None:
        """Time a mixed step against one in-place step a persona for each persona count of
        ``counts`` (:meth:`MaskHandle.mixing_speedup`, ``max_batch`` rows; it holds the
        handle's lock one timed step at a time, so batches run between them) and return the
        fewest personas from which mixing won at every measured count (None: never)."""
        rows = max(self.max_batch, max(counts))
        for k in counts:
            if self._stopping.is_set():  # closed meanwhile: stop spending the CPU on it
                raise MaskstoreError("the engine closed while it measured mixing")
            speedup = self.handle.mixing_speedup(rows=rows, personas=k, repeats=repeats)
            self.mixing_speedups[k] = speedup
            self.metrics.set("maskstore_mixing_speedup", speedup, personas=str(k))
        wins = [k for k in counts if all(self.mixing_speedups[j] > 1.0 for j in counts if j >= k)]
        return min(wins) if wins else None

    def _measure(self) -> None:
        try:
            self.mix_from = self.measure_mixing()
        except Exception:  # noqa: BLE001 - a failed measurement: batch by persona
            self.mix_from = None
        finally:
            self.mixing_measured.set()

    def _mixes(self, personas: int) -> bool:
        """Whether a batch of ``personas`` distinct personas runs as a mixed block."""
        if self.batching == "mixed":
            return True
        if self.batching == "persona" or personas < 2:
            return False
        return isinstance(self.mix_from, int) and personas >= self.mix_from

    def _loop(self) -> None:
        if self.batching in ("mixed", "auto"):
            with contextlib.suppress(Exception):  # only a head start: a batch compiles it too
                from ..runtime import _mixed

                _mixed.warm()  # the fused kernel, before the first batch needs it
        while not self._stopping.is_set():
            batch = self._served([r for r in self._take() if not r.cancelled.is_set()])
            if not batch:
                continue
            if self._draining.is_set():  # taken after the drain began: not started, 503
                for req in batch:
                    req.ended = True
                    req.sink(Event("error", "the server is shutting down", status=503))
                continue
            try:
                self._busy.set()
                self._run(batch)  # requests that join the batch are appended to it
            except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
                msg = " ".join(f"{type(e).__name__}: {e}".split())[:500]
                for req in batch:
                    if not req.ended:
                        req.ended = True
                        req.sink(Event("error", f"generation failed: {msg}", status=500))
            finally:
                self._busy.clear()

    def _run(self, batch: list[Request]) -> None:
        personas = [r.persona for r in batch]
        self.metrics.observe("maskstore_batch_rows", len(batch))
        t0 = time.perf_counter()
        mixed = self._mixes(len(set(personas)))
        if not mixed and self.batching == "auto" and self._held and self.joins is not False:
            # requests of other personas already wait to join: if they bring the batch to
            # mix_from, start mixed now rather than switch in place and back to base at once
            waiting = {r.persona for r in self._held[: self.max_batch - len(batch)]}
            mixed = self._mixes(len(set(personas) | waiting))
        with self.handle.lock, contextlib.ExitStack() as stack:
            if mixed:  # every masked Linear groups the rows by persona (rows join and leave)
                masks = {r.persona: r.masks for r in batch if r.persona is not None}
                stack.enter_context(self.handle.mixed(personas, masks=masks, restore=False))
            else:  # one persona: switch in place (delta writes)
                p = personas[0]
                self.handle.use(p, masks=batch[0].masks if p is not None else None)
            self.metrics.observe("maskstore_switch_seconds", time.perf_counter() - t0)
            self._decode(batch, mixed, stack)

    @torch.inference_mode()
    def _decode(self, batch: list[Request], mixed: bool, stack: contextlib.ExitStack) -> None:
        """Decode ``batch`` step by step; at each step boundary finished rows leave and
        waiting requests join while there is room (see the module docstring, step 4). With
        ``batching="auto"`` a batch running in place becomes a mixed block (entered on
        ``stack``) at the step where a request of another persona joins it."""
        run = _Rows(self, [])
        joining = batch
        while True:
            here = {r.persona for r in run.reqs}  # decoding in place: one persona
            if joining and not mixed and run.reqs and {r.persona for r in joining} != here:
                # another persona joins: the rows decoding in place keep their KV caches, only
                # the weights go back to base for a mixed block
                t0 = time.perf_counter()
                rows = [r.persona for r in run.reqs]
                masks = {r.persona: r.masks for r in run.reqs if r.persona is not None}
                stack.enter_context(self.handle.mixed(rows, masks=masks, restore=False))
                self.metrics.observe("maskstore_switch_seconds", time.perf_counter() - t0)
                mixed = True
            if joining:
                if mixed:
                    self.handle.regroup([r.persona for r in joining],
                                        masks={r.persona: r.masks for r in joining
                                               if r.persona is not None})  # fmt: skip
                run.merge(self._prefill(joining))
                if mixed:
                    self.handle.regroup([r.persona for r in run.reqs])
            if self._stopping.is_set():
                for r in run.reqs:
                    r.ended = True
                    r.sink(Event("error", "the server is shutting down", status=503))
                return
            if not run.reqs:
                return
            joining = self._joiners(run.reqs, mixed)
            batch.extend(joining)  # so that a failure reaches them too
            if joining:
                self.metrics.inc("maskstore_joined_rows_total", len(joining))
            out = self._forward(run.ids, run.attn, run.cache)
            run.cache = out.cache
            keep = self._sample(run.reqs, out.logits)
            if len(keep) < len(run.reqs):  # rows leave the batch at this step boundary
                run.select(keep)
                if mixed and run.reqs:
                    self.handle.regroup([r.persona for r in run.reqs])
            run.next_step()

    def _prefill(self, reqs: list[Request]) -> _Rows:
        """Run the prompts of ``reqs`` (left-padded together) and sample their first tokens;
        the rows still running, with their cache."""
        n = max(len(r.ids) for r in reqs)
        ids = torch.full((len(reqs), n), self.pad, dtype=torch.long)
        attn = torch.zeros((len(reqs), n), dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding: every row's last token is at -1
            ids[i, n - len(r.ids) :] = torch.tensor(r.ids, dtype=torch.long)
            attn[i, n - len(r.ids) :] = 1
            r.gen = _generator(r.seed)
        out = self._forward(ids, attn, None)
        if self.joins is None:  # once: can this model's KV caches be padded, cut and joined?
            try:
                _KV(out.cache)
                self.joins = True
            except MaskstoreError:
                self.joins = False  # requests wait for the next batch instead
        rows = _Rows(self, list(reqs), out.cache, attn)
        keep = self._sample(reqs, out.logits)
        rows.select(keep)
        rows.next_step()
        return rows

    def _forward(self, ids: torch.Tensor, attn: torch.Tensor, cache) -> _Step:
        pos = (attn.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=attn.to(self.device),
            position_ids=pos.to(self.device),
            use_cache=True,
            **{self._cache_arg: cache},
        )
        cache = getattr(out, "cache", None) or out.past_key_values
        return _Step(out.logits[:, -1, :].float().cpu(), cache)

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        """Each row's next token, sent on; the indices of the rows that go on."""
        keep = []
        for j, r in enumerate(reqs):
            tok = _sample(logits[j], r.temperature, r.top_p, r.gen)
            r.next = tok
            if self._advance(r, tok, _logprobs(logits[j], tok, r.logprobs)):
                keep.append(j)
        return keep

    def _joiners(self, running: list[Request], mixed: bool) -> list[Request]:
        """Waiting requests that join the running batch at this step boundary."""
        room = self.max_batch - len(running)
        while True:  # everything ready, in arrival order, after what was already held
            try:
                req = self._ready.get_nowait()
            except queue.Empty:
                break
            if req is None:
                self._ready.put(None)  # leave the stop mark for the loop
                break
            self._held.append(req)
        self._held = [r for r in self._held if not r.cancelled.is_set()]
        if room <= 0 or not self._held or not self.joins or self._draining.is_set():
            return []
        persona = running[0].persona if running else None
        if not mixed and not all(r.persona == persona for r in self._held):
            kinds = {persona, *(r.persona for r in self._held[:room])}
            if not self._mixes(len(kinds)):
                return []  # someone else waits: let this batch drain
        joining, self._held = self._held[:room], self._held[room:]
        return self._served(joining)

    def _served(self, reqs: list[Request]) -> list[Request]:
        """``reqs`` less those of a persona unloaded since they were queued (each ended alone,
        404), so an unload never fails a batch of other personas."""
        served = set(self.handle.bundle.personas)
        out = []
        for r in reqs:
            if r.persona is None or r.persona in served:
                out.append(r)
            else:
                r.ended = True
                r.sink(Event("error", f"persona {r.persona!r} was unloaded", status=404))
        return out

    def _advance(self, r: Request, tok: int, lp: tuple | None = None) -> bool:
        """Add ``tok`` to ``r``'s output and send what became final; False when ``r`` ends.
        ``lp``: the token's ``(logprob, top)`` when ``r`` asked for logprobs."""
        if r.cancelled.is_set():
            r.ended = True
            return False
        done = None
        if tok in self.eos:
            done = "stop"
        else:
            r.out.append(tok)
            if lp is not None:
                r.lp.append((r.text_len, tok, *lp))
            self.metrics.inc("maskstore_generated_tokens_total", persona=_label(r.persona))
        text = self.tok.decode(r.out, skip_special_tokens=True)
        r.text_len = len(text)
        cut = _first_stop(text, r.stop, r.sent)
        if cut is not None:
            text, done = text[:cut], "stop"
        elif done is None and len(r.out) >= r.max_tokens:
            done = "length"
        if done is None:
            # hold back an unfinished UTF-8 sequence and what could still become a stop string
            final = len(text.rstrip("\ufffd"))
            if r.stop:
                final = min(final, len(text) - max(len(s) for s in r.stop) + 1)
            if final > r.sent:
                start, r.sent = r.sent, final
                r.sink(Event("delta", text[start:final], logprobs=_sent_lp(r)))
            return True
        if len(text) > r.sent:
            start, r.sent = r.sent, len(text)
            r.sink(Event("delta", text[start:], logprobs=_sent_lp(r)))
        r.ended = True
        r.sink(Event("done", finish_reason=done, prompt_tokens=len(r.ids),
                     completion_tokens=len(r.out)))  # fmt: skip
        return False


def _logprobs(logits: torch.Tensor, tok: int, k: int | None) -> tuple | None:
    """``(logprob of tok, [(id, logprob)] of the k likeliest)`` under the model's own
    distribution (before temperature and top_p), or None when not asked for."""
    if k is None:
        return None
    lp = torch.log_softmax(logits.double(), dim=-1)
    top = torch.topk(lp, k) if k else None
    alts = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return float(lp[tok]), alts


def _sent_lp(r: Request) -> list | None:
    """The logprob entries of the tokens whose text starts before ``r.sent``, not sent yet."""
    if r.logprobs is None:
        return None
    k = r.lp_sent
    while k < len(r.lp) and r.lp[k][0] < r.sent:
        k += 1
    out, r.lp_sent = r.lp[r.lp_sent : k], k
    return out


def _label(persona: str | None) -> str:
    return "" if persona is None else persona


def _eos_ids(model, tok) -> set[int]:
    ids = set()
    for v in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
              tok.eos_token_id):  # fmt: skip
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v)
    return ids


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One token from a row's logits: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        cut = torch.cumsum(sp, 0) - sp >= top_p  # keep the smallest prefix reaching top_p
        sp[cut] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, si, sp)
    return int(torch.multinomial(probs, 1, generator=gen))


def _first_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Where the first stop string starts in ``text`` (searching from just before ``sent``)."""
    best = None
    for s in stops:
        k = text.find(s, max(0, sent - len(s) + 1))
        if k >= 0 and (best is None or k < best):
            best = k
    return best


@dataclass
class _Step:
    logits: torch.Tensor  # (rows, vocab) float32 on the CPU: each row's last position
    cache: Any


class _Rows:
    """The running rows of a batch: their requests, KV cache and attention mask, and the ids
    the next forward pass takes (one new token a row after the prompt)."""

    def __init__(self, engine: Engine, reqs: list[Request], cache=None, attn=None) -> None:
        self.engine, self.reqs, self.cache = engine, reqs, cache
        self.attn = attn if attn is not None else torch.zeros((0, 0), dtype=torch.long)
        self.ids = torch.zeros((len(reqs), 1), dtype=torch.long)

    def select(self, keep: list[int]) -> None:
        """Keep rows ``keep`` (indices) only."""
        if len(keep) == len(self.reqs):
            return
        idx = torch.tensor(keep, dtype=torch.long)
        if keep:
            self.cache.batch_select_indices(idx.to(self.engine.device))
        self.attn = self.attn[idx]
        self.reqs = [self.reqs[j] for j in keep]
        # positions that are padding in every row left are dropped: with requests joining all
        # the time the batch never drains, and its length must not grow past its longest row
        lead = int(self.attn.any(0).to(torch.int8).argmax()) if keep else 0
        if lead and self.engine.joins:  # (a cache that cannot be cut keeps its length)
            self.attn = self.attn[:, lead:]
            kv = _KV(self.cache)
            for i in range(len(kv)):
                kv[i] = tuple(t[:, :, lead:] for t in kv[i])

    def next_step(self) -> None:
        """The next forward pass: each row's sampled token, one more attended position."""
        self.ids = torch.tensor([[r.next] for r in self.reqs], dtype=torch.long)
        ones = torch.ones((len(self.reqs), 1), dtype=torch.long)
        self.attn = torch.cat([self.attn, ones], dim=1)

    def merge(self, other: _Rows) -> None:
        """Append ``other``'s rows: both caches left-padded to one length (masked out)."""
        if not other.reqs:
            return
        if not self.reqs:
            self.reqs, self.cache, self.attn, self.ids = (other.reqs, other.cache, other.attn,
                                                          other.ids)  # fmt: skip
            return
        n = max(self.attn.shape[1], other.attn.shape[1])
        mine, theirs = _KV(self.cache), _KV(other.cache)
        for i in range(len(mine)):
            mine[i] = tuple(torch.cat([_left_pad(x, n - 1, 2), _left_pad(y, n - 1, 2)])
                            for x, y in zip(mine[i], theirs[i], strict=True))  # fmt: skip
        self.attn = torch.cat([_left_pad(self.attn, n, 1), _left_pad(other.attn, n, 1)])
        self.ids = torch.cat([self.ids, other.ids])
        self.reqs = self.reqs + other.reqs


class _KV:
    """A transformers ``DynamicCache``'s per-layer ``(keys, values)``, each of shape ``(rows,
    heads, positions, dim)``: ``cache.layers[i].keys`` (transformers 5) or
    ``cache.key_cache[i]`` (older releases)."""

    def __init__(self, cache) -> None:
        self.cache = cache
        layers = getattr(cache, "layers", None)
        if layers is not None and any(getattr(x, "is_sliding", False) for x in layers):
            raise MaskstoreError("a sliding-window KV cache cannot be padded or cut")
        if layers is not None and all(hasattr(x, "keys") for x in layers):
            self.layers = layers
        elif hasattr(cache, "key_cache") and hasattr(cache, "value_cache"):
            self.layers = None
        else:
            raise MaskstoreError(
                f"continuous batching needs a transformers DynamicCache, not {type(cache).__name__}"
            )

    def __len__(self) -> int:
        return len(self.layers) if self.layers is not None else len(self.cache.key_cache)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layers is not None:
            return self.layers[i].keys, self.layers[i].values
        return self.cache.key_cache[i], self.cache.value_cache[i]

    def __setitem__(self, i: int, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.layers is not None:
            self.layers[i].keys, self.layers[i].values = kv
        else:
            self.cache.key_cache[i], self.cache.value_cache[i] = kv


def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """``t`` with zeros before it along ``dim`` up to length ``n``."""
    short = n - t.shape[dim]
    if short <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([t.new_zeros(shape), t], dim=dim)
