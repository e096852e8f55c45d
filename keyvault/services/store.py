"""Creating the store and opening it with the right master key."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.config import CONFIG_FILE_NAME, Settings
from keyvault.db import session_factory, transaction, upgrade
from keyvault.errors import WrongMasterKey
from keyvault.models import MasterKey, utcnow

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

DEFAULT_CONFIG = """\
# keyvault configuration. Environment variables override these values:
# KEYVAULT_DATABASE_URL, KEYVAULT_MASTER_KEY_FILE. See ops/keyvault.example.toml.

[database]
# url = "postgresql+psycopg://keyvault@db.internal/keyvault"

[master_key]
# file = "/etc/keyvault/master.key"
"""


def ensure_home(settings: Settings) -> list[str]:
    """Create the home (0700) and a default config file; return what was created."""
    created = []
    home = settings.home
    if not home.exists():
        home.mkdir(parents=True, mode=0o700)
        created.append(f"home {home}")
    os.chmod(home, 0o700)
    config = home / CONFIG_FILE_NAME
    if not config.exists():
        crypto.write_private_file(config, DEFAULT_CONFIG.encode())
        created.append(f"config {config}")
    return created


def ensure_keyring(path: Path) -> tuple[crypto.Keyring, bool]:
    """Load the keyring at ``path``, or create one; never overwrite an existing file."""
    if path.exists() or path.is_symlink():
        return crypto.load_keyring(path), False
    keyring = crypto.Keyring.generate()
    crypto.save_keyring(path, keyring)
    return keyring, True


def known_master_keys(session: Session) -> dict[str, MasterKey]:
    """Master key rows by id."""
    return {row.id: row for row in session.scalars(select(MasterKey))}


def register_keyring(session: Session, *, keyring: crypto.Keyring) -> None:
    """Record check values for the keyring's keys, refusing a keyring foreign to this store."""
    rows = known_master_keys(session)
    if rows and not (set(rows) & set(keyring.keys)):
        raise WrongMasterKey(
            f"this database was initialised with master key {sorted(rows)[-1]}, "
            f"not with any key in the given keyring",
            hint="copy the store's keyring file to KEYVAULT_MASTER_KEY_FILE instead of making a new one",
        )
    for key_id in keyring.keys:
        if key_id in rows:
            crypto.verify_check_value(keyring, key_id, rows[key_id].check_value)
        elif key_id == keyring.active:
            session.add(
                MasterKey(
                    id=key_id, check_value=crypto.check_value(keyring, key_id), created_at=utcnow()
                )
            )
    session.flush()


def open_keyring(session: Session, *, settings: Settings) -> crypto.Keyring:
    """Load the keyring file and prove it opens this store; return it with its live key active.

    The master key rows stay share-locked until the caller's transaction ends, so a
    concurrent `master-key rotate` waits for whatever this transaction seals with the
    live key, instead of retiring that key under it (PostgreSQL; SQLite serialises writers).
    """
    keyring = crypto.load_keyring(settings.master_key_file)
    for _ in range(LIVE_KEY_ATTEMPTS):
        rows = {
            row.id: row for row in session.scalars(select(MasterKey).with_for_update(read=True))
        }
        live = [k for k in keyring.keys if k in rows and rows[k].retired_at is None]
        if live or not _rotated_meanwhile(session, rows):
            break
        # A `master-key rotate` committed while we waited for its lock: its new key is
        # in the file (its first step wrote it there) and visible to the next statement.
        keyring = crypto.load_keyring(settings.master_key_file)
    if not live:
        if keyring.active in rows:
            crypto.verify_check_value(keyring, keyring.active, rows[keyring.active].check_value)
        raise WrongMasterKey(
            f"the keyring {settings.master_key_file} holds no live master key of this store",
            hint="point KEYVAULT_MASTER_KEY_FILE at the current keyring (after `master-key rotate`, "
            "the previous key no longer opens the store)",
        )
    active = live[0]
    crypto.verify_check_value(keyring, active, rows[active].check_value)
    # After a crash between commit and the final keyring write, the file's
    # "active" may name the retired key: the database decides which is live.
    retired = frozenset(k for k, row in rows.items() if row.retired_at is not None)
    return replace(keyring, active=active, retired=retired)


