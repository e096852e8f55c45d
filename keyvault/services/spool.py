"""The local spool: where a just-generated key waits, encrypted, if the store commit fails.

A spool file is sealed under the master key like a stored version, bound to its
rotation id, written atomically with fsync, mode 0600, under KEYVAULT_HOME/spool.
It is written under a shared lock of the keyring file and sealed under a key that file
holds at that moment, so a `master-key rotate` (which takes the lock exclusively and
keeps in the file every key a spool file names) never strands it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

from keyvault import crypto
from keyvault.config import Settings
from keyvault.errors import IntegrityError, KeyvaultError


@dataclass(frozen=True)
class SpooledKey:
    rotation_id: str
    cluster: str
    scope: str
    key: str = field(repr=False)


def _aad(rotation_id: str, cluster: str, scope: str) -> bytes:
    return f"keyvault/v1/spool|{rotation_id}|{cluster}|{scope}".encode()


def spool_path(settings: Settings, rotation_id: str) -> Path:
    """Where the spool file of a rotation lives."""
    return settings.spool_dir / f"{rotation_id}.json"


def write_spool(
    settings: Settings,
    keyring: crypto.Keyring,
    *,
    rotation_id: str,
    cluster: str,
    scope: str,
    key: str,
) -> Path:
    """Seal ``key`` into the spool, durably, under a master key the keyring file holds."""
    with crypto.keyring_file_lock(settings.master_key_file, exclusive=False):
        sealing = _sealing_keyring(settings, keyring)
        sealed = crypto.seal(sealing, key.encode(), _aad(rotation_id, cluster, scope))
        return _write_record(settings, sealed, rotation_id, cluster, scope, key)


def _sealing_keyring(settings: Settings, keyring: crypto.Keyring) -> crypto.Keyring:
    """``keyring``, or the file's if a `master-key rotate` removed ``keyring.active`` from it
    since the caller loaded it (the database may be down: the file is what we can read)."""
    try:
        on_file = crypto.load_keyring(settings.master_key_file)
    except KeyvaultError:
        return keyring  # nothing better to seal with; recover needs this keyring then
    if keyring.active in on_file.keys:
        return keyring
    return on_file


def _write_record(
    settings: Settings, sealed: crypto.Sealed, rotation_id: str, cluster: str, scope: str, key: str
) -> Path:
    record = {
        "rotation_id": rotation_id,
        "cluster": cluster,
        "scope": scope,
        "fingerprint": crypto.fingerprint(key),
        "master_key_id": sealed.master_key_id,
        "ciphertext": base64.b64encode(sealed.ciphertext).decode(),
        "wrapped_key": base64.b64encode(sealed.wrapped_key).decode(),
    }
    path = spool_path(settings, rotation_id)
    settings.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    crypto.write_private_file(path, json.dumps(record, indent=2).encode())
    return path


def read_spool(settings: Settings, keyring: crypto.Keyring, rotation_id: str) -> SpooledKey | None:
    """The spooled key of a rotation, or None when there is none."""
    path = spool_path(settings, rotation_id)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        sealed = crypto.Sealed(
            base64.b64decode(record["ciphertext"]),
            base64.b64decode(record["wrapped_key"]),
            record["master_key_id"],
        )
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"spool file {path} is damaged", what=str(path)) from None
    aad = _aad(rotation_id, record["cluster"], record["scope"])
    key = crypto.unseal(keyring, sealed, aad, what=f"spool file {path}").decode()
    return SpooledKey(
        rotation_id=rotation_id, cluster=record["cluster"], scope=record["scope"], key=key
    )


def remove_spool(settings: Settings, rotation_id: str) -> None:
    """Delete a spool file once its key is committed."""
    spool_path(settings, rotation_id).unlink(missing_ok=True)


def spooled_rotations(settings: Settings) -> list[str]:
    """Rotation ids that have a spool file."""
    if not settings.spool_dir.exists():
        return []
    return sorted(p.stem for p in settings.spool_dir.glob("*.json"))


def spooled_master_keys(settings: Settings) -> dict[str, list[str]]:
    """The master key ids spool files are sealed under, with their rotation ids.

    A file that cannot be read names no key: it is reported by `keyvault status`."""
    needed: dict[str, list[str]] = {}
    for rotation_id in spooled_rotations(settings):
        try:
            record = json.loads(spool_path(settings, rotation_id).read_text())
            key_id = str(record["master_key_id"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        needed.setdefault(key_id, []).append(rotation_id)
    return needed
