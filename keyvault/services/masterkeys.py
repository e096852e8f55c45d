"""Master key rotation: re-wrap every data key under a new master key.

Like rotation, this service commits in deliberate steps because it spans a
file and the database:
1. write the keyring file with the new key added (the old one stays active);
2. one transaction: register the new key, re-wrap every data key, retire the old key;
3. write the keyring file with only the new key.
A crash before 2 commits leaves a store the old key opens; after it, the file
still holds the new key, and `open_keyring` takes the live one from the database.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from keyvault import crypto
from keyvault.config import Settings
from keyvault.db import transaction
from keyvault.errors import Conflict
from keyvault.models import MasterKey, SecretVersion, utcnow
from keyvault.services.spool import spooled_rotations
from keyvault.services.store import open_keyring
from keyvault.services.webhooks import rewrap_webhook_secrets


@dataclass(frozen=True)
class MasterKeyRotation:
    old_id: str
    new_id: str
    rewrapped: int


def rotate_master_key(factory, *, settings: Settings) -> MasterKeyRotation:
    """Replace the master key; every version stays readable, the old key opens nothing."""
    waiting = spooled_rotations(settings)
    if waiting:
        # Spooled keys are sealed under the current master key: store them first.
        raise Conflict(
            f"rotations {', '.join(waiting)} have keys waiting in the local spool",
            hint="run `keyvault rotations recover ID` for each before rotating the master key",
        )
    with transaction(factory) as session:
        keyring = open_keyring(session, settings=settings)
    old_id = keyring.active
    grown = keyring.with_new_active()
    new_id = grown.active
    crypto.save_keyring(
        settings.master_key_file, crypto.Keyring(active=old_id, keys=grown.keys)
    )  # step 1

    with transaction(factory) as session:  # step 2
        # Lock the live key first: this waits for transactions that sealed with it
        # (open_keyring share-locks it), so the re-wrap below sees their rows.
        live = list(
            session.scalars(
                select(MasterKey).where(MasterKey.retired_at.is_(None)).with_for_update()
            )
        )
        if old_id not in {row.id for row in live}:
            raise Conflict(
                f"master key {old_id} was retired by a concurrent rotation",
                hint="point KEYVAULT_MASTER_KEY_FILE at the current keyring and retry",
            )
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
        now = utcnow()
        for row in live:
            row.retired_at = now

    crypto.save_keyring(settings.master_key_file, grown.only(new_id))  # step 3
    return MasterKeyRotation(old_id=old_id, new_id=new_id, rewrapped=count)
