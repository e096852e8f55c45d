"""Encrypted backup and restore of the whole store (every table but ``alembic_version``).

The file::

    KVBACKUP1\\n
    {"format": 1, "created_at": ..., "master_key_id": ..., "schema_revision": ..., ...}\\n
    <SHA-256 hex of the two lines above>\\n
    <wrapped data key (60 bytes)><AES-256-GCM ciphertext of the gzip'd JSON body>

The header holds no secret: it names the master key that wraps the data key and a check
value sealed under it (the same kind ``master_keys`` stores), so a wrong keyring is told
apart from a damaged file. The body is sealed with ``crypto.seal`` under a fresh data key
wrapped by the live master key, with associated data that binds the header bytes: a
changed header byte fails authentication even when its checksum was recomputed.

Secret versions and webhook secrets stay in their stored, already-encrypted form inside
the body. The master keys themselves are NOT in the file: the keyring file must be backed
up separately, and restoring needs a keyring that holds the backup's master key.

Like every service, this one only flushes. ``import_store`` deletes and inserts in the
caller's transaction and raises on any problem: the caller must roll back then
(``keyvault.db.transaction`` does), so a restore is all or nothing.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Boolean,
    CursorResult,
    DateTime,
    Integer,
    LargeBinary,
    Result,
    String,
    Table,
    Text,
    bindparam,
    delete,
    func,
    insert,
    inspect,
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
    InvalidInput,
    NotInitialized,
    WrongMasterKey,
)
from keyvault.models import Base, MasterKey, SecretVersion, UTCDateTime, Webhook, utcnow

MAGIC = b"KVBACKUP1"
FORMAT_VERSION = 1
_MAGIC_FAMILY = b"KVBACKUP"
_MAX_HEADER = 64 * 1024
_WRAPPED_KEY_BYTES = crypto.NONCE_BYTES + crypto.KEY_BYTES + 16
_MIN_CIPHERTEXT = crypto.NONCE_BYTES + 16
_AAD_PREFIX = b"keyvault/v1/backup|"
# Bookkeeping tables a freshly initialised store already has rows in (init's master key,
# the revision counter, the migrations' seeded leases); every other table must be empty
# for a restore without ``replace``. All of them are replaced by the backup's rows.
_INIT_TABLES = ("master_keys", "revision", "leases")
_REVISION_TABLE = "revision"


@dataclass(frozen=True)
class BackupHeader:
    """The clear-text header of a backup file (no secret in it)."""

    format: int
    created_at: datetime
    master_key_id: str
    schema_revision: str
    check_value: bytes
    raw: bytes  # the header bytes as they are in the file (bound by the AEAD)


@dataclass(frozen=True)
class BackupContents:
    """A decrypted backup: its header and its tables (column names, rows of JSON values)."""

    header: BackupHeader
    tables: dict[str, dict]

    def counts(self) -> dict[str, int]:
        return {name: len(table["rows"]) for name, table in self.tables.items()}


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


# --- tables and values -------------------------------------------------------------------


def backup_tables() -> list[Table]:
    """Every table of the schema, parents before children (``alembic_version`` is not a model)."""
    return list(Base.metadata.sorted_tables)


def _check_no_unknown_tables(session: Session) -> None:
    known = {t.name for t in backup_tables()} | {"alembic_version"}
    present = set(inspect(session.connection()).get_table_names())
    unknown = sorted(present - known)
    if unknown:
        raise DatabaseError(
            f"the database has tables the models do not know ({', '.join(unknown)}), so a backup would miss them",
            hint="run `keyvault db check`",
        )


def _encode(column, value):
    if value is None:
        return None
    if isinstance(column.type, LargeBinary):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (bool, int, str, float)):
        return value
    raise TypeError(f"cannot back up a {type(value).__name__} in {column.table.name}.{column.name}")


def _bad_body(message: str) -> InvalidInput:
    return InvalidInput(
        f"the backup's content is not valid: {message}",
        hint="the file was made by another keyvault version or edited; use an unmodified backup",
    )


def _decode(column, value):
    where = f"{column.table.name}.{column.name}"
    if value is None:
        if not column.nullable:
            raise _bad_body(f"{where} is null")
        return None
    t = column.type
    try:
        if isinstance(t, LargeBinary):
            return base64.b64decode(value, validate=True)
        if isinstance(t, (UTCDateTime, DateTime)):
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is None:
                raise ValueError("naive time")
            return parsed
        if isinstance(t, Boolean):
            if not isinstance(value, bool):
                raise ValueError("not a boolean")
            return value
        if isinstance(t, Integer):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError("not an integer")
            return value
        if isinstance(t, (String, Text)):
            if not isinstance(value, str):
                raise ValueError("not a string")
            return value
    except (ValueError, TypeError) as exc:
        raise _bad_body(f"{where}: {exc}") from None
    raise _bad_body(f"{where} has an unsupported type")


# --- the file -----------------------------------------------------------------------------


def body_aad(raw_header: bytes) -> bytes:
    """The associated data of the sealed body: it binds every header byte."""
    return _AAD_PREFIX + raw_header


def _header_bytes(header: dict) -> bytes:
    line = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head = MAGIC + b"\n" + line + b"\n"
    return head + hashlib.sha256(head).hexdigest().encode() + b"\n"


_DAMAGED_HINT = "the file is damaged, truncated or was modified; use another copy"


def _damaged(message: str, hint: str = _DAMAGED_HINT) -> IntegrityError:
    return IntegrityError(message, what="backup file", hint=hint)


def read_header(data: bytes) -> tuple[BackupHeader, bytes]:
    """Parse and check the clear-text header; return it and the sealed rest of the file."""
    if not data.startswith(_MAGIC_FAMILY):
        raise InvalidInput(
            "this is not a keyvault backup (no KVBACKUP header)",
            hint="give a file made by `keyvault backup`",
        )
    if not data.startswith(MAGIC + b"\n"):
        first = data.split(b"\n", 1)[0][:32].decode("ascii", "replace")
        raise InvalidInput(
            f"backup format {first!r} is not supported (this keyvault reads {MAGIC.decode()})",
            hint="restore it with the keyvault version that made it",
        )
    magic_end = len(MAGIC) + 1
    header_end = data.find(b"\n", magic_end, magic_end + _MAX_HEADER)
    sum_end = data.find(b"\n", header_end + 1, header_end + 1 + 65) if header_end >= 0 else -1
    if header_end < 0 or sum_end < 0:
        raise InvalidInput(
            "the backup header is truncated or damaged", hint="use an undamaged copy of the backup"
        )
    head = data[: header_end + 1]
    if data[header_end + 1 : sum_end] != hashlib.sha256(head).hexdigest().encode():
        raise _damaged("the backup header is damaged: its checksum does not match")
    raw = data[: sum_end + 1]
    try:
        fields = json.loads(data[magic_end:header_end])
        header = BackupHeader(
            format=fields["format"],
            created_at=datetime.fromisoformat(fields["created_at"]),
            master_key_id=str(fields["master_key_id"]),
            schema_revision=str(fields["schema_revision"]),
            check_value=base64.b64decode(fields["check_value"], validate=True),
            raw=raw,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InvalidInput(
            "the backup header is not valid", hint="use an unmodified backup"
        ) from None
    if header.format != FORMAT_VERSION:
        raise InvalidInput(
            f"backup format version {header.format} is not supported "
            f"(this keyvault reads {FORMAT_VERSION})",
            hint="restore it with the keyvault version that made it",
        )
    return header, data[sum_end + 1 :]


def open_backup(data: bytes, *, keyring: crypto.Keyring) -> BackupContents:
    """Check and decrypt a backup file: ``InvalidInput``/``IntegrityError`` if damaged,
    ``WrongMasterKey`` if the keyring does not hold the key it was made with."""
    header, sealed_part = read_header(data)
    key_id = header.master_key_id
    if key_id not in keyring.keys:
        raise WrongMasterKey(
            f"this backup was made with master key {key_id}, which is not in the keyring "
            f"(it holds {', '.join(sorted(keyring.keys))})",
            hint="use the keyring file that was current when the backup was made (KEYVAULT_MASTER_KEY_FILE)",
        )
    try:
        crypto.verify_check_value(keyring, key_id, header.check_value)
    except WrongMasterKey:
        raise WrongMasterKey(
            f"master key {key_id} in the keyring is not the key this backup was made with",
            hint="use the keyring file that was current when the backup was made (KEYVAULT_MASTER_KEY_FILE)",
        ) from None
    if len(sealed_part) < _WRAPPED_KEY_BYTES + _MIN_CIPHERTEXT:
        raise _damaged("the backup is truncated: its encrypted body is missing or incomplete")
    sealed = crypto.Sealed(
        ciphertext=sealed_part[_WRAPPED_KEY_BYTES:],
        wrapped_key=sealed_part[:_WRAPPED_KEY_BYTES],
        master_key_id=key_id,
    )
    try:
        compressed = crypto.unseal(keyring, sealed, body_aad(header.raw), what="backup file")
    except IntegrityError:
        raise _damaged(
            "the backup failed its integrity check: the file is damaged, truncated or was modified",
            hint="nothing was restored; use another copy of the backup",
        ) from None
    try:
        body = json.loads(gzip.decompress(compressed))
        tables = body["tables"]
        if (
            body["format"] != FORMAT_VERSION
            or body["master_key_id"] != key_id
            or body["schema_revision"] != header.schema_revision
            or not isinstance(tables, dict)
        ):
            raise ValueError("header and body disagree")
        for table in tables.values():
            if not isinstance(table["columns"], list) or not isinstance(table["rows"], list):
                raise ValueError("bad table")
    except (ValueError, KeyError, TypeError, OSError, EOFError):
        raise _bad_body("it cannot be read") from None
    return BackupContents(header=header, tables=tables)


# --- export ---------------------------------------------------------------------------------


def use_snapshot(session: Session) -> None:
    """Read the whole export from one snapshot (PostgreSQL REPEATABLE READ; SQLite's
    immediate transaction already is one). Call first, before the session's first query."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})


