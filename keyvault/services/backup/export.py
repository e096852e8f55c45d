"""Export: the whole store as one encrypted backup file (see ``fileformat``)."""

from __future__ import annotations

import base64
import gzip
import json

from sqlalchemy import select
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.db import SCHEMA_HEAD
from keyvault.models import utcnow
from keyvault.services.backup.fileformat import (
    FORMAT_VERSION,
    backup_tables,
    body_aad,
    check_no_unknown_tables,
    encode_value,
    header_bytes,
)


def use_snapshot(session: Session) -> None:
    """Read the whole export from one snapshot (PostgreSQL REPEATABLE READ; SQLite's
    immediate transaction already is one). Call first, before the session's first query."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})


def export_store(session: Session, *, keyring: crypto.Keyring) -> bytes:
    """The whole store as an encrypted backup file, sealed under the keyring's active key.

    ``keyring`` must come from ``store.open_keyring`` (its active key is the live one).
    """
    check_no_unknown_tables(session)
    key_id = keyring.active
    created_at = utcnow()
    tables = {}
    for table in backup_tables():
        columns = list(table.columns)
        rows = session.execute(select(table).order_by(*table.primary_key.columns)).all()
        tables[table.name] = {
            "columns": [c.name for c in columns],
            "rows": [[encode_value(c, row._mapping[c]) for c in columns] for row in rows],
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
    raw_header = header_bytes(
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
