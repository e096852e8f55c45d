"""Export: the whole store as one encrypted backup file (see ``fileformat``)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.db import SCHEMA_HEAD
from keyvault.fsutil import atomic_writer
from keyvault.models import utcnow
from keyvault.services.backup.fileformat import (
    FORMAT_VERSION,
    backup_tables,
    body_aad,
    check_no_unknown_tables,
    encode_value,
    header_bytes,
)
from keyvault.services.backup.stream import BodyWriter


def use_snapshot(session: Session) -> None:
    """Read the whole export from one snapshot (PostgreSQL REPEATABLE READ; SQLite's
    immediate transaction already is one). Call first, before the session's first query."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})


_ROW_BATCH = 1000


def _write_tables(session: Session, out: BodyWriter) -> None:
    """Each table's rows, streamed in batches from the database into ``out``."""
    for i, table in enumerate(backup_tables()):
        columns = list(table.columns)
        names = json.dumps([c.name for c in columns], separators=(",", ":"))
        out.write(
            f'{"," if i else ""}{json.dumps(table.name)}:{{"columns":{names},"rows":['.encode()
        )
        stmt = select(table).order_by(*table.primary_key.columns)
        result = session.execute(stmt, execution_options={"yield_per": _ROW_BATCH})
        first = True
        for batch in result.partitions():
            rows = [[encode_value(c, row._mapping[c]) for c in columns] for row in batch]
            text = ",".join(json.dumps(r, separators=(",", ":")) for r in rows)
            out.write((text if first else "," + text).encode())
            first = False
        out.write(b"]}")


def write_backup(session: Session, *, keyring: crypto.Keyring, out: BinaryIO) -> None:
    """Write the whole store to ``out`` as an encrypted backup file, sealed under the
    keyring's active key, table by table in row batches (memory does not grow with the store).

    ``keyring`` must come from ``store.open_keyring`` (its active key is the live one).
    """
    check_no_unknown_tables(session)
    key_id = keyring.active
    created_at = utcnow().isoformat()
    raw_header = header_bytes(
        {
            "format": FORMAT_VERSION,
            "created_at": created_at,
            "master_key_id": key_id,
            "schema_revision": SCHEMA_HEAD,
            "check_value": base64.b64encode(crypto.check_value(keyring, key_id)).decode("ascii"),
            "cipher": "AES-256-GCM",
            "compression": "gzip",
        }
    )
    out.write(raw_header)
    body = BodyWriter(out, crypto.Keyring(active=key_id, keys=keyring.keys), body_aad(raw_header))
    opening = {
        "format": FORMAT_VERSION,
        "created_at": created_at,
        "master_key_id": key_id,
        "schema_revision": SCHEMA_HEAD,
    }
    body.write(json.dumps(opening, separators=(",", ":"))[:-1].encode() + b',"tables":{')
    _write_tables(session, body)
    body.write(b"}}")
    body.close()


def export_store(session: Session, *, keyring: crypto.Keyring) -> bytes:
    """``write_backup`` into memory (for small stores and tests)."""
    out = io.BytesIO()
    write_backup(session, keyring=keyring, out=out)
    return out.getvalue()


def write_backup_file(session: Session, *, keyring: crypto.Keyring, path: Path) -> int:
    """``write_backup`` into ``path`` (atomically, mode 0600); return its size in bytes."""
    with atomic_writer(path) as out:
        write_backup(session, keyring=keyring, out=out)
        size = out.tell()
    return size
