"""Restore: a backup file into this database, all or nothing, in the caller's transaction.

``import_store`` checks the file, the keyring and the schema before touching anything,
then (with ``replace``) deletes every row, inserts the backup's rows with their ids, moves
PostgreSQL sequences and the revision counter on, and decrypts every secret version and
webhook secret. Any failure raises; the caller's rollback keeps the old data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, cast

from sqlalchemy import (
    CursorResult,
    Integer,
    Result,
    Table,
    bindparam,
    delete,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.db import SCHEMA_HEAD
from keyvault.errors import (
    Conflict,
    DatabaseError,
    IntegrityError,
    NotInitialized,
    WrongMasterKey,
)
from keyvault.models import AccessToken, AuditRecord, MasterKey, SecretVersion, Webhook
from keyvault.services import integrity
from keyvault.services.audit_chain import AuditChain, ChainKeys
from keyvault.services.backup.audit_merge import CHAIN_TABLES, merge_audit_chain
from keyvault.services.backup.auditing import record_restore, restore_target
from keyvault.services.backup.fileformat import (
    BackupContents,
    BackupHeader,
    backup_tables,
    bad_body,
    check_no_unknown_tables,
    decode_value,
    table_counts,
)
from keyvault.services.backup.merge import (
    KEPT_TABLES,
    PLAN_TABLES,
    RestorePlan,
    merge_tokens,
    plan_restore,
)
from keyvault.services.backup.reader import open_backup
from keyvault.services.secrets import reveal
from keyvault.services.webhooks import webhook_secret

# Bookkeeping tables a freshly initialised store already has rows in (init's master key,
# the revision counter, the migrations' seeded leases and row MAC adoption record); every
# other table must be empty for a restore without ``replace``. All of them are replaced by
# the backup's rows.
_INIT_TABLES = ("master_keys", "revision", "leases", "row_mac_adoption")
_REVISION_TABLE = "revision"


@dataclass(frozen=True)
class RestoreReport:
    """What a restore did (never a key)."""

    master_key_id: str
    schema_revision: str
    backup_created_at: datetime
    replaced: bool
    counts: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    versions_verified: int = 0
    webhooks_verified: int = 0
    discarded: tuple[str, ...] = ()  # the newer versions and rotations given up (--discard-newer)
    audit_records_merged: int = 0  # the backup's audit records the store did not hold


def _stored_schema(session: Session) -> str | None:
    return session.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _lock_all(session: Session) -> None:
    """PostgreSQL: keep every writer out until the restore commits (readers see the old data)."""
    if session.get_bind().dialect.name != "postgresql":
        return  # SQLite: the immediate transaction already holds the write lock
    quote = session.get_bind().dialect.identifier_preparer.quote
    names = ", ".join(quote(t.name) for t in backup_tables())
    session.execute(text(f"LOCK TABLE {names} IN EXCLUSIVE MODE"))


def _fix_sequences(session: Session) -> None:
    """PostgreSQL: move each serial sequence past the restored ids, never back.

    ``setval`` is not undone by a rollback: a restore that fails after this step must not
    leave a sequence below the live rows (the next insert would collide). A gap in the ids
    is harmless.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    quote = session.get_bind().dialect.identifier_preparer.quote
    for table in backup_tables():
        pk = list(table.primary_key.columns)
        if len(pk) != 1 or not isinstance(pk[0].type, Integer):
            continue
        seq = session.execute(
            text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": table.name, "c": pk[0].name}
        ).scalar()
        if seq is None:
            continue
        col = quote(pk[0].name)
        session.execute(
            text(
                f"SELECT setval(CAST(:seq AS regclass), GREATEST(COALESCE(MAX({col}), 1), "
                f"nextval(CAST(:seq AS regclass))), true) FROM {quote(table.name)}"
            ),
            {"seq": seq},
        )


