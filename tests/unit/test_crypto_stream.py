"""crypto.StreamSealer / StreamUnsealer: ``crypto.seal``'s bytes, written and read in pieces."""

from __future__ import annotations

import secrets

import pytest

from keyvault import crypto
from keyvault.errors import IntegrityError

AAD = b"keyvault/v1/test|stream"


def sealed_stream(keyring: crypto.Keyring, pieces: list[bytes]) -> bytes:
    sealer = crypto.StreamSealer(keyring, AAD)
    return sealer.header + b"".join(sealer.update(p) for p in pieces) + sealer.finalize()


def open_stream(keyring: crypto.Keyring, blob: bytes, chunk: int) -> bytes:
    head, body = blob[: crypto.STREAM_HEADER_BYTES], blob[crypto.STREAM_HEADER_BYTES :]
    ciphertext, tag = body[: -crypto.TAG_BYTES], body[-crypto.TAG_BYTES :]
    unsealer = crypto.StreamUnsealer(keyring, keyring.active, head, AAD, what="test stream")
    out = b"".join(
        unsealer.update(ciphertext[i : i + chunk]) for i in range(0, len(ciphertext), chunk)
    )
    return out + unsealer.finalize(tag)


def test_a_stream_is_the_bytes_of_seal_both_ways():
    keyring = crypto.Keyring.generate()
    data = secrets.token_bytes(100_000)
    blob = sealed_stream(keyring, [data[:1], data[1:5000], data[5000:]])
    wrapped = blob[: crypto.WRAPPED_KEY_BYTES]
    as_sealed = crypto.Sealed(blob[crypto.WRAPPED_KEY_BYTES :], wrapped, keyring.active)
    assert crypto.unseal(keyring, as_sealed, AAD, what="x") == data
    sealed = crypto.seal(keyring, data, AAD)
    assert open_stream(keyring, sealed.wrapped_key + sealed.ciphertext, 777) == data


@pytest.mark.parametrize("where", [3, crypto.STREAM_HEADER_BYTES + 10, -1])
def test_a_changed_byte_fails_with_an_integrity_error(where):
    keyring = crypto.Keyring.generate()
    blob = bytearray(sealed_stream(keyring, [b"payload" * 100]))
    blob[where] ^= 1
    with pytest.raises(IntegrityError, match="test stream"):
        open_stream(keyring, bytes(blob), 64)
