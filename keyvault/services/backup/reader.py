"""Reading a backup file: a bounded header read, then the body streamed and checked.

Nothing here touches the database. A file that is not a backup (``/dev/zero``, a
random file) is refused after its first bytes; a body is decrypted and decompressed
chunk by chunk and refused as soon as it passes ``max_body`` decompressed bytes.
Only the decompressed JSON body (at most ``max_body``) and its parsed rows are held.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import BinaryIO

from keyvault import crypto
from keyvault.errors import InvalidInput, WrongMasterKey
from keyvault.services.backup.fileformat import (
    FORMAT_VERSION,
    HEADER_READ_LIMIT,
    BackupContents,
    BackupHeader,
    bad_body,
    body_aad,
    read_header,
)
from keyvault.services.backup.stream import DEFAULT_MAX_BODY, read_body, too_large

_KEYRING_HINT = (
    "use the keyring file that was current when the backup was made (KEYVAULT_MASTER_KEY_FILE)"
)


class _HashingReader:
    """``leftover`` then ``stream``, hashing every byte handed out."""

    def __init__(self, leftover: bytes, stream: BinaryIO, digest: hashlib._Hash) -> None:
        self._leftover, self._stream, self._digest = leftover, stream, digest

    def read(self, n: int = -1) -> bytes:
        if self._leftover:
            data, self._leftover = self._leftover[:n], self._leftover[n:]
        else:
            data = self._stream.read(n)
        self._digest.update(data)
        return data


def check_keyring(header: BackupHeader, keyring: crypto.Keyring) -> None:
    """The keyring holds the backup's master key (else ``WrongMasterKey``)."""
    key_id = header.master_key_id
    if key_id not in keyring.keys:
        raise WrongMasterKey(
            f"this backup was made with master key {key_id}, which is not in the keyring "
            f"(it holds {', '.join(sorted(keyring.keys))})",
            hint=_KEYRING_HINT,
        )
    try:
        crypto.verify_check_value(keyring, key_id, header.check_value)
    except WrongMasterKey:
        raise WrongMasterKey(
            f"master key {key_id} in the keyring is not the key this backup was made with",
            hint=_KEYRING_HINT,
        ) from None


def _parse_body(raw: bytearray, header: BackupHeader) -> dict[str, dict]:
    try:
        body = json.loads(raw)
        tables = body["tables"]
        if (
            body["format"] != FORMAT_VERSION
            or body["master_key_id"] != header.master_key_id
            or body["schema_revision"] != header.schema_revision
            or not isinstance(tables, dict)
        ):
            raise ValueError("header and body disagree")
        for table in tables.values():
            if not isinstance(table["columns"], list) or not isinstance(table["rows"], list):
                raise ValueError("bad table")
    except (ValueError, KeyError, TypeError):
        raise bad_body("it cannot be read") from None
    return tables


def read_backup(
    stream: BinaryIO, *, keyring: crypto.Keyring, max_body: int = DEFAULT_MAX_BODY
) -> BackupContents:
    """Check and decrypt a backup from ``stream``: ``InvalidInput``/``IntegrityError`` if it
    is not one, damaged or too large, ``WrongMasterKey`` if the keyring cannot open it."""
    digest = hashlib.sha256()
    prefix = stream.read(HEADER_READ_LIMIT)
    header, leftover = read_header(prefix)
    digest.update(prefix[: len(prefix) - len(leftover)])
    check_keyring(header, keyring)
    body = read_body(
        _HashingReader(leftover, stream, digest),  # type: ignore[arg-type]
        keyring=keyring,
        key_id=header.master_key_id,
        aad=body_aad(header.raw),
        max_body=max_body,
    )
    tables = _parse_body(body, header)
    del body
    return BackupContents(header=header, tables=tables, digest=digest.hexdigest())


def open_backup(
    data: bytes, *, keyring: crypto.Keyring, max_body: int = DEFAULT_MAX_BODY
) -> BackupContents:
    """``read_backup`` of a file already in memory."""
    return read_backup(io.BytesIO(data), keyring=keyring, max_body=max_body)


def open_backup_file(
    path: Path, *, keyring: crypto.Keyring, max_body: int = DEFAULT_MAX_BODY
) -> BackupContents:
    """``read_backup`` of the file at ``path``, refused at once if it is a regular file
    larger than any backup within ``max_body`` can be."""
    try:
        with open(path, "rb") as fh:
            info = os.fstat(fh.fileno())
            if info.st_size > max_body + 2 * HEADER_READ_LIMIT:
                raise too_large(max_body)
            return read_backup(fh, keyring=keyring, max_body=max_body)
    except OSError as exc:
        raise InvalidInput(
            f"cannot read {path}: {exc.strerror or exc}", hint="give a readable backup file"
        ) from None
