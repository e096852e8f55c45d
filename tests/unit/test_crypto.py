"""keyvault.crypto: envelope encryption, AAD binding, tampering, the keyring file."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from dataclasses import replace

import pytest

from keyvault import crypto
from keyvault.errors import IntegrityError, MasterKeyFileError, WrongMasterKey

PLAINTEXT = b"kvCRYPTOtest" + b"Zq7" * 17 + b"x"  # 64 bytes, the shape of a TA key
AAD = crypto.version_aad("ta2", "app:demo", 3)
WHAT = "app:demo version 3 of cluster ta2"


@pytest.fixture
def keyring() -> crypto.Keyring:
    return crypto.Keyring.generate()


@pytest.fixture
def sealed(keyring) -> crypto.Sealed:
    return crypto.seal(keyring, PLAINTEXT, AAD)


def flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x01]) + blob[index + 1 :]


# --- envelope ---------------------------------------------------------------


def test_round_trip(keyring, sealed):
    assert sealed.master_key_id == keyring.active
    opened = crypto.unseal(keyring, sealed, AAD, what=WHAT)
    assert opened == PLAINTEXT


def test_ciphertext_and_wrapped_key_hide_the_plaintext(keyring, sealed):
    for blob in (sealed.ciphertext, sealed.wrapped_key):
        assert PLAINTEXT not in blob
        assert base64.b64encode(PLAINTEXT) not in blob
        assert PLAINTEXT.hex().encode() not in blob
    # nonce + 64 bytes of ciphertext + 16 bytes of tag; nonce + 32-byte data key + tag
    assert len(sealed.ciphertext) == crypto.NONCE_BYTES + len(PLAINTEXT) + 16
    assert len(sealed.wrapped_key) == crypto.NONCE_BYTES + crypto.KEY_BYTES + 16


def test_each_seal_uses_a_fresh_data_key_and_nonce(keyring):
    a = crypto.seal(keyring, PLAINTEXT, AAD)
    b = crypto.seal(keyring, PLAINTEXT, AAD)
    assert a.ciphertext != b.ciphertext
    assert a.wrapped_key != b.wrapped_key
    assert a.ciphertext[: crypto.NONCE_BYTES] != b.ciphertext[: crypto.NONCE_BYTES]


def test_wrong_master_key_with_another_id_is_refused(sealed):
    other = crypto.Keyring.generate()
    with pytest.raises(WrongMasterKey, match="not in the keyring"):
        crypto.unseal(other, sealed, AAD, what=WHAT)


def test_wrong_master_key_with_the_same_id_fails_integrity(keyring, sealed):
    impostor = crypto.Keyring(
        active=keyring.active, keys={keyring.active: os.urandom(crypto.KEY_BYTES)}
    )
    with pytest.raises(IntegrityError) as info:
        crypto.unseal(impostor, sealed, AAD, what=WHAT)
    assert info.value.what == WHAT
    assert WHAT in str(info.value)


@pytest.mark.parametrize(
    "aad",
    [
        crypto.version_aad("ta3", "app:demo", 3),  # other cluster
        crypto.version_aad("ta2", "app:other", 3),  # other scope
        crypto.version_aad("ta2", "root", 3),  # root instead of the app
        crypto.version_aad("ta2", "app:demo", 2),  # other version
        crypto.version_aad("ta2", "app:demo", 4),
    ],
    ids=["cluster", "scope", "root", "version-2", "version-4"],
)
def test_aad_mismatch_fails_with_integrity_error(keyring, sealed, aad):
    with pytest.raises(IntegrityError) as info:
        crypto.unseal(keyring, sealed, aad, what="the moved row")
    assert info.value.what == "the moved row"
    assert "the moved row" in str(info.value)
    assert info.value.code == "integrity_error"
    assert info.value.exit_code == 1


@pytest.mark.parametrize("where", ["nonce", "body", "tag"])
def test_tampered_ciphertext(keyring, sealed, where):
    index = {"nonce": 0, "body": crypto.NONCE_BYTES + 5, "tag": len(sealed.ciphertext) - 1}[where]
    bad = replace(sealed, ciphertext=flip(sealed.ciphertext, index))
    with pytest.raises(IntegrityError, match="ciphertext was altered") as info:
        crypto.unseal(keyring, bad, AAD, what=WHAT)
    assert info.value.what == WHAT
    assert WHAT in str(info.value)


@pytest.mark.parametrize("where", ["nonce", "body", "tag"])
def test_tampered_wrapped_key(keyring, sealed, where):
    index = {"nonce": 0, "body": crypto.NONCE_BYTES + 5, "tag": len(sealed.wrapped_key) - 1}[where]
    bad = replace(sealed, wrapped_key=flip(sealed.wrapped_key, index))
    with pytest.raises(IntegrityError, match="data key does not authenticate") as info:
        crypto.unseal(keyring, bad, AAD, what=WHAT)
    assert info.value.what == WHAT
    assert WHAT in str(info.value)


@pytest.mark.parametrize("field", ["ciphertext", "wrapped_key"])
def test_truncated_blobs_fail_cleanly(keyring, sealed, field):
    for length in (0, 5, crypto.NONCE_BYTES, crypto.NONCE_BYTES + 3):
        bad = replace(sealed, **{field: getattr(sealed, field)[:length]})
        with pytest.raises(IntegrityError) as info:
            crypto.unseal(keyring, bad, AAD, what=WHAT)
        assert info.value.what == WHAT


def test_swapped_ciphertexts_between_rows_fail(keyring):
    aad1, aad2 = crypto.version_aad("ta2", "root", 1), crypto.version_aad("ta2", "root", 2)
    one, two = crypto.seal(keyring, PLAINTEXT, aad1), crypto.seal(keyring, PLAINTEXT[::-1], aad2)
    # The whole envelope moved to another row: the data key no longer authenticates.
    with pytest.raises(IntegrityError, match="data key"):
        crypto.unseal(keyring, two, aad1, what="root version 1")
    # Only the ciphertext moved: it does not open under this row's data key.
    with pytest.raises(IntegrityError, match="ciphertext"):
        crypto.unseal(keyring, replace(one, ciphertext=two.ciphertext), aad1, what="root version 1")


def test_master_key_id_is_bound_to_the_wrapped_key(keyring, sealed):
    grown = keyring.with_new_active()
    relabelled = replace(sealed, master_key_id=grown.active)
    with pytest.raises(IntegrityError):
        crypto.unseal(grown, relabelled, AAD, what=WHAT)


# --- rewrap -----------------------------------------------------------------


def test_rewrap_moves_the_data_key_to_the_new_master_key(keyring, sealed):
    grown = keyring.with_new_active()
    assert grown.active != keyring.active and set(grown.keys) == {keyring.active, grown.active}
    moved = crypto.rewrap(grown, sealed, AAD, to=grown.active, what=WHAT)
    assert moved.master_key_id == grown.active
    assert moved.ciphertext == sealed.ciphertext  # the data itself is not re-encrypted
    assert moved.wrapped_key != sealed.wrapped_key
    only_new = grown.only(grown.active)
    assert crypto.unseal(only_new, moved, AAD, what=WHAT) == PLAINTEXT
    # the previous master key opens nothing any more
    with pytest.raises(WrongMasterKey):
        crypto.unseal(keyring, moved, AAD, what=WHAT)
    # ... and the new one alone cannot open the old envelope
    with pytest.raises(WrongMasterKey):
        crypto.unseal(only_new, sealed, AAD, what=WHAT)


def test_rewrap_of_a_tampered_row_refuses(keyring, sealed):
    grown = keyring.with_new_active()
    bad = replace(sealed, wrapped_key=flip(sealed.wrapped_key, 20))
    with pytest.raises(IntegrityError) as info:
        crypto.rewrap(grown, bad, AAD, to=grown.active, what=WHAT)
    assert info.value.what == WHAT


def test_rewrap_keeps_the_aad_binding(keyring, sealed):
    grown = keyring.with_new_active()
    moved = crypto.rewrap(grown, sealed, AAD, to=grown.active, what=WHAT)
    with pytest.raises(IntegrityError):
        crypto.unseal(grown, moved, crypto.version_aad("ta2", "app:demo", 4), what=WHAT)


# --- check values -------------------------------------------------------------


def test_check_value_verifies_with_its_key(keyring):
    value = crypto.check_value(keyring, keyring.active)
    crypto.verify_check_value(keyring, keyring.active, value)  # no exception


def test_check_value_refuses_another_key_under_the_same_id(keyring):
    value = crypto.check_value(keyring, keyring.active)
    impostor = crypto.Keyring(
        active=keyring.active, keys={keyring.active: os.urandom(crypto.KEY_BYTES)}
    )
    with pytest.raises(WrongMasterKey, match="does not open this store"):
        crypto.verify_check_value(impostor, keyring.active, value)


def test_check_value_is_bound_to_its_key_id(keyring):
    grown = keyring.with_new_active()
    value = crypto.check_value(grown, keyring.active)
    with pytest.raises(WrongMasterKey):
        crypto.verify_check_value(grown, grown.active, value)


@pytest.mark.parametrize("mangle", [lambda v: flip(v, 30), lambda v: v[:10], lambda v: b""])
def test_damaged_check_value_is_refused(keyring, mangle):
    value = crypto.check_value(keyring, keyring.active)
    with pytest.raises(WrongMasterKey):
        crypto.verify_check_value(keyring, keyring.active, mangle(value))


# --- keyring object -----------------------------------------------------------


def test_keyring_repr_shows_ids_only(keyring):
    text = repr(keyring)
    assert keyring.active in text
    for key in keyring.keys.values():
        assert key.hex() not in text and base64.b64encode(key).decode() not in text


def test_keyring_ids_are_unique_and_well_formed(keyring):
    grown = keyring.with_new_active().with_new_active()
    assert len(grown.keys) == 3
    for key_id in grown.keys:
        assert key_id.startswith("mk-") and len(key_id) == len("mk-20260101-abcdef")
    assert all(len(k) == crypto.KEY_BYTES for k in grown.keys.values())


# --- fingerprint --------------------------------------------------------------


def test_fingerprint_is_the_first_16_hex_digits_of_sha256():
    key = "A" * 64
    assert crypto.fingerprint(key) == hashlib.sha256(key.encode()).hexdigest()[:16]
    assert len(crypto.fingerprint(key)) == 16
    assert crypto.fingerprint(key) != crypto.fingerprint("B" * 64)
    # a known value, so consumers computing it elsewhere agree
    assert crypto.fingerprint("abc") == "ba7816bf8f01cfea"


# --- keyring file -------------------------------------------------------------


@pytest.fixture
def key_file(tmp_path, keyring):
    path = tmp_path / "home" / "master.key"
    crypto.save_keyring(path, keyring)
    return path


def test_keyring_file_round_trip(key_file, keyring):
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    loaded = crypto.load_keyring(key_file)
    assert loaded.active == keyring.active
    assert loaded.keys == keyring.keys
    data = json.loads(key_file.read_text())
    assert data["format"] == crypto.KEYRING_FORMAT


def test_keyring_file_is_written_0600_whatever_the_umask(tmp_path, keyring):
    old = os.umask(0)
    try:
        path = tmp_path / "loose" / "master.key"
        crypto.save_keyring(path, keyring)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o400, 0o700, 0o666])
def test_keyring_file_with_a_loose_mode_is_refused(key_file, mode):
    os.chmod(key_file, mode)
    with pytest.raises(MasterKeyFileError) as info:
        crypto.load_keyring(key_file)
    assert f"{mode:04o}" in str(info.value)
    assert f"chmod 600 {key_file}" in str(info.value)
    assert info.value.path == str(key_file)


def test_keyring_file_owned_by_another_user_is_refused(key_file):
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    os.chown(key_file, 4242, -1)
    with pytest.raises(MasterKeyFileError, match="owned by uid 4242") as info:
        crypto.load_keyring(key_file)
    assert "chown" in str(info.value)


def test_missing_keyring_file_names_keyvault_init(tmp_path):
    path = tmp_path / "nope" / "master.key"
    with pytest.raises(MasterKeyFileError, match="does not exist") as info:
        crypto.load_keyring(path)
    assert "keyvault init" in str(info.value)


def test_keyring_file_that_is_a_symlink_or_directory_is_refused(tmp_path, key_file):
    link = tmp_path / "link.key"
    link.symlink_to(key_file)
    with pytest.raises(MasterKeyFileError, match="not a regular file"):
        crypto.load_keyring(link)
    directory = tmp_path / "dir.key"
    directory.mkdir(mode=0o700)
    with pytest.raises(MasterKeyFileError, match="not a regular file"):
        crypto.load_keyring(directory)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[]",
        b'{"format": "other", "active": "a", "keys": {}}',
        b'{"format": "keyvault-keyring-v1"}',
        b'{"format": "keyvault-keyring-v1", "active": "mk-1", "keys": {}}',
        b'{"format": "keyvault-keyring-v1", "active": "mk-1", "keys": {"mk-1": "!!notbase64!!"}}',
        b'{"format": "keyvault-keyring-v1", "active": "mk-1", "keys": {"mk-1": "c2hvcnQ="}}',
        b'{"format": "keyvault-keyring-v1", "active": "mk-1", "keys": ["mk-1"]}',
        b'{"format": "keyvault-keyring-v1", "active": "mk-1", "keys": {"mk-1": 5}}',
    ],
    ids=lambda c: f"{len(c)}-bytes",
)
def test_damaged_keyring_file_is_refused(tmp_path, content):
    path = tmp_path / "master.key"
    crypto.write_private_file(path, content)
    with pytest.raises(MasterKeyFileError, match="damaged or not a keyvault keyring") as info:
        crypto.load_keyring(path)
    assert info.value.path == str(path)


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path, keyring):
    path = tmp_path / "home" / "master.key"
    crypto.save_keyring(path, keyring)
    grown = keyring.with_new_active()
    crypto.save_keyring(path, grown)
    assert crypto.load_keyring(path).keys == grown.keys
    assert sorted(p.name for p in path.parent.iterdir()) == ["master.key"]


def test_atomic_write_failure_leaves_the_old_file_and_no_temp_files(tmp_path, keyring):
    path = tmp_path / "home" / "master.key"
    crypto.save_keyring(path, keyring)
    before = path.read_bytes()

    # os.replace onto a directory fails after the temporary file was written
    target = tmp_path / "home" / "adir"
    target.mkdir()
    (target / "occupied").write_text("x")
    with pytest.raises(OSError):  # noqa: PT011
        crypto.write_private_file(target, b"new content")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["adir", "master.key"]


def test_subkeys_differ_by_purpose_and_master_key():
    ring = crypto.Keyring.generate().with_new_active()
    first, second = sorted(ring.keys)
    config = crypto.subkey(ring, first, crypto.PURPOSE_CONFIG_MAC)
    assert len(config) == 32
    assert config != crypto.subkey(ring, first, crypto.PURPOSE_AUDIT_CHAIN)
    assert config != crypto.subkey(ring, second, crypto.PURPOSE_CONFIG_MAC)
    assert config == crypto.subkey(ring, first, crypto.PURPOSE_CONFIG_MAC)


def test_mac_encoding_is_unambiguous_and_checked_in_constant_time():
    key = b"k" * 32
    tag = crypto.mac(key, "a|b", "c")
    assert tag != crypto.mac(key, "a", "b|c")
    assert tag != crypto.mac(key, ["a|b", "c"])
    assert crypto.mac(key, None) != crypto.mac(key, "None")
    assert crypto.mac_matches(tag, crypto.mac(key, "a|b", "c"))
    assert not crypto.mac_matches(None, tag)
    assert not crypto.mac_matches(tag, crypto.mac(b"j" * 32, "a|b", "c"))
