"""The sealed body as a stream: gzip + AES-256-GCM written and read chunk by chunk.

The bytes are exactly those of ``crypto.seal`` over the gzip'd body (format 1 is
unchanged): a 60-byte data key wrapped under the master key (nonce, key, tag), then the
body's nonce, ciphertext and tag. Written and read in chunks, so neither a backup nor a
restore holds the compressed or encrypted file in memory, and a restore stops as soon
as the decompressed body passes its limit.

The encryption is ``crypto.StreamSealer``/``StreamUnsealer`` (``crypto.seal``'s
construction, in pieces); this module adds gzip, chunking and the size limit.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import BinaryIO

from keyvault import crypto
from keyvault.errors import IntegrityError, InvalidInput

TAG_BYTES = crypto.TAG_BYTES
CHUNK = 1 << 20
DEFAULT_MAX_BODY = 1 << 30  # 1 GiB of decompressed body
_SEAL_SLACK = 64 * 1024  # gzip and GCM overhead over the body
_GZIP_WBITS = 31  # zlib: a gzip member (header with mtime 0, CRC-32 and length trailer)

_DAMAGED_HINT = (
    "the file is damaged, truncated or was modified; nothing was restored; use another copy"
)


def damaged(message: str) -> IntegrityError:
    return IntegrityError(message, what="backup file", hint=_DAMAGED_HINT)


def too_large(limit: int) -> InvalidInput:
    return InvalidInput(
        f"the backup is larger than the restore limit of {limit} bytes (decompressed)",
        hint="if it is a genuine backup, raise the limit with --max-size "
        "(or KEYVAULT_RESTORE_MAX_SIZE)",
    )


class BodyWriter:
    """gzip, then AES-256-GCM under a fresh data key, into ``out``; ``close()`` writes the tag."""

    def __init__(self, out: BinaryIO, keyring: crypto.Keyring, aad: bytes) -> None:
        self._enc = crypto.StreamSealer(keyring, aad)
        self._zip = zlib.compressobj(6, zlib.DEFLATED, _GZIP_WBITS)
        self._out = out
        self._pending: list[bytes] = []
        self._pending_size = 0
        out.write(self._enc.header)

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= CHUNK:
            self._flush_pending()

    def _flush_pending(self) -> None:
        if self._pending:
            self._out.write(self._enc.update(self._zip.compress(b"".join(self._pending))))
            self._pending, self._pending_size = [], 0

    def close(self) -> None:
        self._flush_pending()
        self._out.write(self._enc.update(self._zip.flush()) + self._enc.finalize())


def _pump(stream: BinaryIO, limit: int, sink: Callable[[bytes], None]) -> bytes:
    """Feed the rest of ``stream`` but its last ``TAG_BYTES`` to ``sink``; return those."""
    held = b""
    read = 0
    while chunk := stream.read(CHUNK):
        read += len(chunk)
        if read > limit:
            raise too_large(limit - _SEAL_SLACK)
        held += chunk
        if len(held) > TAG_BYTES:
            sink(held[:-TAG_BYTES])
            held = held[-TAG_BYTES:]
    if len(held) < TAG_BYTES:
        raise damaged("the backup is truncated: its encrypted body is missing or incomplete")
    return held


def read_body(
    stream: BinaryIO, *, keyring: crypto.Keyring, key_id: str, aad: bytes, max_body: int
) -> bytearray:
    """Decrypt and decompress the sealed body from ``stream`` (after the header).

    At most ``max_body`` decompressed bytes are kept (``InvalidInput`` beyond); a body that
    does not authenticate or decompress raises ``IntegrityError``.
    """
    head = stream.read(crypto.STREAM_HEADER_BYTES)
    if len(head) < crypto.STREAM_HEADER_BYTES:
        raise damaged("the backup is truncated: its encrypted body is missing or incomplete")
    try:
        dec = crypto.StreamUnsealer(keyring, key_id, head, aad, what="backup file")
    except IntegrityError:
        raise damaged(
            "the backup failed its integrity check: its data key does not authenticate"
        ) from None
    unzip = zlib.decompressobj(_GZIP_WBITS)
    body = bytearray()
    try:
        # gzip'd data is never much larger than the data itself: the same limit bounds the file.
        tag = _pump(
            stream, max_body + _SEAL_SLACK, lambda p: _inflate(unzip, dec.update(p), body, max_body)
        )
        try:
            tail = dec.finalize(tag)
        except IntegrityError:
            raise damaged("the backup failed its integrity check") from None
        _inflate(unzip, tail, body, max_body)
    except zlib.error:
        raise damaged(
            "the backup failed its integrity check: its body does not decompress"
        ) from None
    if not unzip.eof or unzip.unused_data:
        raise damaged(
            "the backup failed its integrity check: its body is incomplete or has trailing data"
        )
    return body


def _inflate(unzip: zlib._Decompress, data: bytes, body: bytearray, max_body: int) -> None:
    while data:
        room = max_body - len(body)
        out = unzip.decompress(data, room + 1)
        body += out
        if len(body) > max_body:
            raise too_large(max_body)
        data = unzip.unconsumed_tail
