"""Secrets and their versions: store a new current key, read, reveal, history."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.errors import Conflict, InvalidInput, NotFound
from keyvault.events import record_event
from keyvault.models import (
    CURRENT,
    INVALIDATED,
    Cluster,
    Revision,
    Secret,
    SecretVersion,
    utcnow,
)
from keyvault.scope import Scope
from keyvault.services.clusters import get_cluster
from keyvault.services.store import live_keyring

MAX_KEY_LENGTH = 4096
# Read at most this much of standard input: enough for any key, bounded for any pipe.
MAX_INPUT_BYTES = 65536


@dataclass(frozen=True)
class StoredVersion:
    """What changed when a new current version was stored (no key material)."""

    cluster: str
    scope: str
    number: int
    fingerprint: str
    old_number: int | None
    old_fingerprint: str | None
    event_id: int


def check_key_text(key: str, *, pattern: str | None) -> str:
    """Refuse empty, multi-line or oddly shaped input; never echo the key itself."""
    if not key:
        raise InvalidInput(
            "no key given on standard input", hint="pipe exactly one key into the command"
        )
    if len(key) > MAX_KEY_LENGTH or any(c.isspace() or not c.isprintable() for c in key):
        raise InvalidInput(
            "the input is not a single key (it contains whitespace, control characters or is too long)",
            hint="pipe exactly one key, optionally followed by one newline",
        )
    if pattern is not None and re.fullmatch(pattern, key) is None:
        raise InvalidInput(
            f"the key does not match the cluster's key pattern {pattern} (length {len(key)})",
            hint="check what you pasted, or pass --any-format to store it anyway",
        )
    return key


def _lock_secret(session: Session, cluster: Cluster, scope: str) -> Secret:
    """Get (or create) the secret row and lock it for the rest of the transaction."""
    stmt = (
        select(Secret)
        .where(Secret.cluster_id == cluster.id, Secret.scope == scope)
        .with_for_update()
    )
    secret = session.scalar(stmt)
    if secret is not None:
        return secret
    try:
        with session.begin_nested():
            secret = Secret(cluster_id=cluster.id, scope=scope, created_at=utcnow())
            session.add(secret)
        return secret
    except SAIntegrityError:
        # Another transaction created it first; wait for its lock.
        return session.scalars(stmt).one()


def bump_revision(session: Session) -> None:
    """Tell every server's cache that keys or tokens changed (same transaction)."""
    # No ORM synchronisation: Revision rows are never loaded as objects, and evaluating the
    # criteria against the session's objects costs more than the UPDATE itself.
    session.execute(
        update(Revision)
        .where(Revision.id == 1)
        .values(value=Revision.value + 1)
        .execution_options(synchronize_session=False)
    )


def current_version(session: Session, secret_id: int) -> SecretVersion | None:
    """The current version of a secret, if any."""
    return session.scalar(
        select(SecretVersion).where(
            SecretVersion.secret_id == secret_id, SecretVersion.state == CURRENT
        )
    )


def _next_number(session: Session, secret_id: int) -> int:
    return (
        session.scalar(
            select(func.max(SecretVersion.number)).where(SecretVersion.secret_id == secret_id)
        )
        or 0
    ) + 1


def _record_stored(
    session: Session,
    stored: StoredVersion,
    *,
    now: datetime,
    source: str,
    actor: str,
    rotation_id: str | None,
) -> StoredVersion:
    """Write the ``secret.created``/``secret.rotated`` event of a new version; add its id."""
    payload = {
        "cluster": stored.cluster,
        "scope": stored.scope,
        "old_version": stored.old_number,
        "old_fingerprint": stored.old_fingerprint,
        "new_version": stored.number,
        "new_fingerprint": stored.fingerprint,
        "source": source,
        "rotation_id": rotation_id,
        "actor": actor,
        "at": now.isoformat(),
    }
    event = record_event(
        session,
        kind="secret.rotated" if stored.old_number is not None else "secret.created",
        cluster=stored.cluster,
        scope=stored.scope,
        payload=payload,
        at=now,
    )
    return replace(stored, event_id=event.id)