def _rows_of(contents: BackupContents, table) -> list[dict]:
    data = contents.tables.get(table.name)
    if data is None:
        raise bad_body(f"table {table.name} is missing")
    expected = [c.name for c in table.columns]
    if sorted(data["columns"]) != sorted(expected) or len(set(data["columns"])) != len(expected):
        raise bad_body(f"the columns of {table.name} do not match this schema")
    columns = [table.columns[name] for name in data["columns"]]
    rows = []
    for values in data["rows"]:
        if not isinstance(values, list) or len(values) != len(columns):
            raise bad_body(f"a row of {table.name} has the wrong shape")
        rows.append({c.name: decode_value(c, v) for c, v in zip(columns, values, strict=False)})
    return rows


def _check_backup_keys(
    master_keys: list[dict[str, Any]], header: BackupHeader, keyring: crypto.Keyring
) -> None:
    """The restored store must open with this keyring: its live key is the backup's key."""
    rows = {r["id"]: r for r in master_keys}
    key_id = header.master_key_id
    row = rows.get(key_id)
    if row is None or row["retired_at"] is not None:
        raise bad_body(f"master key {key_id} is not a live key of the backed-up store")
    try:
        crypto.verify_check_value(keyring, key_id, row["check_value"])
    except WrongMasterKey:
        raise WrongMasterKey(
            f"master key {key_id} in the keyring does not open the backed-up store",
            hint="use the keyring file that was current when the backup was made (KEYVAULT_MASTER_KEY_FILE)",
        ) from None


def _existing_data(session: Session) -> dict[str, int]:
    counts = table_counts(session)
    # Audit records and their chain are kept, never replaced (an init or the restore's own
    # intent record may have started the chain already).
    skip = (*_INIT_TABLES, AuditRecord.__tablename__, *CHAIN_TABLES)
    return {name: n for name, n in counts.items() if n and name not in skip}


def _verify(session: Session, keyring: crypto.Keyring) -> tuple[int, int]:
    """Every secret version and webhook secret decrypts with the keyring (else ``IntegrityError``)."""
    versions = 0
    stmt = (
        select(SecretVersion).order_by(SecretVersion.id).execution_options(populate_existing=True)
    )
    for version in session.scalars(stmt):
        if crypto.fingerprint(reveal(keyring, version)) != version.fingerprint:
            secret = version.secret
            raise IntegrityError(
                f"{secret.scope} version {version.number} of cluster {secret.cluster.name} decrypts to a key "
                f"whose fingerprint is not the stored one",
                what="backup file",
                hint="nothing was restored; use another copy of the backup",
            )
        versions += 1
    hooks = 0
    for hook in session.scalars(
        select(Webhook).order_by(Webhook.id).execution_options(populate_existing=True)
    ):
        webhook_secret(keyring, hook)
        hooks += 1
    return versions, hooks


def _check_restorable(session: Session, header: BackupHeader) -> None:
    """The backup and the database are at this keyvault's schema, with no unknown tables."""
    if header.schema_revision != SCHEMA_HEAD:
        raise Conflict(
            f"this backup is at schema revision {header.schema_revision}, this keyvault's is {SCHEMA_HEAD}",
            hint="restore it with the keyvault version that made it, into a database at that schema, "
            "then upgrade with `keyvault db upgrade`",
        )
    stored = _stored_schema(session)
    if stored != SCHEMA_HEAD:
        raise NotInitialized(
            f"the database schema is at {stored}, the backup needs {SCHEMA_HEAD}",
            hint="run `keyvault init` (or `keyvault db upgrade`) before restoring",
        )
    check_no_unknown_tables(session)


def _delete_all(session: Session, tables: list[Table]) -> dict[str, int]:
    """Delete every row but the revision counter's, the tokens' and the audit log's;
    return the keyvault data deleted per table."""
    deleted = {}
    for table in reversed(tables):
        if table.name == _REVISION_TABLE or table.name in (*KEPT_TABLES, *CHAIN_TABLES):
            continue
        n = _rowcount(session.execute(delete(table)))
        if n and table.name not in _INIT_TABLES:
            deleted[table.name] = n
    return deleted


