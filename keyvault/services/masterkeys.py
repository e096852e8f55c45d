"""Master key rotation: re-wrap every data key under a new master key.

Like rotation, this service commits in deliberate steps because it spans a
file and the database, all under the keyring file's exclusive lock (``crypto.
keyring_file_lock``: a second `master-key rotate` on this machine is refused at once):
1. write the keyring file with the new key added (the old one stays active);
2. one transaction: lock the live key's row, register the new key, re-wrap every
   data key, retire the old key;
3. write the keyring file with the new key active, dropping every other key that
   nothing can still need.

Why no key is lost to a concurrent writer: every sealing step (``secrets.store_version``)
takes the live key inside the transaction that stores what it seals, and share-locks its
row (``store.live_keyring``); step 2 locks that row for update. So a version is either
committed before step 2 locks (and re-wrapped by it) or sealed after step 2 committed,
under the new key (read from the file step 1 wrote). Spool files are sealed under a key
the file holds, under a shared lock of the file; step 3 keeps any key a spool file or a
row still names, and says so.

A failure in step 2 puts the file back as it was (a rotation that lost the race to
another machine's must not leave its file holding a key the store never registered).
A crash before 2 commits leaves a store the old key opens; after it, the file
still holds the new key, and `open_keyring` takes the live one from the database.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.config import Settings
from keyvault.db import transaction
from keyvault.errors import Conflict, KeyvaultError
from keyvault.fsutil import atomic_write
from keyvault.models import MasterKey, SecretVersion, Webhook, utcnow
from keyvault.services import integrity
from keyvault.services.audit_chain import (
    chain_key_master_ids,
    rewrap_audit_chain_keys,
    start_chain_key,
)
from keyvault.services.audit_sink import AuditSink
from keyvault.services.spool import spooled_master_keys, spooled_rotations
from keyvault.services.store import open_keyring
from keyvault.services.webhooks import rewrap_webhook_secrets

log = logging.getLogger("keyvault.masterkeys")
SessionFactory = Callable[[], Session]
# Injected by tests: called with "grown" (after step 1), "locked" (in step 2, the live
# key locked) and "committed" (after step 2).
StepHook = Callable[[str], None]


@dataclass(frozen=True)
class MasterKeyRotation:
    old_id: str
    new_id: str
    rewrapped: int
    # Keys left in the keyring file because something still needs them, with why.
    kept: dict[str, str] = field(default_factory=dict)


def rotate_master_key(
    factory: SessionFactory,
    *,
    settings: Settings,
    on_step: StepHook | None = None,
    sink: AuditSink | None = None,
) -> MasterKeyRotation:
    """Replace the master key; every version stays readable, the old key opens nothing."""
    hook: StepHook = on_step or (lambda step: None)
    path = settings.master_key_file
    waiting = spooled_rotations(settings)
    if waiting:
        # Spooled keys are sealed under the current master key: store them first.
        raise Conflict(
            f"rotations {', '.join(waiting)} have keys waiting in the local spool",
            hint="run `keyvault rotations recover ID` for each before rotating the master key",
        )
    crypto.check_key_file(path)  # before its lock file is made beside it
    with crypto.keyring_file_lock(path, exclusive=True):
        with transaction(factory) as session:
            keyring = open_keyring(session, settings=settings)
        previous = path.read_bytes()
        old_id = keyring.active
        grown = keyring.with_new_active()
        new_id = grown.active
        crypto.save_keyring(path, crypto.Keyring(active=old_id, keys=grown.keys))  # step 1
        try:
            hook("grown")
            count = _rewrap_all(factory, grown, old_id, hook, sink)  # step 2
        except BaseException:
            _undo_step_one(factory, path, previous, new_id)
            raise
        hook("committed")
        kept = _keep_needed(factory, settings, grown)
        crypto.save_keyring(path, grown.restricted({new_id, *kept}, active=new_id))  # step 3
    return MasterKeyRotation(old_id=old_id, new_id=new_id, rewrapped=count, kept=kept)


def _rewrap_all(
    factory: SessionFactory,
    grown: crypto.Keyring,
    old_id: str,
    hook: StepHook,
    sink: AuditSink | None = None,
) -> int:
    """Step 2, one transaction: the new key registered, every data key re-wrapped, the old retired."""
    new_id = grown.active
    with transaction(factory) as session:
        # Lock the live key first: this waits for transactions that sealed with it
        # (they share-lock it), so the re-wrap below sees their rows.
        live = list(
            session.scalars(
                select(MasterKey).where(MasterKey.retired_at.is_(None)).with_for_update()
            )
        )
        if old_id not in {row.id for row in live}:
            raise Conflict(
                f"master key {old_id} was retired by a concurrent `master-key rotate`; "
                "this one changed nothing",
                hint="point KEYVAULT_MASTER_KEY_FILE at the keyring that rotation wrote",
            )
        hook("locked")
        session.add(
            MasterKey(id=new_id, check_value=crypto.check_value(grown, new_id), created_at=utcnow())
        )
        session.flush()
        count = 0
        for version in session.scalars(select(SecretVersion).with_for_update()):
            secret = version.secret
            aad = crypto.version_aad(secret.cluster.name, secret.scope, version.number)
            what = f"{secret.scope} version {version.number} of cluster {secret.cluster.name}"
            sealed = crypto.Sealed(version.ciphertext, version.wrapped_key, version.master_key_id)
            moved = crypto.rewrap(grown, sealed, aad, to=new_id, what=what)
            version.wrapped_key, version.master_key_id = moved.wrapped_key, moved.master_key_id
            count += 1
        # Webhook signing secrets are sealed under the master key too.
        count += rewrap_webhook_secrets(session, keyring=grown, to=new_id)
        _remac(session, grown, new_id)
        rewrap_audit_chain_keys(session, keyring=grown, to=new_id)  # not counted: internal
        start_chain_key(
            session, keyring=grown, sink=sink
        )  # an old master key cannot forge what follows
        now = utcnow()
        for row in live:
            row.retired_at = now
    return count


def _remac(session: Session, grown: crypto.Keyring, new_id: str) -> None:
    """Every verifying row MAC moves to the new key (``integrity.remac_all``); a failing row
    keeps its MAC and stays refused, and is reported."""
    _, failing = integrity.remac_all(session, keyring=grown, to=new_id)
    if failing:
        log.warning(
            "%d row(s) fail their MAC check and were not re-MACed: see `keyvault db check --integrity`",
            failing,
        )


def _undo_step_one(factory: SessionFactory, path: Path, previous: bytes, new_id: str) -> None:
    """Put the keyring file back after step 2 failed, unless step 2 did commit after all
    (a commit whose answer was lost): then the file, holding both keys, is the right one."""
    try:
        with transaction(factory) as session:
            committed = session.get(MasterKey, new_id) is not None
    except KeyvaultError:
        log.warning(
            "cannot tell whether master key %s was registered; the keyring file keeps both keys",
            new_id,
        )
        return
    if not committed:
        atomic_write(path, previous, mode=0o600)


def _keep_needed(
    factory: SessionFactory, settings: Settings, grown: crypto.Keyring
) -> dict[str, str]:
    """Keys of ``grown`` other than the new one that a stored row or a spool file still names.

    After step 2 none should be: this is the last guard before a key leaves the file.
    Row MACs (``mac_key_id``) are not counted: step 2 moved every verifying row's MAC to
    the new key, and a writer MACs under the live key held against retirement
    (``store.live_keyring``), so a row still naming an old key is one that failed its
    check, which keeping that key would not make usable."""
    try:
        with transaction(factory) as session:
            named = set(session.scalars(select(SecretVersion.master_key_id).distinct()))
            named |= set(session.scalars(select(Webhook.master_key_id).distinct()))
            named |= chain_key_master_ids(session)
        kept = dict.fromkeys(named, "a stored row is sealed under it")
    except KeyvaultError as exc:  # committed already: when in doubt, keep every key
        why = f"the database could not be asked whether a row needs it ({exc})"
        kept = dict.fromkeys(grown.keys, why)
    for key_id, rotation_ids in spooled_master_keys(settings).items():
        kept[key_id] = f"spooled rotation {', '.join(rotation_ids)} is sealed under it"
    return {k: why for k, why in kept.items() if k in grown.keys and k != grown.active}