def store_version(
    session: Session,
    *,
    keyring: crypto.Keyring,
    cluster: Cluster,
    scope: Scope,
    key: str,
    source: str,
    actor: str,
    rotation_id: str | None = None,
    on_sealed: Callable[[], None] | None = None,
) -> StoredVersion:
    """Make ``key`` the current version of its scope, invalidate the previous one, write the event.

    The key is sealed under the store's live master key, taken (and share-locked against
    a `master-key rotate`) in this transaction, whatever ``keyring`` had active when the
    caller loaded it. ``on_sealed`` (tests) runs after the version is written, before commit.
    """
    # First, before any version row is locked: a `master-key rotate` holding the master
    # key rows waits for version rows, so taking them in the other order could deadlock.
    keyring = live_keyring(session, keyring)
    secret = _lock_secret(session, cluster, str(scope))
    old = current_version(session, secret.id)
    number = _next_number(session, secret.id)
    now = utcnow()
    if old is not None:
        # The partial unique index allows one current row at any instant.
        old.state = INVALIDATED
        old.invalidated_at = now
        session.flush()
    sealed = crypto.seal(
        keyring, key.encode(), crypto.version_aad(cluster.name, str(scope), number)
    )
    new = SecretVersion(
        secret_id=secret.id,
        number=number,
        ciphertext=sealed.ciphertext,
        wrapped_key=sealed.wrapped_key,
        master_key_id=sealed.master_key_id,
        fingerprint=crypto.fingerprint(key),
        source=source,
        created_by=actor,
        created_at=now,
        state=CURRENT,
        rotation_id=rotation_id,
    )
    session.add(new)
    session.flush()
    if old is not None:
        old.superseded_by_id = new.id
    stored = StoredVersion(
        cluster=cluster.name,
        scope=str(scope),
        number=number,
        fingerprint=new.fingerprint,
        old_number=old.number if old else None,
        old_fingerprint=old.fingerprint if old else None,
        event_id=0,  # set by _record_stored
    )
    stored = _record_stored(
        session, stored, now=now, source=source, actor=actor, rotation_id=rotation_id
    )
    bump_revision(session)
    session.flush()
    if on_sealed is not None:
        on_sealed()
    return stored


def import_key(
    session: Session,
    *,
    keyring: crypto.Keyring,
    cluster_name: str,
    scope: Scope,
    key: str,
    actor: str,
    any_format: bool = False,
) -> StoredVersion:
    """Store a key obtained outside keyvault as the new current version."""
    cluster = get_cluster(session, name=cluster_name)
    check_key_text(key, pattern=None if any_format else cluster.key_pattern)
    # Under the scope's lock: a concurrent import of the same key waits here and then sees it.
    secret = _lock_secret(session, cluster, str(scope))
    _refuse_known_key(session, secret.id, key, scope=scope, cluster_name=cluster_name)
    return store_version(
        session,
        keyring=keyring,
        cluster=cluster,
        scope=scope,
        key=key,
        source="import",
        actor=actor,
    )


def key_from_input(raw: bytes) -> str:
    """The key piped into `import`: strict UTF-8, one trailing newline (LF or CRLF) dropped.

    Checked before anything is written, whatever ``--any-format`` says: a key TA accepts is
    text, and bytes that are not UTF-8 are a wrong file or a wrong encoding, never a key.
    """
    if len(raw) > MAX_INPUT_BYTES:
        raise InvalidInput(
            f"the input is longer than {MAX_INPUT_BYTES} bytes, not a single key",
            hint="pipe exactly one key, optionally followed by one newline",
        )
    raw = raw[:-1] if raw.endswith(b"\n") else raw
    raw = raw[:-1] if raw.endswith(b"\r") else raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"the input is not UTF-8 text (invalid byte at offset {exc.start})",
            hint="pipe the key as plain UTF-8 text; --any-format does not lift this",
        ) from None


