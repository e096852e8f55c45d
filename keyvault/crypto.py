"""Envelope encryption of TA keys under a master keyring.

Each stored key is sealed with AES-256-GCM under a fresh 256-bit data key; the
data key is wrapped with AES-256-GCM under a master key. Both layers use
associated data that binds the ciphertext to its row (cluster, scope, version),
so a ciphertext copied or moved to another row fails authentication.

The keyring file holds one or more master keys by id. It must be mode 0600 and
owned by the running user; it is replaced atomically and fsync'd. A lock file beside
it (``<name>.lock``, taken with ``flock``) keeps a `master-key rotate` from changing the
file while another one, or a spool write, depends on what it holds.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from keyvault.errors import IntegrityError, MasterKeyFileError, MasterKeyLocked, WrongMasterKey
from keyvault.fsutil import atomic_write

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
KEYRING_FORMAT = "keyvault-keyring-v1"
_CHECK_PLAINTEXT = b"keyvault master key check v1"


def fingerprint(key: str) -> str:
    """The first 16 hex digits of SHA-256 of the key: safe to show, easy to compare."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def version_aad(cluster: str, scope: str, number: int) -> bytes:
    """Associated data binding a ciphertext to one secret version."""
    return f"keyvault/v1/secret|{cluster}|{scope}|{number}".encode()


def new_master_key_id() -> str:
    """A sortable, unique master key id such as ``mk-20261126-3fa9c1``."""
    return f"mk-{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Sealed:
    """A sealed value: ``ciphertext`` (nonce + AES-GCM output) and its wrapped data key."""

    ciphertext: bytes
    wrapped_key: bytes
    master_key_id: str


@dataclass(frozen=True)
class Keyring:
    """Master keys by id; ``active`` seals new values.

    ``source`` is the file it was read from: a holder whose ``active`` key was retired
    meanwhile re-reads it to find the live key (``store.live_keyring``).
    """

    active: str
    keys: dict[str, bytes] = field(repr=False)
    source: Path | None = field(default=None, compare=False)
    # Ids the store had retired when this keyring was opened (``store.open_keyring``): a MAC
    # under one of them is refused even while the file still holds the key (a spool file).
    retired: frozenset[str] = field(default=frozenset(), compare=False)

    def __repr__(self) -> str:
        return f"Keyring(active={self.active!r}, ids={sorted(self.keys)!r})"

    @classmethod
    def generate(cls) -> Keyring:
        """A keyring with one new random master key."""
        key_id = new_master_key_id()
        return cls(active=key_id, keys={key_id: secrets.token_bytes(KEY_BYTES)})

    def with_new_active(self) -> Keyring:
        """This keyring plus a new master key that becomes active."""
        key_id = new_master_key_id()
        while key_id in self.keys:
            key_id = new_master_key_id()
        return replace(
            self, active=key_id, keys={**self.keys, key_id: secrets.token_bytes(KEY_BYTES)}
        )

    def only(self, key_id: str) -> Keyring:
        """A keyring that holds just ``key_id``."""
        return replace(self, active=key_id, keys={key_id: self.keys[key_id]})

    def restricted(self, key_ids: set[str], *, active: str) -> Keyring:
        """A keyring that holds just ``key_ids`` (of this one), ``active`` sealing."""
        return replace(self, active=active, keys={k: self.keys[k] for k in sorted(key_ids)})

    def key(self, key_id: str) -> bytes:
        try:
            return self.keys[key_id]
        except KeyError:
            raise WrongMasterKey(
                f"the store needs master key {key_id}, which is not in the keyring",
                hint="point KEYVAULT_MASTER_KEY_FILE at the keyring that holds it",
            ) from None


def _aesgcm(key: bytes) -> AESGCM:
    # Imported here so `keyvault --help` never pays for cryptography.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415 - cryptography: ~55 ms, on demand

    return AESGCM(key)


