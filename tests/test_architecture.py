"""The layout's promises: no import cycles, a torch-free storage core, one store interface, one
name rule, a method registry that round-trips persona metadata, and the bugs found in review."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from _helpers import random_fingerprint, random_masks, write_bundle

from maskstore import create_bundle, open_bundle, pack_zip
from maskstore.errors import MaskstoreError
from maskstore.store.names import check_module_name, check_persona_name, check_ref_name
from maskstore.store.stores import LocalStore, ZipStore

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "cli":
        parts = ["maskstore", "cli", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str, known: set[str], typing: bool = False) -> set[str]:
    """Every maskstore module that ``path`` imports, at module level or inside functions,
    and with ``typing`` also in ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if (not typing and isinstance(child, ast.If)
                    and "TYPE_CHECKING" in ast.unparse(child.test)):  # fmt: skip
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                subs = {f"{mod}.{a.name}" for a in child.names} & known
                found.update(subs if len(subs) == len(child.names) else subs | {mod})
            visit(child)

    visit(tree)
    return found


def _graph(typing: bool = False) -> dict[str, set[str]]:
    files = [*ROOT.glob("maskstore/**/*.py"), *ROOT.glob("cli/*.py")]
    names = {_module_name(f): f for f in files}
    graph = {}
    for name, f in names.items():
        graph[name] = {m for m in _imports(f, name, set(names), typing) if m in names and m != name}
    return graph