def _insert_rows(session: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` (ids preserved); self-references are set once every row exists."""
    self_refs = [c for c in table.columns if any(fk.column.table is table for fk in c.foreign_keys)]
    session.execute(insert(table), [{**r, **{c.name: None for c in self_refs}} for r in rows])
    pk = list(table.primary_key.columns)
    for c in self_refs:
        links = [
            {**{f"_pk_{k.name}": r[k.name] for k in pk}, "_link": r[c.name]}
            for r in rows
            if r[c.name] is not None
        ]
        if links:
            stmt = update(table).where(*(k == bindparam(f"_pk_{k.name}") for k in pk))
            session.execute(stmt.values({c.name: bindparam("_link")}), links)


def _advance_revision(session: Session, current: int, backup_rows: list[dict[str, Any]]) -> None:
    # Servers compare the revision counter for equality: move it past both histories.
    new_value = max(current, max((r["value"] for r in backup_rows), default=0)) + 1
    updated = session.execute(text("UPDATE revision SET value = :v WHERE id = 1"), {"v": new_value})
    if _rowcount(updated) == 0:
        session.execute(text("INSERT INTO revision (id, value) VALUES (1, :v)"), {"v": new_value})


def _rowcount(result: Result[Any]) -> int:
    # DML results are CursorResults, which count rows; Result's annotation does not say so.
    return int(cast(CursorResult[Any], result).rowcount)


def _replace_rows(
    session: Session,
    tables: list[Table],
    rows_by_table: dict[str, list[dict[str, Any]]],
    *,
    store_had_data: bool,
    keyring: crypto.Keyring,
    merge_audit: Callable[[], int],
) -> tuple[dict[str, int], int, list[int]]:
    """Delete everything but what is kept (see ``merge``), insert the backup's rows, merge
    tokens, then the audit chain and its records (``merge_audit``, once the backup's master
    keys are in), move the revision on; return what was deleted and the number of audit
    records added."""
    revision_value = session.execute(text("SELECT value FROM revision WHERE id = 1")).scalar() or 0
    revoked: list[int] = []
    try:
        deleted = _delete_all(session, tables)
        for table in tables:
            rows = rows_by_table[table.name]
            if table.name == AccessToken.__tablename__:
                revoked = merge_tokens(
                    session,
                    rows,
                    store_had_data,
                    lambda t: integrity.failure(t, keyring=keyring) is None,
                )
            elif table.name in (AuditRecord.__tablename__, *CHAIN_TABLES, _REVISION_TABLE):
                continue
            elif rows:
                _insert_rows(session, table, rows)
        audit_added = merge_audit()
        _advance_revision(session, revision_value, rows_by_table.get(_REVISION_TABLE, []))
        _fix_sequences(session)
        session.flush()
    except SAIntegrityError as exc:
        orig = getattr(exc, "orig", None) or exc
        reason = (str(orig).strip().splitlines() or [type(orig).__name__])[0][:300]
        raise DatabaseError(
            f"the backup's rows do not fit the database ({reason}); nothing was restored",
            hint="use an unmodified backup made by this keyvault version",
        ) from None
    return deleted, audit_added, revoked


def check_losses(plan: RestorePlan, discard: frozenset[object] | None) -> None:
    """Refuse to lose what the operator did not name (``discard``: the confirmed losses)."""
    if not plan.losses:
        return
    if discard is None:
        raise Conflict(
            f"the store holds {plan.summary()}; restoring this backup would delete them, "
            "and they may be the only keys TA accepts now; nothing was changed",
            hint="resolve rotations first (`keyvault rotations recover`) and take a new backup; "
            "or pass --discard-newer to delete them (it lists each one and asks)",
        )
    unconfirmed = plan.losses - discard
    if unconfirmed:
        raise Conflict(
            f"the store changed while the restore was being confirmed ({len(unconfirmed)} more "
            "key version(s) or rotation(s) would be lost); nothing was changed",
            hint="run the restore again and check the list it shows",
        )


def import_store(
    session: Session,
    *,
    keyring: crypto.Keyring,
    replace: bool,
    data: bytes | None = None,
    contents: BackupContents | None = None,
    discard: frozenset[object] | None = None,
    spooled: Iterable[str] = (),
    actor: str = "cli",
    file_name: str = "backup",
    audit_chain: AuditChain | None = None,
) -> RestoreReport:
    """Restore a backup (``contents``, or the file ``data``) into this database, in the
    caller's transaction.

    Refuses a damaged file (``InvalidInput``/``IntegrityError``), a keyring without the
    backup's master key (``WrongMasterKey``), another schema revision (``Conflict``),
    unless ``replace`` a database that already holds keyvault data (``Conflict``), and a
    restore that would lose key versions newer than the backup or unresolved rotations
    (``merge.plan_restore``) unless each of them is in ``discard`` (``Conflict``). Tokens
    and audit records are kept and merged (see ``merge``). After inserting (ids
    preserved) every secret version is decrypted and the restore is audited; any
    failure raises, and the caller's rollback keeps the old data.
    """
    if contents is None:
        if data is None:
            raise TypeError("import_store needs data or contents")
        contents = open_backup(data, keyring=keyring)
    header = contents.header
    _check_restorable(session, header)
    tables = backup_tables()
    rows_by_table = {t.name: _rows_of(contents, t) for t in tables}
    _check_backup_keys(rows_by_table[MasterKey.__tablename__], header, keyring)

    _lock_all(session)
    existing = _existing_data(session)
    if existing and not replace:
        held = ", ".join(f"{n} {name}" for name, n in existing.items())
        raise Conflict(
            f"the database already holds keyvault data ({held})",
            hint="restore into an empty store (`keyvault init` on a fresh database), "
            "or pass --replace to delete everything and replace it with the backup",
        )
    plan = plan_restore(session, rows_by_table, spooled)
    check_losses(plan, discard)
    chain = audit_chain or AuditChain(ChainKeys(keyring))
    target = restore_target(file_name, contents.digest)
    merge = partial(merge_audit_chain, session, rows_by_table, keyring=keyring, chain=chain)
    deleted, audit_added, revoked = _replace_rows(
        session,
        tables,
        rows_by_table,
        store_had_data=bool(existing),
        keyring=keyring,
        merge_audit=partial(merge, live_id=header.master_key_id, actor=actor, source=target),
    )
    session.expire_all()
    versions, hooks = _verify(session, keyring)
    integrity.check_restored(session, keyring=keyring, tokens=not existing, token_ids=revoked)
    record_restore(
        session,
        chain=chain,
        actor=actor,
        target=target,
        outcome="ok-discarded-newer" if plan.losses else "ok",
    )
    return RestoreReport(
        master_key_id=header.master_key_id,
        schema_revision=header.schema_revision,
        backup_created_at=header.created_at,
        replaced=bool(replace),
        counts={name: len(rows) for name, rows in rows_by_table.items() if name != _REVISION_TABLE},
        deleted=deleted,
        versions_verified=versions,
        webhooks_verified=hooks,
        discarded=tuple(plan.listing()),
        audit_records_merged=audit_added,
    )


def preview_restore(
    session: Session, *, contents: BackupContents, spooled: Iterable[str] = ()
) -> RestorePlan:
    """What restoring ``contents`` would lose, read without changing anything (for the
    confirmation; ``import_store`` checks again under its lock)."""
    needed = {t.name: t for t in backup_tables() if t.name in PLAN_TABLES}
    return plan_restore(session, {n: _rows_of(contents, t) for n, t in needed.items()}, spooled)