def _wrap_aad(master_key_id: str, aad: bytes) -> bytes:
    return b"keyvault/v1/dek|" + master_key_id.encode() + b"|" + aad


def _wrap_dek(keyring: Keyring, key_id: str, dek: bytes, aad: bytes) -> bytes:
    """``dek`` wrapped (nonce + AES-GCM) under master key ``key_id``, bound to ``aad``."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + _aesgcm(keyring.key(key_id)).encrypt(nonce, dek, _wrap_aad(key_id, aad))


def seal(keyring: Keyring, plaintext: bytes, aad: bytes) -> Sealed:
    """Encrypt ``plaintext`` under a fresh data key wrapped by the active master key."""
    dek = secrets.token_bytes(KEY_BYTES)
    nonce = secrets.token_bytes(NONCE_BYTES)
    ciphertext = nonce + _aesgcm(dek).encrypt(nonce, plaintext, aad)
    wrapped = _wrap_dek(keyring, keyring.active, dek, aad)
    return Sealed(ciphertext=ciphertext, wrapped_key=wrapped, master_key_id=keyring.active)


def _unwrap(keyring: Keyring, sealed: Sealed, aad: bytes, what: str) -> bytes:
    return _unwrap_dek(keyring, sealed.master_key_id, sealed.wrapped_key, aad, what)


def _unwrap_dek(keyring: Keyring, key_id: str, blob: bytes, aad: bytes, what: str) -> bytes:
    from cryptography.exceptions import InvalidTag  # noqa: PLC0415 - cryptography: ~55 ms, on demand

    master = keyring.key(key_id)
    try:
        dek: bytes = _aesgcm(master).decrypt(
            blob[:NONCE_BYTES], blob[NONCE_BYTES:], _wrap_aad(key_id, aad)
        )
        return dek
    except (InvalidTag, ValueError):
        raise IntegrityError(
            f"integrity check failed for {what}: its data key does not authenticate "
            f"under master key {key_id}",
            what=what,
            hint="the row was altered or moved, or the master key file is wrong; restore from backup",
        ) from None


def unseal(keyring: Keyring, sealed: Sealed, aad: bytes, *, what: str) -> bytes:
    """Decrypt a sealed value; raise ``IntegrityError`` naming ``what`` if it fails."""
    from cryptography.exceptions import InvalidTag  # noqa: PLC0415 - cryptography: ~55 ms, on demand

    dek = _unwrap(keyring, sealed, aad, what)
    blob = sealed.ciphertext
    try:
        plaintext: bytes = _aesgcm(dek).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        return plaintext
    except (InvalidTag, ValueError):
        raise IntegrityError(
            f"integrity check failed for {what}: the ciphertext was altered or belongs to another row",
            what=what,
            hint="restore this version from backup; do not trust it",
        ) from None


def rewrap(keyring: Keyring, sealed: Sealed, aad: bytes, *, to: str, what: str) -> Sealed:
    """Re-wrap the data key of ``sealed`` under master key ``to``; the ciphertext is unchanged."""
    dek = _unwrap(keyring, sealed, aad, what)
    wrapped = _wrap_dek(keyring, to, dek, aad)
    return Sealed(ciphertext=sealed.ciphertext, wrapped_key=wrapped, master_key_id=to)


# Streaming seal: the same bytes as ``seal`` (wrapped data key, nonce, ciphertext, tag),
# written and read in pieces, for bodies too large to hold (backups).
WRAPPED_KEY_BYTES = NONCE_BYTES + KEY_BYTES + 16
STREAM_HEADER_BYTES = WRAPPED_KEY_BYTES + NONCE_BYTES
TAG_BYTES = 16


class StreamSealer:
    """Encrypts a stream under a fresh data key wrapped by the active master key.

    Write ``header`` first, then what ``update`` returns, then ``finalize()`` (the tag last).
    """

    def __init__(self, keyring: Keyring, aad: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: PLC0415 - cryptography: ~55 ms, on demand

        dek = secrets.token_bytes(KEY_BYTES)
        nonce = secrets.token_bytes(NONCE_BYTES)
        self.header = _wrap_dek(keyring, keyring.active, dek, aad) + nonce
        self._enc = Cipher(algorithms.AES(dek), modes.GCM(nonce)).encryptor()
        self._enc.authenticate_additional_data(aad)

    def update(self, data: bytes) -> bytes:
        return self._enc.update(data)

    def finalize(self) -> bytes:
        return self._enc.finalize() + self._enc.tag


class StreamUnsealer:
    """Decrypts what ``StreamSealer`` wrote: its header (``STREAM_HEADER_BYTES``), then the
    ciphertext through ``update`` and the tag through ``finalize``. Nothing it returns may
    be trusted before ``finalize`` succeeded; a failure raises ``IntegrityError`` naming ``what``.
    """

    def __init__(
        self, keyring: Keyring, key_id: str, header: bytes, aad: bytes, *, what: str
    ) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: PLC0415 - cryptography: ~55 ms, on demand

        self._what = what
        dek = _unwrap_dek(keyring, key_id, header[:WRAPPED_KEY_BYTES], aad, what)
        nonce = header[WRAPPED_KEY_BYTES:STREAM_HEADER_BYTES]
        self._dec = Cipher(algorithms.AES(dek), modes.GCM(nonce)).decryptor()
        self._dec.authenticate_additional_data(aad)

    def update(self, data: bytes) -> bytes:
        return self._dec.update(data)

    def finalize(self, tag: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag  # noqa: PLC0415 - cryptography: ~55 ms, on demand

        try:
            return self._dec.finalize_with_tag(tag)
        except (InvalidTag, ValueError):
            raise IntegrityError(
                f"integrity check failed for {self._what}",
                what=self._what,
                hint="it was altered or truncated; do not trust it",
            ) from None


# Purposes of keys derived from a master key (``subkey``); each is used for one job only.
PURPOSE_CONFIG_MAC = "config-mac"
PURPOSE_AUDIT_CHAIN = "audit-chain"


def subkey(keyring: Keyring, key_id: str, purpose: str) -> bytes:
    """A 256-bit key derived from master key ``key_id`` for one ``purpose`` (HKDF-SHA256).

    Why derived, not the master key itself: a MAC key that leaks (it sits in a server's
    memory while it checks rows) must not open a single sealed value.
    """
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415 - cryptography: ~55 ms, on demand
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: PLC0415 - as above

    info = f"keyvault/v1/subkey|{purpose}|{key_id}".encode()
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info)
    return hkdf.derive(keyring.key(key_id))


def mac(key: bytes, *fields: object) -> str:
    """HMAC-SHA256 (hex) of ``fields`` in a canonical, unambiguous encoding.

    Fields are encoded as a JSON array (``None``, str, int, bool, lists of those; datetimes
    as ISO strings), so ("a|b", "c") and ("a", "b|c") never collide.
    """

    def norm(value: object) -> object:
        if isinstance(value, datetime):
            return value.isoformat()
        if isinstance(value, (list, tuple)):
            return [norm(v) for v in value]
        return value

    data = json.dumps([norm(f) for f in fields], separators=(",", ":"), sort_keys=True)
    return hmac.new(key, data.encode(), hashlib.sha256).hexdigest()


def mac_matches(expected: str | None, actual: str) -> bool:
    """Constant-time comparison of two hex MACs; a missing MAC never matches."""
    return expected is not None and hmac.compare_digest(expected.encode(), actual.encode())


def check_value(keyring: Keyring, key_id: str) -> bytes:
    """A value stored with each master key id so a wrong key is caught before any write."""
    sealed = seal(keyring.only(key_id), _CHECK_PLAINTEXT, b"keyvault/v1/check|" + key_id.encode())
    return sealed.wrapped_key + sealed.ciphertext


def verify_check_value(keyring: Keyring, key_id: str, value: bytes) -> None:
    """Raise ``WrongMasterKey`` unless ``value`` opens under ``key_id`` of this keyring."""
    wrapped_len = NONCE_BYTES + KEY_BYTES + 16
    sealed = Sealed(value[wrapped_len:], value[:wrapped_len], key_id)
    try:
        ok = (
            unseal(keyring, sealed, b"keyvault/v1/check|" + key_id.encode(), what="check")
            == _CHECK_PLAINTEXT
        )
    except IntegrityError:
        ok = False
    if not ok:
        raise WrongMasterKey(
            f"master key {key_id} in the keyring does not open this store",
            hint="use the keyring file this store was created with (KEYVAULT_MASTER_KEY_FILE)",
        )


def check_key_file(path: Path) -> None:
    """Refuse a key file that is missing, not a regular file, not 0600 or not ours."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise MasterKeyFileError(
            f"master key file {path} does not exist",
            path=str(path),
            hint="run `keyvault init` or set KEYVAULT_MASTER_KEY_FILE",
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise MasterKeyFileError(f"master key file {path} is not a regular file", path=str(path))
    if st.st_uid != os.geteuid():
        raise MasterKeyFileError(
            f"master key file {path} is owned by uid {st.st_uid}, not by the running user",
            path=str(path),
            hint=f"run keyvault as its owner, or `chown {os.geteuid()} {path}`",
        )
    if stat.S_IMODE(st.st_mode) != 0o600:
        raise MasterKeyFileError(
            f"master key file {path} has mode {stat.S_IMODE(st.st_mode):04o}, must be 0600",
            path=str(path),
            hint=f"run `chmod 600 {path}`",
        )


