"""Keys of the sandbox SSH front: its host key, client keys, authorized_keys.

Private keys are written with ``keyvault.fsutil.atomic_write`` (mode 0600, never visible
half-written or to others); public key lines 0644.
"""

from __future__ import annotations

import base64
import logging
import re
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keyvault.fsutil import atomic_write

log = logging.getLogger("keyvault.sandbox.sshfront")
_KEY_TYPE = re.compile(r"(ssh|ecdsa|sk)-[A-Za-z0-9@.-]+")


def ensure_ed25519_key(
    path: Path | str, *, comment: str = "keyvault-sandbox", public_file: Path | str | None = None
) -> paramiko.PKey:
    """Load the OpenSSH ed25519 private key at ``path``; create it (mode 0600) if missing.

    With ``public_file``, also write the public key line there if it is missing.
    """
    path = Path(path)
    if not path.exists():
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        atomic_write(path, pem, mode=0o600)
    key = paramiko.Ed25519Key.from_private_key_file(str(path))
    if public_file is not None and not Path(public_file).exists():
        line = f"{key.get_name()} {key.get_base64()} {comment}\n"
        atomic_write(Path(public_file), line.encode(), mode=0o644)
    return key


def public_key_line(key: paramiko.PKey, comment: str = "") -> str:
    """``ssh-ed25519 AAAA... [comment]``."""
    return f"{key.get_name()} {key.get_base64()}" + (f" {comment}" if comment else "")


def read_authorized_keys(path: Path | str) -> set[bytes]:
    """Public key blobs of an authorized_keys file; lines with options are skipped."""
    blobs: set[bytes] = set()
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return blobs
    for line in text.splitlines():
        parts = line.strip().split()
        if len(parts) < 2 or parts[0].startswith("#"):
            continue
        kind, data = parts[0], parts[1]
        if not _KEY_TYPE.fullmatch(kind):
            log.warning("authorized_keys: skipping a line with options or an unknown key type")
            continue
        try:
            blob = base64.b64decode(data, validate=True)
        except ValueError:
            continue
        blobs.add(blob)
    return blobs
