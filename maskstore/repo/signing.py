"""Signed refs: who says that a tag or branch names a version, anchored in an SSH signature.

As git does with ``gpg.format=ssh``, maskstore runs ``ssh-keygen -Y sign`` over a payload that
binds the ref's kind, its name and the version id (a blake2b-256 of the manifest, which pins every
chunk by blake2b), in the namespace ``maskstore-ref``; ``ssh-keygen -Y verify`` checks it against
an allowed-signers file (``man ssh-keygen``, "ALLOWED SIGNERS"). A signature stored for one ref
does not verify for another name, another kind or another version, so it cannot be moved to
another tag, and a tag retargeted under it is refused.

Signatures are stored at ``signatures/<kind>/<name>/<version id>`` and travel with push, pull,
export and import.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import MaskstoreError
from ..store.names import check_ref_name, is_hex

NAMESPACE = "maskstore-ref"
MAX_SIGNATURE_BYTES = 16 << 10
_ARMOR = b"-----BEGIN SSH SIGNATURE-----"


def payload(kind: str, name: str, vid: str) -> bytes:
    """The bytes a signature covers: the ref's kind and name and the version id."""
    if kind not in ("tags", "branches") or not is_hex(vid, 64):
        raise MaskstoreError(f"cannot sign {kind}/{name} -> {vid!r}")
    check_ref_name(name)
    return f"maskstore ref v1\nkind: {kind}\nname: {name}\nversion: {vid}\n".encode()


def signature_key(kind: str, name: str, vid: str) -> str:
    """Where the signature of ``kind/name -> vid`` is stored."""
    return f"signatures/{kind}/{check_ref_name(name)}/{vid}"


def _ssh_keygen() -> str:
    exe = shutil.which("ssh-keygen")
    if exe is None:
        raise MaskstoreError("signing needs OpenSSH's ssh-keygen: install openssh-client")
    return exe


def _run(args: list[str], data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([_ssh_keygen(), *args], input=data, capture_output=True, timeout=60)


def sign(key: str | os.PathLike, kind: str, name: str, vid: str) -> bytes:
    """An armored SSH signature of the ref ``kind/name -> vid`` made with the private ``key``.

    Raises:
        MaskstoreError: when ssh-keygen cannot sign (missing key, passphrase without an agent).
    """
    if not Path(key).is_file():
        raise MaskstoreError(f"`sign` {key}: no such key file")
    out = _run(["-Y", "sign", "-f", str(key), "-n", NAMESPACE], payload(kind, name, vid))
    if out.returncode != 0 or not out.stdout.startswith(_ARMOR):
        msg = out.stderr.decode(errors="replace").strip().splitlines()
        raise MaskstoreError(f"ssh-keygen could not sign with {key}: {msg[-1] if msg else '?'}")
    return out.stdout


def check_signature_bytes(sig: bytes, where: str) -> bytes:
    """Refuse what is not an armored SSH signature of sane size."""
    if len(sig) > MAX_SIGNATURE_BYTES or not sig.startswith(_ARMOR):
        raise MaskstoreError(f"{where} is not an SSH signature: refused")
    return sig


@dataclass
class Verdict:
    """Who signed a ref, if anyone the allowed-signers file knows."""

    ok: bool
    signer: str  # the principal (with an allowed-signers file) or the key fingerprint
    reason: str


def verify(
    sig: bytes, kind: str, name: str, vid: str, allowed: str | os.PathLike | None
) -> Verdict:
    """Check a signature of ``kind/name -> vid``.

    Args:
        allowed: an allowed-signers file; None only checks that the signature is well formed
            and made over this ref (anyone's key), reporting the key fingerprint.
    """
    data = payload(kind, name, vid)
    with tempfile.TemporaryDirectory() as tmp:
        sig_path = Path(tmp) / "sig"
        sig_path.write_bytes(sig)
        if allowed is None:
            out = _run(["-Y", "check-novalidate", "-n", NAMESPACE, "-s", str(sig_path)], data)
            text = out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")
            if out.returncode != 0:
                return Verdict(False, "?", "the signature does not match this ref")
            return Verdict(
                True, text.strip().rsplit(" ", 1)[-1], "well formed (signer not checked)"
            )
        if not Path(allowed).is_file():
            raise MaskstoreError(f"allowed-signers file {allowed} does not exist")
        found = _run(["-Y", "find-principals", "-s", str(sig_path), "-f", str(allowed)], b"")
        principals = found.stdout.decode(errors="replace").split()
        if found.returncode != 0 or not principals:
            out = _run(["-Y", "check-novalidate", "-n", NAMESPACE, "-s", str(sig_path)], data)
            text = out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")
            key = re.search(r"SHA256:[A-Za-z0-9+/=]+", text) if out.returncode == 0 else None
            who = key.group(0) if key else "?"
            return Verdict(False, who, f"signed by a key that {allowed} does not allow")
        for principal in principals:
            out = _run(
                ["-Y", "verify", "-f", str(allowed), "-I", principal, "-n", NAMESPACE,
                 "-s", str(sig_path)],
                data,
            )  # fmt: skip
            if out.returncode == 0:
                return Verdict(True, principal, "verified")
        return Verdict(False, principals[0], "the signature does not match this ref")