def table_counts(session: Session) -> dict[str, int]:
    """Rows per table of the backup."""
    return {
        t.name: session.execute(select(func.count()).select_from(t)).scalar_one()
        for t in backup_tables()
    }


def export_store(session: Session, *, keyring: crypto.Keyring) -> bytes:
    """The whole store as an encrypted backup file, sealed under the keyring's active key.

    ``keyring`` must come from ``store.open_keyring`` (its active key is the live one).
    """
    _check_no_unknown_tables(session)
    key_id = keyring.active
    created_at = utcnow()
    tables = {}
    for table in backup_tables():
        columns = list(table.columns)
        rows = session.execute(select(table).order_by(*table.primary_key.columns)).all()
        tables[table.name] = {
            "columns": [c.name for c in columns],
            "rows": [[_encode(c, row._mapping[c]) for c in columns] for row in rows],
        }
    body = {
        "format": FORMAT_VERSION,
        "created_at": created_at.isoformat(),
        "master_key_id": key_id,
        "schema_revision": SCHEMA_HEAD,
        "tables": tables,
    }
    compressed = gzip.compress(
        json.dumps(body, separators=(",", ":")).encode(), compresslevel=6, mtime=0
    )
    raw_header = _header_bytes(
        {
            "format": FORMAT_VERSION,
            "created_at": created_at.isoformat(),
            "master_key_id": key_id,
            "schema_revision": SCHEMA_HEAD,
            "check_value": base64.b64encode(crypto.check_value(keyring, key_id)).decode("ascii"),
            "cipher": "AES-256-GCM",
            "compression": "gzip",
        }
    )
    sealed = crypto.seal(
        crypto.Keyring(active=key_id, keys=keyring.keys), compressed, body_aad(raw_header)
    )
    return raw_header + sealed.wrapped_key + sealed.ciphertext