# How often to look again when a `master-key rotate` commits while we wait for its lock;
# each look waits for one rotation, so this bounds a run of back-to-back rotations.
LIVE_KEY_ATTEMPTS = 5


def _rotated_meanwhile(session: Session, locked: dict[str, MasterKey]) -> bool:
    """A live key this transaction did not see when it took its locks (PostgreSQL's
    READ COMMITTED: the locking statement's snapshot predates the rotation's insert)."""
    live_now = session.scalars(select(MasterKey.id).where(MasterKey.retired_at.is_(None)))
    return any(key_id not in locked for key_id in live_now)


def live_keyring(session: Session, keyring: crypto.Keyring) -> crypto.Keyring:
    """``keyring`` with the store's live master key active, that key held against retirement.

    Called by every sealing step inside the transaction that stores what it seals, since
    the caller may have loaded ``keyring`` long before (a rotation loads it at its start):
    the live key's row is share-locked until the transaction ends, so a `master-key rotate`
    (which locks it for update) either re-wraps what this transaction stores, or finished
    before and this seals under its new key, read from the keyring file if needed.
    """
    for _ in range(LIVE_KEY_ATTEMPTS):
        live_id = session.scalar(
            select(MasterKey.id).where(MasterKey.retired_at.is_(None)).order_by(MasterKey.id)
        )
        if live_id is None:
            raise WrongMasterKey(
                "this store has no live master key",
                hint="run `keyvault status` and `keyvault init`",
            )
        row = session.scalar(
            select(MasterKey)
            .where(MasterKey.id == live_id)
            .with_for_update(read=True)
            .execution_options(populate_existing=True)
        )
        if row is not None and row.retired_at is None:
            break
    else:
        raise WrongMasterKey(
            "the store's master key kept changing while a key was being stored",
            hint="let the running `master-key rotate` finish, then retry",
        )
    if live_id not in keyring.keys and keyring.source is not None:
        keyring = crypto.load_keyring(keyring.source)  # rotated meanwhile: the file holds it
    if live_id not in keyring.keys:
        keyring.key(live_id)  # raises WrongMasterKey naming the missing key
    crypto.verify_check_value(keyring, live_id, row.check_value)
    return replace(keyring, active=live_id)


def refuse_foreign_store(session: Session, *, settings: Settings) -> None:
    """Refuse to make a new master key for a database that already has one."""
    rows = known_master_keys(session)
    path = settings.master_key_file
    if rows and not (path.exists() or path.is_symlink()):
        raise WrongMasterKey(
            f"the database is already initialised with master key {sorted(rows)[-1]}, "
            f"and {path} does not exist",
            hint="copy the store's keyring file there (mode 0600) before running init",
        )


def restrict_sqlite_file(engine) -> None:
    """Make an SQLite database file (and its WAL files) private to the running user."""
    if engine.url.get_backend_name() != "sqlite" or not engine.url.database:
        return
    for suffix in ("", "-wal", "-shm"):
        path = Path(engine.url.database + suffix)
        if path.exists():
            os.chmod(path, 0o600)


@dataclass(frozen=True)
class InitReport:
    """What `initialise` did: what it created and the master key the store opens with."""

    created: list[str] = field(default_factory=list)
    master_key_id: str = ""
    new_master_key: bool = False

    def as_dict(self, settings: Settings) -> dict[str, object]:
        return {
            "home": str(settings.home),
            "created": self.created,
            "master_key_id": self.master_key_id,
            "new_master_key": self.new_master_key,
            "master_key_file": str(settings.master_key_file),
        }


def initialise(engine: Engine, *, settings: Settings) -> InitReport:
    """Make the home, the schema at head and the master key; safe to run again.

    Like master key rotation this spans files and the database, so it owns its steps:
    the home and config first, then the schema (alembic commits per migration), then one
    transaction that refuses a foreign store, loads or creates the keyring file (never
    overwriting one) and records its check value.
    """
    created = ensure_home(settings)
    upgrade(engine)
    restrict_sqlite_file(engine)
    with transaction(session_factory(engine)) as session:
        refuse_foreign_store(session, settings=settings)
        keyring, new_key = ensure_keyring(settings.master_key_file)
        register_keyring(session, keyring=keyring)
    if new_key:
        created.append(f"master key {settings.master_key_file} ({keyring.active})")
    return InitReport(created=created, master_key_id=keyring.active, new_master_key=new_key)
