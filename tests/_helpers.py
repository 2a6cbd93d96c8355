"""Helpers the tests import (``from _helpers import ...``): bundles of random masks, the
build arguments of the introvert/extrovert pair, and the check of --json documents against
their schemas. Fixtures live in conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from maskstore import create_bundle


def random_fingerprint(rng: np.random.Generator, n_layers: int = 2) -> dict:
    mods = {}
    for layer in range(n_layers):
        for leaf, kind in (
            ("q_proj", "self_attn"),
            ("o_proj", "self_attn"),
            ("up_proj", "mlp"),
            ("down_proj", "mlp"),
        ):
            mods[f"model.layers.{layer}.{kind}.{leaf}"] = [
                int(rng.integers(1, 40)),
                int(rng.integers(1, 50)),
            ]
    return {"architecture": "TestArch", "modules": mods}


def write_bundle(path: Path, fp: dict, masks: dict[str, dict[str, np.ndarray]], **kw) -> Path:
    """Write bool masks {persona: {module: (out, in)}} into a new bundle."""
    with create_bundle(path, fp, force=kw.pop("force", False), source=kw.pop("source", None)) as b:
        for name, mods in masks.items():
            with b.persona_writer(name, method="test", **kw) as w:
                for m, arr in mods.items():
                    w.write_mask(m, arr)
    return path


def random_masks(
    rng, fp: dict, names: list[str], p: float = 0.5
) -> dict[str, dict[str, np.ndarray]]:
    return {n: {m: rng.random(tuple(s)) < p for m, s in fp["modules"].items()} for n in names}


def pair_args(calib_files: dict[str, Path]) -> list[str]:
    """``maskstore build`` arguments for the introvert/extrovert pair with contrastive Wanda."""
    return [
        "--persona", f"introvert={calib_files['introvert']}",
        "--persona", f"extrovert={calib_files['extrovert']}",
        "--pair", "introvert:extrovert", "--method", "contrastive-wanda",
    ]  # fmt: skip


CLI_SCHEMAS = Path(__file__).resolve().parents[1] / "schemas" / "cli"
_CLI_VALIDATORS: dict = {}
# commands that share a schema: the set operations all print a derived persona
SCHEMA_OF = {
    **dict.fromkeys(("union", "intersect", "subtract", "xor", "complement", "vote", "blend"), "op"),
    **dict.fromkeys(("cp", "mv", "rm"), "edit"),
}


def cli_schema(name: str) -> dict:
    return json.loads((CLI_SCHEMAS / f"{name}.json").read_text())


def check_cli_document(command: str, code: int, out: str) -> None:
    """A --json document is valid against ``schemas/cli/<command>.json`` (``error.json`` when
    the command failed)."""
    import fastjsonschema

    doc = json.loads(out)
    name = "error" if isinstance(doc, dict) and "error" in doc else SCHEMA_OF.get(command, command)
    if name not in _CLI_VALIDATORS:
        _CLI_VALIDATORS[name] = fastjsonschema.compile(cli_schema(name))
    try:
        _CLI_VALIDATORS[name](json.loads(out))
    except fastjsonschema.JsonSchemaException as e:
        msg = f"maskstore {command} --json: {e.message} (schemas/cli/{name}.json)"
        raise AssertionError(msg) from None


def run_with_joiners(engine, tok, first: list, later: list, after: int, wait: float = 60) -> list:
    """Greedy texts of ``first`` (``(persona, prompt, max_tokens)`` each), submitted together,
    and of ``later``, submitted from the engine's thread on the first request's ``after``-th
    text delta, so that they arrive while its batch runs (to join it, or wait)."""
    import threading

    from maskstore.serve import Request

    jobs = first + later
    done = [threading.Event() for _ in jobs]
    out = [""] * len(jobs)
    deltas = [0]

    def sink(i):
        def f(ev):
            assert ev.kind in ("delta", "done"), ev
            if ev.kind == "done":
                done[i].set()
                return
            out[i] += ev.text
            if i == 0:
                deltas[0] += 1
                if deltas[0] == after:  # on the engine thread, mid-batch
                    for k, job in enumerate(later, start=len(first)):
                        submit(k, job)

        return f

    def submit(i, job):
        p, prompt, n = job
        engine.submit(Request(p, tok(prompt)["input_ids"], n, sink(i), temperature=0.0))

    for i, job in enumerate(first):
        submit(i, job)
    assert all(d.wait(wait) for d in done)
    return out


def unblock_fifo_later(fifo: Path, after: float = 30.0) -> None:
    """Open ``fifo`` from the other side after ``after`` s (for writing and for reading, both
    without blocking where the OS allows): code that wrongly blocked on it, reading or writing,
    is freed (and then fails its test) instead of hanging the suite. A test that passes leaves
    the thread nothing to do."""
    import os
    import threading
    import time

    def unblock() -> None:
        time.sleep(after)
        for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_NONBLOCK):
            try:
                os.close(os.open(fifo, flags))
            except OSError:  # gone once the test ended, or no reader to write to
                pass

    threading.Thread(target=unblock, daemon=True).start()