def _refuse_known_key(
    session: Session, secret_id: int, key: str, *, scope: Scope, cluster_name: str
) -> None:
    """Refuse a key already in the scope's history (compared by fingerprint).

    The current key again would be a new version of nothing; an invalidated one is dead at
    TA, and importing it would make a dead key current.
    """
    known = session.scalar(
        select(SecretVersion)
        .where(
            SecretVersion.secret_id == secret_id,
            SecretVersion.fingerprint == crypto.fingerprint(key),
        )
        .order_by(SecretVersion.number.desc())
        .limit(1)
    )
    if known is None:
        return
    if known.state == CURRENT:
        raise Conflict(
            f"this key is already version {known.number}, the current key of {scope} "
            f"in {cluster_name}",
            hint="nothing to do",
        )
    raise InvalidInput(
        f"this key was version {known.number} of {scope} in {cluster_name} and is invalidated "
        "(dead at TA); refusing to make it current again",
        hint="import the key TA uses now, or run `keyvault rotate` for a new one",
    )


def get_secret(session: Session, *, cluster_name: str, scope: Scope) -> Secret:
    """The secret of a scope, or ``NotFound``."""
    cluster = get_cluster(session, name=cluster_name)
    secret = session.scalar(
        select(Secret).where(Secret.cluster_id == cluster.id, Secret.scope == str(scope))
    )
    if secret is None:
        raise NotFound(
            f"no key stored for {scope} in cluster {cluster_name}",
            hint="import one with `keyvault import` or rotate with `keyvault rotate`",
        )
    return secret


def get_version(
    session: Session, *, cluster_name: str, scope: Scope, number: int | None = None
) -> SecretVersion:
    """A version by number, or the current one."""
    secret = get_secret(session, cluster_name=cluster_name, scope=scope)
    if number is None:
        version = current_version(session, secret.id)
    else:
        version = session.scalar(
            select(SecretVersion).where(
                SecretVersion.secret_id == secret.id, SecretVersion.number == number
            )
        )
    if version is None:
        what = f"version {number}" if number is not None else "a current version"
        raise NotFound(
            f"{scope} in cluster {cluster_name} has no {what}",
            hint="see `keyvault secrets history`",
        )
    return version


def reveal(keyring: crypto.Keyring, version: SecretVersion) -> str:
    """Decrypt a version; ``IntegrityError`` names it if the row was tampered with."""
    secret = version.secret
    what = f"{secret.scope} version {version.number} of cluster {secret.cluster.name}"
    sealed = crypto.Sealed(version.ciphertext, version.wrapped_key, version.master_key_id)
    aad = crypto.version_aad(secret.cluster.name, secret.scope, version.number)
    return crypto.unseal(keyring, sealed, aad, what=what).decode()


def history(session: Session, *, cluster_name: str, scope: Scope) -> list[SecretVersion]:
    """All versions of a scope, oldest first."""
    secret = get_secret(session, cluster_name=cluster_name, scope=scope)
    return list(
        session.scalars(
            select(SecretVersion)
            .where(SecretVersion.secret_id == secret.id)
            .order_by(SecretVersion.number)
        )
    )


def list_current(session: Session, *, cluster_name: str | None = None) -> list[SecretVersion]:
    """The current version of every secret (optionally of one cluster)."""
    stmt = (
        select(SecretVersion)
        .join(Secret, SecretVersion.secret_id == Secret.id)
        .join(Cluster, Secret.cluster_id == Cluster.id)
        .where(SecretVersion.state == CURRENT)
        .order_by(Cluster.name, Secret.scope)
    )
    if cluster_name is not None:
        get_cluster(session, name=cluster_name)
        stmt = stmt.where(Cluster.name == cluster_name)
    return list(session.scalars(stmt))


def version_info(version: SecretVersion) -> dict:
    """A JSON-ready description of a version (never the key)."""
    superseded = version.superseded_by
    return {
        "cluster": version.secret.cluster.name,
        "scope": version.secret.scope,
        "version": version.number,
        "fingerprint": version.fingerprint,
        "state": version.state,
        "source": version.source,
        "created_by": version.created_by,
        "created_at": version.created_at.isoformat(),
        "invalidated_at": version.invalidated_at.isoformat() if version.invalidated_at else None,
        "superseded_by": superseded.number if superseded is not None else None,
        "rotation_id": version.rotation_id,
        "master_key_id": version.master_key_id,
    }