# --- import ---------------------------------------------------------------------------------


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
    """PostgreSQL: move each serial sequence past the restored ids."""
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
                f"SELECT setval(CAST(:seq AS regclass), COALESCE(MAX({col}), 1), MAX({col}) IS NOT NULL)"
                f" FROM {quote(table.name)}"
            ),
            {"seq": seq},
        )


def _rows_of(contents: BackupContents, table) -> list[dict]:
    data = contents.tables.get(table.name)
    if data is None:
        raise _bad_body(f"table {table.name} is missing")
    expected = [c.name for c in table.columns]
    if sorted(data["columns"]) != sorted(expected) or len(set(data["columns"])) != len(expected):
        raise _bad_body(f"the columns of {table.name} do not match this schema")
    columns = [table.columns[name] for name in data["columns"]]
    rows = []
    for values in data["rows"]:
        if not isinstance(values, list) or len(values) != len(columns):
            raise _bad_body(f"a row of {table.name} has the wrong shape")
        rows.append({c.name: _decode(c, v) for c, v in zip(columns, values, strict=False)})
    return rows


def _check_backup_keys(contents: BackupContents, keyring: crypto.Keyring) -> None:
    """The restored store must open with this keyring: its live key is the backup's key."""
    rows = {r["id"]: r for r in _rows_of(contents, MasterKey.__table__)}
    key_id = contents.header.master_key_id
    row = rows.get(key_id)
    if row is None or row["retired_at"] is not None:
        raise _bad_body(f"master key {key_id} is not a live key of the backed-up store")
    try:
        crypto.verify_check_value(keyring, key_id, row["check_value"])
    except WrongMasterKey:
        raise WrongMasterKey(
            f"master key {key_id} in the keyring does not open the backed-up store",
            hint="use the keyring file that was current when the backup was made (KEYVAULT_MASTER_KEY_FILE)",
        ) from None