def load_keyring(path: Path) -> Keyring:
    """Read and check the keyring file."""
    check_key_file(path)
    try:
        data = json.loads(path.read_text())
        if data.get("format") != KEYRING_FORMAT:
            raise ValueError("unknown format")
        keys = {k: base64.b64decode(v, validate=True) for k, v in data["keys"].items()}
        if data["active"] not in keys or any(len(v) != KEY_BYTES for v in keys.values()):
            raise ValueError("inconsistent keys")
        return Keyring(active=data["active"], keys=keys, source=path)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise MasterKeyFileError(
            f"master key file {path} is damaged or not a keyvault keyring",
            path=str(path),
            hint="restore it from your backup of the master key",
        ) from None


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0600, fsync'd file and directory."""
    atomic_write(path, data, mode=0o600)


def save_keyring(path: Path, keyring: Keyring) -> None:
    """Write the keyring file atomically with mode 0600."""
    data = {
        "format": KEYRING_FORMAT,
        "active": keyring.active,
        "keys": {k: base64.b64encode(v).decode() for k, v in sorted(keyring.keys.items())},
    }
    write_private_file(path, (json.dumps(data, indent=2) + "\n").encode())


def keyring_lock_path(path: Path) -> Path:
    """The lock file of the keyring file ``path`` (beside it, never a dot-file)."""
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def keyring_file_lock(path: Path, *, exclusive: bool) -> Iterator[bool]:
    """Hold the keyring file's lock: exclusive (a `master-key rotate`, which must not
    wait: ``MasterKeyLocked`` if taken) or shared (blocking; a spool write, a restore).

    Yields whether the lock is held: a shared lock is skipped, not failed, when its
    file cannot be created (a read-only directory, where no rotation can write either).
    """
    lock = keyring_lock_path(path)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if not exclusive:
            yield False
            return
        raise MasterKeyFileError(
            f"cannot create the lock file {lock} of the master key file: {exc.strerror}",
            path=str(lock),
            hint="run keyvault as the owner of the master key file's directory",
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            raise MasterKeyLocked(
                f"the master key file is in use: its lock {lock} is held by another "
                "`master-key rotate`, or by a spool write or restore on this machine",
                hint="wait for it to finish, then check `keyvault status`; rotate again only if needed",
            ) from None
        yield True
    finally:
        os.close(fd)  # closing releases the lock
