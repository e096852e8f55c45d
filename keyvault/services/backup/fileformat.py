"""The backup file: its format, reading and checking it, and the table values in it.

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
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    func,
    inspect,
    select,
)
from sqlalchemy.orm import Session

from keyvault.errors import (
    DatabaseError,
    IntegrityError,
    InvalidInput,
)
from keyvault.models import Base, UTCDateTime

MAGIC = b"KVBACKUP1"
FORMAT_VERSION = 1
_MAGIC_FAMILY = b"KVBACKUP"
_MAX_HEADER = 64 * 1024
HEADER_READ_LIMIT = len(MAGIC) + 1 + _MAX_HEADER + 66  # magic, header line, checksum line
_AAD_PREFIX = b"keyvault/v1/backup|"


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
    digest: str = ""  # SHA-256 hex of the whole file, for the audit record

    def counts(self) -> dict[str, int]:
        return {name: len(table["rows"]) for name, table in self.tables.items()}


# --- tables and values -------------------------------------------------------------------


def backup_tables() -> list[Table]:
    """Every table of the schema, parents before children (``alembic_version`` is not a model)."""
    return list(Base.metadata.sorted_tables)


def table_counts(session: Session) -> dict[str, int]:
    """Rows per table of the backup."""
    return {
        t.name: session.execute(select(func.count()).select_from(t)).scalar_one()
        for t in backup_tables()
    }


def check_no_unknown_tables(session: Session) -> None:
    known = {t.name for t in backup_tables()} | {"alembic_version"}
    present = set(inspect(session.connection()).get_table_names())
    unknown = sorted(present - known)
    if unknown:
        raise DatabaseError(
            f"the database has tables the models do not know ({', '.join(unknown)}), so a backup would miss them",
            hint="run `keyvault db check`",
        )


def encode_value(column, value):
    if value is None:
        return None
    if isinstance(column.type, LargeBinary):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (bool, int, str, float)):
        return value
    raise TypeError(f"cannot back up a {type(value).__name__} in {column.table.name}.{column.name}")


def bad_body(message: str) -> InvalidInput:
    return InvalidInput(
        f"the backup's content is not valid: {message}",
        hint="the file was made by another keyvault version or edited; use an unmodified backup",
    )


def decode_value(column, value):
    where = f"{column.table.name}.{column.name}"
    if value is None:
        if not column.nullable:
            raise bad_body(f"{where} is null")
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
        raise bad_body(f"{where}: {exc}") from None
    raise bad_body(f"{where} has an unsupported type")


# --- the file -----------------------------------------------------------------------------


def body_aad(raw_header: bytes) -> bytes:
    """The associated data of the sealed body: it binds every header byte."""
    return _AAD_PREFIX + raw_header


def header_bytes(header: dict) -> bytes:
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