def _existing_data(session: Session) -> dict[str, int]:
    counts = table_counts(session)
    return {name: n for name, n in counts.items() if n and name not in _INIT_TABLES}


def _verify(session: Session, keyring: crypto.Keyring) -> tuple[int, int]:
    """Every secret version and webhook secret decrypts with the keyring (else ``IntegrityError``)."""
    from keyvault.services.secrets import reveal
    from keyvault.services.webhooks import webhook_secret

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
    _check_no_unknown_tables(session)


def _delete_all(session: Session, tables: list[Table]) -> dict[str, int]:
    """Delete every row but the revision counter's; return the keyvault data deleted per table."""
    deleted = {}
    for table in reversed(tables):
        if table.name == _REVISION_TABLE:
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
    session: Session, tables: list[Table], rows_by_table: dict[str, list[dict[str, Any]]]
) -> dict[str, int]:
    """Delete everything, insert the backup's rows, move the revision on; return what was deleted."""
    revision_value = session.execute(text("SELECT value FROM revision WHERE id = 1")).scalar() or 0
    try:
        deleted = _delete_all(session, tables)
        for table in tables:
            rows = rows_by_table[table.name]
            if table.name != _REVISION_TABLE and rows:
                _insert_rows(session, table, rows)
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
    return deleted


def import_store(
    session: Session, *, keyring: crypto.Keyring, data: bytes, replace: bool
) -> RestoreReport:
    """Restore a backup into this database, in the caller's transaction.

    Refuses a damaged file (``InvalidInput``/``IntegrityError``), a keyring without the
    backup's master key (``WrongMasterKey``), another schema revision (``Conflict``) and,
    unless ``replace``, a database that already holds keyvault data (``Conflict``). With
    ``replace`` every row is deleted first. After inserting (ids preserved) every secret
    version is decrypted; any failure raises, and the caller's rollback keeps the old data.
    """
    contents = open_backup(data, keyring=keyring)
    header = contents.header
    _check_restorable(session, header)
    tables = backup_tables()
    rows_by_table = {t.name: _rows_of(contents, t) for t in tables}
    _check_backup_keys(contents, keyring)

    _lock_all(session)
    existing = _existing_data(session)
    if existing and not replace:
        held = ", ".join(f"{n} {name}" for name, n in existing.items())
        raise Conflict(
            f"the database already holds keyvault data ({held})",
            hint="restore into an empty store (`keyvault init` on a fresh database), "
            "or pass --replace to delete everything and replace it with the backup",
        )
    deleted = _replace_rows(session, tables, rows_by_table)
    session.expire_all()
    versions, hooks = _verify(session, keyring)
    return RestoreReport(
        master_key_id=header.master_key_id,
        schema_revision=header.schema_revision,
        backup_created_at=header.created_at,
        replaced=bool(replace),
        counts={name: len(rows) for name, rows in rows_by_table.items() if name != _REVISION_TABLE},
        deleted=deleted,
        versions_verified=versions,
        webhooks_verified=hooks,
    )
