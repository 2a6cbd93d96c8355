"""Versioning commands: init, commit, log, tag, branch, checkout, push, pull, export, import, gc."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from maskstore.errors import MaskstoreError
from maskstore.repo import init_repo, open_repo

from ._common import console, emit_json, fmt_bytes, progress, safe
from .app import BundleArg, JsonOpt, app, choice

DEFAULT_REPO = Path(".maskstore")


def _find_repo(ctx: typer.Context, param: object, value: Path) -> Path:
    """Without --repo or $MASKSTORE_REPO, the nearest .maskstore in this folder or a parent
    (as git finds .git); else ./.maskstore, which commands that create one create."""
    source = ctx.get_parameter_source(param.name)  # type: ignore[attr-defined]
    if getattr(source, "name", None) != "DEFAULT":  # typer may vendor click: compare by name
        return value
    from maskstore.repo import find_repo

    return find_repo(Path.cwd()) or value


EndpointOpt = Annotated[str | None, typer.Option(help="S3 endpoint (a server other than AWS)")]
RegionOpt = Annotated[str | None, typer.Option(help="S3 region")]
ProfileOpt = Annotated[str | None, typer.Option(help="AWS profile for its credentials")]
RepoOpt = Annotated[
    Path,
    typer.Option(
        "--repo",
        envvar="MASKSTORE_REPO",
        callback=_find_repo,
        help="repository folder (default: the nearest .maskstore here or above)",
    ),
]
SignOpt = Annotated[
    Path | None,
    typer.Option("--sign", help="SSH private key that signs the ref (ssh-keygen -Y sign)"),
]
AllowedOpt = Annotated[
    Path | None,
    typer.Option(
        "--allowed-signers",
        help="ssh allowed-signers file (default: trust.allowed_signers in the repo's config.json)",
    ),
]
OursOpt = Annotated[
    list[str] | None,
    typer.Option("--ours", help="in a merge, keep the local side of this conflicting persona"),
]
TheirsOpt = Annotated[
    list[str] | None,
    typer.Option("--theirs", help="in a merge, take the other side of this conflicting persona"),
]
RequireOpt = Annotated[
    bool,
    typer.Option("--require-signed", help="refuse refs without a signature by an allowed signer"),
]


@app.command()
def init(
    repo: Annotated[
        Path,
        typer.Option("--repo", envvar="MASKSTORE_REPO", help="repository folder to create"),
    ] = DEFAULT_REPO,
    json_out: JsonOpt = False,
) -> None:
    """Create a repository folder (./.maskstore here, even inside another repository)."""
    init_repo(repo)
    if json_out:
        emit_json({"repo": str(repo)})
        return
    console.print(f"repository ready at {safe(repo)}")


@app.command()
def commit(
    bundle: BundleArg,
    message: Annotated[str, typer.Option("-m", "--message", help="what changed")],
    branch: Annotated[str, typer.Option(help="branch to advance")] = "main",
    recipe: Annotated[
        list[str] | None, typer.Option(help="store this persona as a recipe (no mask bits)")
    ] = None,
    no_delta: Annotated[
        bool, typer.Option("--no-delta", help="never store masks as xor deltas")
    ] = False,
    sign: SignOpt = None,
    author: Annotated[
        str | None,
        typer.Option(help="who commits (default: $MASKSTORE_AUTHOR, config, git's user)"),
    ] = None,
    allow_empty: Annotated[
        bool, typer.Option("--allow-empty", help="commit even when no persona changed")
    ] = False,
    repo: RepoOpt = DEFAULT_REPO,
    json_out: JsonOpt = False,
) -> None:
    """Snapshot a bundle as a new version (the repository is created if needed)."""
    from maskstore.store.opener import open_bundle

    b = open_bundle(bundle)
    r = init_repo(repo)
    total = sum(len(b.persona(p)["modules"]) for p in b.personas)
    with progress(disable=json_out) as bar:
        task = bar.add_task("committing", total=total)
        vid = r.commit(
            b,
            message,
            branch=branch,
            delta=not no_delta,
            recipes=tuple(recipe or ()),
            progress=lambda d, t: bar.update(task, completed=d, total=t),
            sign=sign,
            author=author,
            allow_empty=allow_empty,
        )
    snap = r.snapshot(vid)
    size = snap.bundle.nbytes_on_disk()
    if json_out:
        emit_json(
            {
                "version": vid,
                "branch": branch,
                "bundle_digest": snap.manifest["bundle_digest"],
                "stored_bytes": size,
            }
        )
        return
    console.print(
        f"[bold]{vid[:12]}[/] on {safe(branch)}: {safe(message)}  ({len(b.personas)} personas, {fmt_bytes(size)} referenced)"
    )


@app.command()
def log(
    ref: Annotated[str, typer.Argument(help="branch, tag or version")] = "main",
    repo: RepoOpt = DEFAULT_REPO,
    json_out: JsonOpt = False,
) -> None:
    """History of a branch (or any version), newest first."""
    r = open_repo(repo)
    entries = r.log(ref)
    tags: dict[str, list[str]] = {}
    for name, v in {**r.tags(), **r.branches()}.items():
        tags.setdefault(v, []).append(name)
    if json_out:
        emit_json(
            {
                "ref": ref,
                "versions": [e | {"refs": sorted(tags.get(e["version"], []))} for e in entries],
            }
        )
        return
    t = Table("version", "parents", "refs", "created", "author", "personas", "message")
    for e in entries:
        t.add_row(
            e["version"][:12],
            " + ".join(p[:8] for p in e["parents"]),
            safe(", ".join(sorted(tags.get(e["version"], [])))),
            safe(e["created"][:16].replace("T", " ")),
            safe(e.get("author") or "-"),
            safe(", ".join(e["personas"])),
            safe(e["message"]),
        )
    console.print(t)


@app.command()
def tag(
    name: Annotated[str | None, typer.Argument(help="new tag name (omit to list)")] = None,
    version: Annotated[str, typer.Argument(help="version, tag or branch (default main)")] = "main",
    sign: SignOpt = None,
    repo: RepoOpt = DEFAULT_REPO,
    json_out: JsonOpt = False,
) -> None:
    """Name a version (tags never move; --sign signs it with an SSH key), or list the tags."""
    if name is None:
        tags = dict(sorted(open_repo(repo).tags().items()))
        if json_out:
            emit_json({"tags": tags})
            return
        for n, v in tags.items():
            console.print(f"{safe(n)}  {safe(v[:12])}")
        return
    vid = open_repo(repo).tag(name, version, sign=sign)
    if json_out:
        emit_json({"tag": name, "version": vid, "signed": bool(sign)})
        return
    console.print(f"tag {safe(name)} -> {vid[:12]}" + (" (signed)" if sign else ""))


@app.command("sign")
def sign_cmd(
    name: Annotated[str, typer.Argument(help="tag or branch")],
    key: Annotated[Path, typer.Option("--key", help="SSH private key")],
    repo: RepoOpt = DEFAULT_REPO,
    json_out: JsonOpt = False,
) -> None:
    """Sign a tag or branch where it points now (ssh-keygen -Y sign)."""
    vid = open_repo(repo).sign(name, key)
    if json_out:
        emit_json({"ref": name, "version": vid, "signed": True})
        return
    console.print(f"signed {safe(name)} -> {vid[:12]}")


@app.command()
def branch(
    name: Annotated[str | None, typer.Argument(help="new branch name (omit to list)")] = None,
    version: Annotated[str, typer.Argument(help="where it starts")] = "main",
    delete: Annotated[bool, typer.Option("--delete", help="delete the branch")] = False,
    repo: RepoOpt = DEFAULT_REPO,
    json_out: JsonOpt = False,
) -> None:
    """List branches, start one at a version, or delete one."""
    r = open_repo(repo)
    if delete:
        if name is None:
            raise MaskstoreError("branch --delete needs a branch name")
        r.delete_branch(name)
        if json_out:
            emit_json({"branch": name, "deleted": True})
            return
        console.print(f"deleted branch {safe(name)}")
        return
    if name is None:
        branches = dict(sorted(r.branches().items()))
        if json_out:
            emit_json({"branches": branches})
            return
        for n, v in branches.items():
            console.print(f"{safe(n)}  {safe(v[:12])}")
        return
    if r.branch_head(name) is not None:
        raise MaskstoreError(f"branch {name!r} exists: pick another name")
    r.set_branch(name, r.resolve(version), None)
    if json_out:
        emit_json({"branch": name, "version": r.resolve(name)})
        return
    console.print(f"branch {safe(name)} -> {r.resolve(name)[:12]}")


@app.command()
def checkout(
    version: Annotated[str, typer.Argument(help="version, tag or branch")],
    out: Annotated[Path, typer.Option("--out", help="bundle to write")],
    model: Annotated[
        Path | None, typer.Option(help="model to recompute recipe personas (default: embedded)")
    ] = None,
    with_model: Annotated[
        bool, typer.Option(help="load a model even without --model (for recipes)")
    ] = False,
    force: Annotated[bool, typer.Option(help="replace an existing bundle")] = False,
    repo: RepoOpt = DEFAULT_REPO,
    json_out: JsonOpt = False,
) -> None:
    """Write a version as a plain bundle."""
    r = open_repo(repo)
    snap = r.snapshot(version)
    mdl = None
    if model is not None or with_model or any(snap.is_recipe(p) for p in snap.personas):
        from maskstore.models import load_model, recorded_model

        mdl, _ = load_model(*recorded_model(snap.bundle.model_source, model))
    total = sum(len(snap.bundle.persona(p)["modules"]) for p in snap.personas)
    with progress(disable=json_out) as bar:
        task = bar.add_task("checking out", total=total)
        recompute = None
        if mdl is not None:
            from maskstore.build import recompute_recipe as recompute
        r.checkout(version, out, model=mdl, force=force, progress=lambda d, t: bar.update(task, completed=d, total=t),
                   recompute=recompute)  # fmt: skip
    if json_out:
        emit_json({"version": snap.version, "out": str(out)})
        return
    console.print(f"checked out {snap.version[:12]} to {safe(out)}")


_OUTCOME = {
    "created": "new here",
    "up-to-date": "already up to date",
    "fast-forward": "fast-forwarded",
    "ahead": "the local branch already contains it",
    "forced": "reset to the remote's head (--force)",
    "merged": "merged",
    "tag": "tag",
}


def _merge_doc(res) -> dict:
    return {
        "version": res.version,
        "base": res.base,
        "taken": res.taken,
        "removed": res.removed,
        "resolved": res.resolved,
    }


def _transfer(verb: str, run, remote: str, ref: str, json_out: bool) -> None:
    with progress(disable=json_out) as bar:
        task = bar.add_task(f"{verb}ing {ref}", total=None)
        rep = run(lambda done, total: bar.update(task, completed=done, total=total))
    doc = {
        "remote": remote,
        "ref": ref,
        "objects": rep.objects,
        "bytes": rep.bytes,
        "skipped": rep.skipped,
    }
    if verb == "pull":
        doc |= {"outcome": rep.outcome, "version": rep.version, "discarded": rep.discarded}
        doc["merge"] = _merge_doc(rep.merge) if rep.merge else None
        doc["stale"] = rep.stale
    if json_out:
        emit_json(doc)
        return
    where = "there" if verb == "push" else "here"
    console.print(
        f"{verb}ed {safe(ref)} {'to' if verb == 'push' else 'from'} {safe(remote)}: {rep.objects} objects, "
        f"{fmt_bytes(rep.bytes)} moved, {rep.skipped} already {where}"
    )
    if verb == "pull" and rep.outcome != "tag":
        console.print(f"{safe(ref)} -> {rep.version[:12]}: {_OUTCOME[rep.outcome]}")
    if rep.discarded:
        console.print(
            f"[yellow]discarded local head {rep.discarded}[/] (kept 30 days; restore it with "
            f"maskstore branch {safe(ref)}-old {rep.discarded[:12]})"
        )
    if rep.merge:
        _print_merge(rep.merge)
    for path in getattr(rep, "stale", []):  # pull moves the branch, not bundles checked out
        console.print(f"[yellow]{safe(path)} still holds the previous {safe(ref)}[/]: take the "
                      f"new one with maskstore checkout {safe(ref)} --out {safe(path)} --force",
                      highlight=False, soft_wrap=True)  # fmt: skip


def _print_merge(res) -> None:
    sides: dict[str, list[str]] = {}
    for p, side in res.taken.items():
        if p not in res.resolved:
            sides.setdefault(side, []).append(p)
    for side in ("ours", "theirs", "both"):
        if sides.get(side):
            label = {"ours": "kept ours", "theirs": "took theirs", "both": "same on both"}[side]
            console.print(f"  {label}: {safe(', '.join(sides[side]))}")
    if res.removed:
        console.print(f"  removed: {safe(', '.join(res.removed))}")
    for p, side in res.resolved.items():
        console.print(f"  conflict {safe(p)}: kept {side}")


@app.command()
def push(
    remote: Annotated[str, typer.Argument(help="folder or URL (s3://bucket/prefix)")],
    ref: Annotated[str, typer.Argument(help="tag or branch")] = "main",
    repo: RepoOpt = DEFAULT_REPO,
    json_out: JsonOpt = False,
) -> None:
    """Send a tag or branch to a remote; only missing objects move."""
    r = open_repo(repo)
    _transfer("push", lambda cb: r.push(remote, ref, progress=cb), remote, ref, json_out)


@app.command()
def pull(
    remote: Annotated[str, typer.Argument(help="folder or URL (s3://bucket/prefix)")],
    ref: Annotated[str, typer.Argument(help="tag or branch")] = "main",
    require_signed: RequireOpt = False,
    allowed_signers: AllowedOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="reset the local branch to the remote's head")
    ] = False,
    ours: OursOpt = None,
    theirs: TheirsOpt = None,
    repo: RepoOpt = DEFAULT_REPO,
    json_out: JsonOpt = False,
) -> None:
    """Fetch a tag or branch from a remote; every object is verified on arrival.

    A local branch that has diverged from the remote's is merged persona by persona: a persona
    changed on one side only is taken from that side; one changed on both sides is a conflict
    that --ours NAME or --theirs NAME resolves. The merge is a version with two parents."""
    fresh = not Path(repo).exists()  # a pull that fails leaves no repository it created
    r = init_repo(repo)
    allowed = str(allowed_signers) if allowed_signers else None
    with _removed_on_failure(Path(repo) if fresh else None):
        _pull(r, remote, ref, require_signed, allowed, force, ours, theirs, json_out)


@contextmanager
def _removed_on_failure(path: Path | None) -> Iterator[None]:
    """Remove ``path`` (a folder this command created) when the block fails."""
    try:
        yield
    except BaseException:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
        raise


def _pull(r, remote, ref, require_signed, allowed, force, ours, theirs, json_out) -> None:
    _transfer(
        "pull",
        lambda cb: r.pull(
            remote,
            ref,
            progress=cb,
            require_signed=require_signed or None,
            allowed_signers=allowed,
            force=force,
            ours=tuple(ours or ()),
            theirs=tuple(theirs or ()),
        ),
        remote,
        ref,
        json_out,
    )


@app.command()
def merge(
    ref: Annotated[str, typer.Argument(help="version, tag or branch to merge in")],
    into: Annotated[str, typer.Option("--into", help="branch that receives the merge")] = "main",
    ours: OursOpt = None,
    theirs: TheirsOpt = None,
    repo: RepoOpt = DEFAULT_REPO,
    json_out: JsonOpt = False,
) -> None:
    """Merge a version into a branch persona by persona (conflicts: --ours / --theirs)."""
    r = open_repo(repo)
    before = r.branch_head(into)
    res = r.merge(ref, into, tuple(ours or ()), tuple(theirs or ()))
    head = r.resolve(into)
    outcome = "merged" if res else ("up-to-date" if head == before else "fast-forward")
    if json_out:
        emit_json(
            {
                "branch": into,
                "version": head,
                "outcome": outcome,
                "merge": _merge_doc(res) if res else None,
            }
        )
        return
    if res is None:
        console.print(f"{safe(into)} -> {head[:12]}: {outcome} (no merge needed)")
        return
    console.print(f"{safe(into)} -> {head[:12]}: merged {safe(ref)}")
    _print_merge(res)


@app.command()
def export(
    version: Annotated[str, typer.Argument(help="version, tag or branch")],
    out: Annotated[Path | None, typer.Argument(help="the .zip to write (or --out)")] = None,
    out_opt: Annotated[Path | None, typer.Option("--out", help="the .zip to write")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing file")] = False,
    repo: RepoOpt = DEFAULT_REPO,
    json_out: JsonOpt = False,
) -> None:
    """One .zip holding a version and everything it needs."""
    from ._common import one_out

    out = one_out(out, out_opt)
    open_repo(repo).export(version, out, force=force)
    if json_out:
        emit_json({"version": version, "out": str(out), "bytes": out.stat().st_size})
        return
    console.print(f"wrote {safe(out)} ({fmt_bytes(out.stat().st_size)})")


@app.command("import")
def import_cmd(
    path: Annotated[Path, typer.Argument(help="an export .zip (maskstore export)")],
    require_signed: RequireOpt = False,
    allowed_signers: AllowedOpt = None,
    repo: RepoOpt = DEFAULT_REPO,
    json_out: JsonOpt = False,
) -> None:
    """Bring the versions and refs of an export .zip into the repository (verified)."""
    allowed = str(allowed_signers) if allowed_signers else None
    names = init_repo(repo).import_(path, require_signed or None, allowed)
    if json_out:
        emit_json({"imported": list(names), "path": str(path)})
        return
    console.print(f"imported {safe(', '.join(names))} from {safe(path)}")


@app.command()
def gc(
    grace: Annotated[
        float, typer.Option(help="keep unreferenced objects younger than this (seconds)")
    ] = 3600.0,
    repo: RepoOpt = DEFAULT_REPO,
    json_out: JsonOpt = False,
) -> None:
    """Remove objects that no tag or branch reaches."""
    n, freed = open_repo(repo).gc(grace_seconds=grace)
    if json_out:
        emit_json({"removed": n, "bytes": freed})
        return
    console.print(f"removed {n} objects ({fmt_bytes(freed)})")


@app.command()
def remote(
    action: Annotated[choice("list", "add", "remove"), typer.Argument(help="what to do")] = "list",
    name: Annotated[str | None, typer.Argument(help="the remote's name (add, remove)")] = None,
    url: Annotated[str | None, typer.Argument(help="its folder or s3:// URL (add)")] = None,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
    profile: ProfileOpt = None,
    repo: RepoOpt = DEFAULT_REPO,
    json_out: JsonOpt = False,
) -> None:
    """Named remotes: push, pull and fetch take NAME where they take a URL."""
    r = open_repo(repo)
    if action == "add":
        if not name or not url:
            raise MaskstoreError("remote add needs NAME and URL: maskstore remote add NAME URL")
        r.add_remote(name, url, endpoint_url=endpoint_url, region=region, profile=profile)
    elif action == "remove":
        if not name:
            raise MaskstoreError("remote remove needs NAME")
        r.remove_remote(name)
    elif name or url or endpoint_url or region or profile:
        raise MaskstoreError("remote list takes no name or options: maskstore remote list")
    remotes = r.remotes()
    if json_out:
        emit_json({"remotes": remotes})
        return
    if action != "list":
        console.print(f"remote {safe(name)} {'added' if action == 'add' else 'removed'}")
        return
    t = Table("name", "url", "options")
    for n, e in sorted(remotes.items()):
        opts = ", ".join(f"{k}={v}" for k, v in sorted(e.items()) if k != "url")
        t.add_row(safe(n), safe(e.get("url", "")), safe(opts))
    console.print(t)


@app.command()
def fetch(
    remote: Annotated[str, typer.Argument(help="a configured remote's name")],
    ref: Annotated[str | None, typer.Argument(help="tag or branch (default: all)")] = None,
    repo: RepoOpt = DEFAULT_REPO,
    json_out: JsonOpt = False,
) -> None:
    """Bring a remote's tags and branches with their objects, verified, moving no local ref;
    status then says how the local branches stand against them."""
    r = open_repo(repo)
    with progress(disable=json_out) as bar:
        task = bar.add_task(f"fetching from {remote}", total=None)
        got = r.fetch(remote, ref, progress=lambda d, t: bar.update(task, completed=d, total=t))
    if json_out:
        emit_json({"remote": remote, "refs": got})
        return
    for name, vid in sorted(got.items()):
        console.print(f"{safe(remote)}/{safe(name)} -> {vid[:12]}")


@app.command()
def clone(
    url: Annotated[str, typer.Argument(help="folder or s3:// URL of a repository")],
    directory: Annotated[Path, typer.Argument(help="the new repository folder")],
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
    profile: ProfileOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """A new repository with URL as remote 'origin' and its tags and branches, all verified;
    nothing is left behind when it fails."""
    if directory.exists() or directory.is_symlink():
        raise MaskstoreError(f"{directory} already exists: clone into a new folder")
    with _removed_on_failure(directory):
        r = init_repo(directory)
        r.add_remote("origin", url, endpoint_url=endpoint_url, region=region, profile=profile)
        src = r.remote_store("origin")
        from maskstore.repo.refs import Refs

        refs = Refs(src, src.url)
        names = sorted({*refs.all("branches"), *refs.all("tags")})
        if not names:
            raise MaskstoreError(f"{url} has no tags or branches: nothing to clone")
        with progress(disable=json_out) as bar:
            task = bar.add_task("cloning", total=None)
            for n in names:
                r.pull("origin", n, progress=lambda d, t: bar.update(task, completed=d, total=t))
        r.fetch("origin")
    if json_out:
        emit_json({"repo": str(directory), "remote": url, "refs": names})
        return
    console.print(f"cloned {safe(url)} into {safe(directory)}: {', '.join(map(safe, names))}")


@app.command()
def status(
    bundle: Annotated[
        str | None, typer.Argument(help="a bundle to compare with the branch head")
    ] = None,
    branch: Annotated[str, typer.Option(help="the branch to compare with")] = "main",
    repo: RepoOpt = DEFAULT_REPO,
    json_out: JsonOpt = False,
) -> None:
    """How a bundle differs from the branch head (personas added, removed, changed), and how
    the branch stands against each remote's last fetched head."""
    from maskstore.repo.history import ancestors

    r = open_repo(repo)
    head = r.branch_head(branch)
    doc: dict = {"branch": branch, "head": head, "bundle": bundle}
    if bundle is not None:
        from maskstore.store.opener import open_bundle

        b = open_bundle(bundle)
        had = {}
        if head is not None:
            had = {p: e["meta"]["digest"] for p, e in r.objects.manifest(head)["personas"].items()}
        now = {p: b.persona(p)["digest"] for p in b.personas}
        base = r.worktree(bundle)  # the version this bundle last held (checkout or commit)
        doc |= {
            "added": sorted(set(now) - set(had)),
            "removed": sorted(set(had) - set(now)),
            "changed": sorted(p for p in set(now) & set(had) if now[p] != had[p]),
            "unchanged": sorted(p for p in set(now) & set(had) if now[p] == had[p]),
            "base": base,
        }
        if base is not None:  # git's ahead/behind, persona by persona
            was = {p: e["meta"]["digest"] for p, e in r.objects.manifest(base)["personas"].items()}
            moved = [p for p in sorted(set(now) | set(had)) if now.get(p) != had.get(p)]
            doc["here"] = [
                p for p in moved if now.get(p) != was.get(p) and had.get(p) == was.get(p)
            ]
            doc["upstream"] = [
                p for p in moved if now.get(p) == was.get(p) and had.get(p) != was.get(p)
            ]
            doc["both"] = [p for p in moved if p not in doc["here"] and p not in doc["upstream"]]
    remotes = {}
    for name in sorted(r.remotes()):
        theirs = r.tracking(name).get(f"branches/{branch}")
        if theirs is None or head is None:
            state = "not fetched" if theirs is None else "only there"
        elif theirs == head:
            state = "up to date"
        elif theirs in set(ancestors(r, head)):
            state = "ahead"
        elif head in set(ancestors(r, theirs)):
            state = "behind"
        else:
            state = "diverged"
        remotes[name] = {"head": theirs, "state": state}
    doc["remotes"] = remotes
    if json_out:
        emit_json(doc)
        return
    console.print(f"on branch {safe(branch)} at {head[:12] if head else '(no version yet)'}")
    if bundle is not None:
        marks = (("added", "green", "+"), ("removed", "red", "-"), ("changed", "yellow", "~"))
        upstream = set(doc.get("upstream", ())) | set(doc.get("both", ()))
        for key, colour, mark in marks:
            for p in doc[key]:
                if p not in upstream:
                    console.print(f"  [{colour}]{mark} {safe(p)}[/]")
        for p in doc.get("both", ()):
            console.print(f"  [red]! {safe(p)}[/]: changed here and upstream")
        if doc.get("upstream"):
            console.print(
                f"  changed upstream since this bundle's version, not here: "
                f"{safe(', '.join(doc['upstream']))} (take them with maskstore "
                f"checkout {safe(branch)} --out {safe(bundle)} --force)",
                soft_wrap=True,
            )  # fmt: skip  (a command to paste: never wrapped)
        if not (doc["added"] or doc["removed"] or doc["changed"]):
            console.print("  nothing to commit: every persona is the branch head's")
    for name, rec in remotes.items():
        console.print(f"  {safe(name)}/{safe(branch)}: {rec['state']}")