@pytest.mark.parametrize("typing", [False, True], ids=["runtime", "type-level too"])
def test_no_import_cycles(typing):
    graph = _graph(typing)
    assert "maskstore.repo.snapshot" in graph and "maskstore.cli.main" in graph
    assert (
        "maskstore.store.format" in graph["maskstore.store.writer"]
    )  # the parser does see imports
    state: dict[str, int] = {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            walk(n, [n])


CORE = [
    "maskstore",
    "maskstore.store.bits",
    "maskstore.store.hashing",
    "maskstore.store.stores",
    "maskstore.store.chunks",
    "maskstore.store.format",
    "maskstore.store.writer",
    "maskstore.compare.algebra",
    "maskstore.repo",
    "maskstore.cli.main",
]


def test_storage_core_and_inspection_commands_never_import_torch(tmp_path, rng):
    fp = random_fingerprint(rng)
    write_bundle(tmp_path / "b", fp, random_masks(rng, fp, ["a", "b"]))
    code = f"""
import sys
{"; ".join(f"import {m}" for m in CORE)}
from maskstore.cli.main import main
from maskstore.repo import init_repo
repo = init_repo({str(tmp_path / "repo")!r})
repo.commit({str(tmp_path / "b")!r}, "one")
for args in (["info", "B"], ["verify", "B"], ["overlap", "B"], ["diff", "B", "a", "b"],
             ["log", "--repo", "R"], ["info", "R@main"]):
    args = [a.replace("B", {str(tmp_path / "b")!r}).replace("R", {str(tmp_path / "repo")!r})
            for a in args]
    sys.argv = ["maskstore", *args, "--json"]
    try:
        main()
    except SystemExit as e:
        assert not e.code, (args, e.code)
print("TORCH" if "torch" in sys.modules else "NO-TORCH", "zarr" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "NO-TORCH False"


def test_torch_names_still_reachable_from_the_package():
    import maskstore

    assert callable(maskstore.attach) and callable(maskstore.model_fingerprint)
    with pytest.raises(AttributeError):
        maskstore.no_such_name  # noqa: B018


# ---- stores


def test_store_capabilities_and_read_only_refusals(tmp_path, rng):
    fp = random_fingerprint(rng)
    write_bundle(tmp_path / "b", fp, random_masks(rng, fp, ["a"]))
    pack_zip(tmp_path / "b", tmp_path / "b.zip")
    z = ZipStore(tmp_path / "b.zip")
    assert z.read_only and not z.supports_writes and z.has("zarr.json")
    for call in (
        lambda: z.put("k", b"x"),
        lambda: z.create("k", b"x"),
        lambda: z.swap("k", b"x", None),  # was a TypeError
        lambda: z.delete("zarr.json"),
    ):
        with pytest.raises(MaskstoreError, match="read-only"):
            call()
    ro = LocalStore(tmp_path / "b", read_only=True)
    assert ro.read_only and not ro.supports_writes
    with pytest.raises(MaskstoreError, match="read-only"):
        ro.put("zarr.json", b"{}")
    assert json.loads(ro.get("zarr.json"))["node_type"] == "group"
    rw = LocalStore(tmp_path / "s")
    assert rw.supports_writes and rw.create("x/y", b"1") and not rw.create("x/y", b"2")
    assert rw.get("x/y") == b"1" and rw.children("x/") == ["y"]


def test_bundle_reads_the_same_from_a_folder_and_a_zip(tmp_path, rng):
    fp = random_fingerprint(rng)
    masks = random_masks(rng, fp, ["a", "b"])
    write_bundle(tmp_path / "b", fp, masks)
    pack_zip(tmp_path / "b", tmp_path / "b.zip")
    d, z = open_bundle(tmp_path / "b"), open_bundle(tmp_path / "b.zip")
    assert isinstance(d.store, LocalStore) and isinstance(z.store, ZipStore)
    assert d.digest == z.digest and d.personas == z.personas == ["a", "b"]
    assert d.nbytes_on_disk("a", "masks") == z.nbytes_on_disk("a", "masks") > 0
    for m, arr in masks["b"].items():
        assert np.array_equal(z.read_mask("b", m), arr)


# ---- names


@pytest.mark.parametrize("bad", ["v1\n", "\nv1", "a/b", "..", "a..b", ".hidden", "", "x" * 129])
def test_one_name_rule_for_personas_and_refs(bad):
    with pytest.raises(MaskstoreError):
        check_persona_name(bad)
    with pytest.raises(MaskstoreError):
        check_ref_name(bad)


def test_name_rules_accept_what_they_should():
    assert check_ref_name("v1.0-rc+2") == "v1.0-rc+2"
    assert check_persona_name("introvert_2") == "introvert_2"
    assert check_module_name("model.layers.0.mlp.up_proj")
    with pytest.raises(MaskstoreError):
        check_module_name("model.layers.0\n")
    with pytest.raises(MaskstoreError):
        check_ref_name("x" * 101)


# ---- writer checks shared by both write paths


def test_streamed_packed_blocks_are_checked_like_whole_masks(tmp_path):
    fp = {"architecture": "T", "modules": {"l.0.mlp.up_proj": [4, 10]}}
    mod = "l.0.mlp.up_proj"
    good = np.packbits(np.ones((4, 10), bool), axis=1, bitorder="little")
    with create_bundle(tmp_path / "b", fp) as b:
        with b.persona_writer("a", method="t") as w:
            w.write_packed_blocks(mod, iter([good[:2], good[2:]]))
            with pytest.raises(MaskstoreError, match="written twice"):
                w.write_packed_blocks(mod, iter([good]))
        bad = good.copy()
        bad[1, -1] |= 0x80  # a padding bit (column 15 of 10)
        with pytest.raises(MaskstoreError, match="padding bits"):
            with b.persona_writer("c", method="t") as w:
                w.write_packed_blocks(mod, iter([bad]))
        with pytest.raises(MaskstoreError, match="padding bits"):
            with b.persona_writer("d", method="t") as w:
                w.write_mask(mod, bad, packed=True)
    assert open_bundle(tmp_path / "b").personas == ["a"]


# ---- the repository


def test_push_of_a_version_id_creates_no_branch_named_after_it(tmp_path, rng):
    from maskstore.repo import init_repo, open_repo

    fp = random_fingerprint(rng)
    write_bundle(tmp_path / "b", fp, random_masks(rng, fp, ["a"]))
    repo = init_repo(tmp_path / "repo")
    vid = repo.commit(open_bundle(tmp_path / "b"), "one")
    with pytest.raises(MaskstoreError, match="tag it first"):
        repo.push(tmp_path / "remote", vid[:10])
    assert not (tmp_path / "remote" / "refs").exists()
    repo.tag("v1", vid[:10])
    repo.push(tmp_path / "remote", "v1")
    remote = open_repo(tmp_path / "remote")
    assert remote.tags() == {"v1": vid} and remote.branches() == {}


# ---- the method registry and the library build paths


def test_every_method_round_trips_its_params():
    from maskstore.build import BuildConfig, methods

    configs = [
        BuildConfig(method="wanda", sparsity=0.3),
        BuildConfig(method="wanda", sparsity=0.0, selection="nm", n=1, m=8),
        BuildConfig(method="sparsegpt", sparsity=0.6, damp=0.05),
        BuildConfig(method="contrastive-wanda", sparsity=0.2, phi="softplus", eps=1e-5, tau=2.0),
        BuildConfig(method="contrastive-wanda", sparsity=0.2, phi="relu", eps=1e-4),
        BuildConfig(method="contrastive-sparse", sparsity=0.4, selection="layer"),
        BuildConfig(method="contrastive-sparse-ref", sparsity=0.3, eps=1e-5, norm="sample-mean"),
        BuildConfig(method="column-norm", sparsity=0.5, block=64),
        BuildConfig(method="wanda", sparsity=0.5, norm="sample-mean", keep="floor"),
        BuildConfig(method="sparsegpt", sparsity=0.5, ties="index"),
    ]
    assert {c.method for c in configs} == set(methods.METHODS)
    for c in configs:
        back = BuildConfig.from_params(c.method, c.sparsity, c.params())
        assert back.params() == c.params() and back.method == c.method
        assert back.sparsity == c.sparsity
    # fields a config does not record come back as defaults, not as the other values
    relu = BuildConfig.from_params("contrastive-wanda", 0.2, {"phi": "relu", "eps": 1e-4})
    assert asdict(relu)["tau"] == BuildConfig().tau
    with pytest.raises(MaskstoreError, match="unknown method 'nope': use one of wanda"):
        BuildConfig.from_params("nope", 0.5, {})


def test_build_from_stats_equals_build_from_the_model(tmp_path, calib_files):
    from _tiny import byte_tokenizer, tiny_llama

    from maskstore.build import BuildConfig, build, build_from_stats
    from maskstore.build import calibration as cal

    model, tok = tiny_llama(seed=5), byte_tokenizer()
    calib = {
        n: list(cal.batches(tok, cal.read_samples(calib_files[n])[:4], max_tokens=48, batch_size=4))
        for n in ("introvert", "extrovert")
    }
    pairs = [("introvert", "extrovert")]
    first = BuildConfig(method="contrastive-wanda", sparsity=0.3)
    build(model, calib, tmp_path / "a", pairs=pairs, config=first)
    second = BuildConfig(method="contrastive-wanda", sparsity=0.6, phi="softplus")
    build(model, calib, tmp_path / "direct", pairs=pairs, config=second)
    build_from_stats(
        open_bundle(tmp_path / "a"), model, tmp_path / "stats", pairs=pairs, config=second
    )
    direct, stats = open_bundle(tmp_path / "direct"), open_bundle(tmp_path / "stats")
    assert direct.digest == stats.digest
    assert direct.persona("introvert")["params"]["phi"] == "softplus"
    assert open_bundle(tmp_path / "a").digest != direct.digest


def test_the_command_table_names_every_command_and_loads_only_its_module():
    from maskstore.cli import main as cli_main
    from maskstore.cli.app import app

    cli_main.register(["maskstore"])  # no command named: every module registers
    registered = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    assert registered == set(cli_main.COMMANDS)
    code = (
        "import sys\nfrom maskstore.cli import main\nmain.register(['maskstore', 'info', 'x'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('maskstore.cli.') and m.endswith('_cmd')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['maskstore.cli.bundle_cmd']"


def test_every_command_takes_json():
    """--json on every command: one vocabulary for scripts (schema_version in each document)."""
    import importlib
    import inspect

    from maskstore.cli import main
    from maskstore.cli.app import app

    for module in set(main.COMMANDS.values()):
        importlib.import_module(f"maskstore.cli.{module}")
    missing = [
        c.name or c.callback.__name__
        for c in app.registered_commands
        if "json_out" not in inspect.signature(c.callback).parameters
    ]
    assert missing == []


def test_every_option_has_help_and_choices_match_the_registries():
    """Help for every option and argument; enum-like options list their values (and those
    values are what the library accepts)."""
    import importlib

    import typer.main
    from maskstore.cli import main
    from maskstore.cli.app import app
    from maskstore.cli.build_cmd import METHODS

    from maskstore.build import methods
    from maskstore.compare import algebra

    for module in set(main.COMMANDS.values()):
        importlib.import_module(f"maskstore.cli.{module}")
    group = typer.main.get_command(app)
    missing, choices = [], {}
    for name, cmd in group.commands.items():
        for p in cmd.params:
            if p.name == "help":
                continue
            if not getattr(p, "help", None):
                missing.append(f"{name} {p.opts[0]}")
            if hasattr(p.type, "choices"):
                choices[(name, p.name)] = tuple(p.type.choices)
    assert missing == [], missing
    assert set(METHODS) == set(methods.METHODS)
    assert choices[("build", "method")] == METHODS
    assert set(choices[("overlap", "metric")]) == set(algebra.METRICS)
    assert choices[("build", "phi")] == ("relu", "softplus")
    assert choices[("build", "dtype")] == ("float32", "bfloat16", "float16")
    assert choices[("build", "only")] == ("attn", "mlp")
    free = {("build", "max_memory"), ("build", "nm"), ("eval", "template"), ("build", "device")}
    assert not free & set(choices)  # free-form values stay free


def test_one_import_for_the_api(tmp_path, rng):
    """``from maskstore import build, BuildConfig, load_model, attach, open, open_repo,
    overlap``; the storage names load no torch; ``build`` is callable and still the module."""
    fp = random_fingerprint(rng)
    write_bundle(tmp_path / "b", fp, random_masks(rng, fp, ["a", "b", "c"]))
    code = f"""
import sys
from maskstore import open, open_repo, overlap
pairs = overlap(open({str(tmp_path / "b")!r}), by="kind")
assert len(pairs) == 3 and all("jaccard" in p and p["groups"] for p in pairs), pairs
assert "torch" not in sys.modules
from maskstore import build, BuildConfig, load_model, attach
from maskstore.build import BuildConfig as B2, build as b2
assert callable(build) and BuildConfig is B2 and callable(b2)
try:
    BuildConfig("wanda")
except TypeError:
    print("KW-ONLY")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "KW-ONLY"


STORAGE_CORE = ["store", "compare.algebra", "errors", "files", "progress", "repo"]
TORCH_EDGE = ["build", "runtime", "serve", "compare.evaluate", "models", "modules", "checkpoint"]


def test_every_module_sits_in_one_side():
    """A new module is placed on purpose: in the storage core or on the torch edge (or one of
    the few shared leaves), so the check below covers it."""
    graph = _graph()
    shared = {"maskstore", "maskstore._moved", "maskstore._version", "maskstore._threads",
              "maskstore.store", "maskstore.compare"}  # fmt: skip

    def placed(mod: str) -> bool:
        return (
            mod in shared
            or mod.startswith("maskstore.cli")
            or any(
                mod == f"maskstore.{n}" or mod.startswith(f"maskstore.{n}.")
                for n in STORAGE_CORE + TORCH_EDGE
            )
        )

    assert not sorted(m for m in graph if not placed(m))


def test_the_storage_core_never_reaches_the_torch_edge():
    """No storage-core module imports a torch-side one, at module level, inside a function or
    for typing (recipes get their scoring injected)."""
    graph = _graph(typing=True)

    def under(mod: str, names: list[str]) -> bool:
        return any(mod == f"maskstore.{n}" or mod.startswith(f"maskstore.{n}.") for n in names)

    bad = sorted(f"{a} -> {b}" for a, deps in graph.items() if under(a, STORAGE_CORE)
                 for b in deps if under(b, TORCH_EDGE))  # fmt: skip
    assert not bad, bad


def test_help_is_readable_at_80_columns():
    """Every command's --help at COLUMNS=80: no line past 80 characters, nothing cut short
    (one process prints them all: a process per command spent seconds importing)."""
    import json
    import os

    code = """
import contextlib, io, json, sys
from maskstore.cli.main import COMMANDS, main
out = {}
for command in COMMANDS:
    sys.argv = ["maskstore", command, "--help"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main()
            rc = 0
        except SystemExit as e:
            rc = e.code or 0
    out[command] = [rc, buf.getvalue()]
print(json.dumps(out))
"""
    env = {**os.environ, "COLUMNS": "80"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    helps = json.loads(run.stdout.splitlines()[-1])
    from maskstore.cli.main import COMMANDS

    assert set(helps) == set(COMMANDS)
    for command, (rc, text) in helps.items():
        assert rc == 0 and "Usage" in text, (command, rc, text)
        assert "…" not in text, (command, text)
        long = [line for line in text.splitlines() if len(line) > 80]
        assert not long, (command, long)


def test_old_import_paths_are_the_moved_modules():
    """``maskstore.format`` & co. (before the job subpackages) import as the very modules at
    the new paths: one object, so isinstance checks and monkeypatches still hold; the storage
    ones still without torch."""
    code = """
import importlib, sys
import maskstore.format as old
from maskstore import writer
from maskstore.store import format as new
assert old is new and sys.modules["maskstore.format"] is new, (old, new)
assert writer is importlib.import_module("maskstore.store.writer")
assert old.Bundle is __import__("maskstore").Bundle
assert "torch" not in sys.modules, "a storage module's old path imported torch"
from maskstore._moved import MOVED
for name, where in MOVED.items():
    assert importlib.import_module("maskstore." + name) is importlib.import_module(
        "maskstore." + where), name
old.DEFAULT_CHUNK_BYTES = 7  # a monkeypatch through the old path is seen at the new one
assert new.DEFAULT_CHUNK_BYTES == 7
try:
    import maskstore.nonesuch
except ModuleNotFoundError:
    print("OK")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"


def test_the_cli_stays_a_shell():
    """No command-line function over 80 lines: the work lives in the library."""
    long = []
    for f in sorted((ROOT / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = node.end_lineno - node.lineno + 1
                if size > 80:
                    long.append(f"{f.name}:{node.name} ({size} lines)")
    assert not long, long
