"""`keyvault backup` / `keyvault restore` end to end through the CLI, on SQLite and PostgreSQL.

backup → wipe (delete the SQLite file / drop the PostgreSQL database) → `keyvault init` with
the same keyring → restore: every table comes back row for row and every version of every
secret decrypts to the key that was imported. A wrong keyring, a damaged file, a non-empty
store and a backup whose rows the database refuses all leave the database as it was.

Keys are random and never printed: comparisons go through ``same_key`` and byte searches
report which key and form was found, never the key.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import secrets
from pathlib import Path

import pytest
from sqlalchemy import text

from keyvault import crypto
from keyvault.db import SCHEMA_HEAD, make_engine, session_factory, transaction
from keyvault.models import AuditRecord, Rotation, ScopeSchedule, utcnow
from keyvault.services import backup as service
from keyvault.services import webhooks
from tests.support.cli import Cli, describe, expect, one_error_line
from tests.support.db import (
    AUDITED_ATTEMPTS,
    CHAIN_TABLES,
    Database,
    admin_engine,
    comparable,
    dump_store,
)
from tests.support.leak_guard import new_key

CLUSTERS = ("ta2", "ta3")
# (cluster, appid or None for root) -> number of keys imported before the backup
SCOPES = {("ta2", "demo"): 3, ("ta2", None): 2, ("ta3", "other"): 2, ("ta3", None): 1}


# --- helpers ------------------------------------------------------------------------------


def same_key(actual: str, expected: str, what: str) -> None:
    """Compare keys without ever putting one in the assertion message."""
    ok = actual == expected
    assert ok, f"{what}: the key differs from the one imported"


def scope_args(appid: str | None) -> list[str]:
    return ["--root"] if appid is None else ["--appid", appid]


def import_key(cli: Cli, cluster: str, appid: str | None, key: str) -> None:
    expect(cli("import", "--cluster", cluster, *scope_args(appid), input=key + "\n"))


def reveal(cli: Cli, cluster: str, appid: str | None, version: int) -> str:
    result = expect(
        cli(
            "secrets",
            "show",
            "--cluster",
            cluster,
            *scope_args(appid),
            "--reveal",
            "--version",
            str(version),
        )
    )
    assert result.stdout.count("\n") == 1, describe(result)
    return result.stdout[:-1]


def history(cli: Cli, cluster: str, appid: str | None) -> list[dict]:
    return json.loads(
        expect(cli("secrets", "history", "--cluster", cluster, *scope_args(appid), "--json")).stdout
    )


def dump_all(url: str) -> dict[str, list]:
    """Every row of every backed-up table, as it compares across backup/restore attempts."""
    return comparable(dump_store(url))


def without_revision(dump: dict) -> dict:
    """The dump without the revision counter."""
    return {name: rows for name, rows in dump.items() if name != "revision"}


def revision_value(dump: dict) -> int:
    (row,) = dump["revision"]
    return row["value"]


def key_forms(key: str) -> dict[str, bytes]:
    raw = key.encode()
    return {
        "raw": raw,
        "base64": base64.b64encode(raw),
        "base64url": base64.urlsafe_b64encode(raw),
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
        "utf-16-le": key.encode("utf-16-le"),
    }


def find_keys(blob: bytes, keys: dict[str, str]) -> list[str]:
    """Names (never values) of the keys found in ``blob``, in any of their forms."""
    return [
        f"{name} as {form}"
        for name, key in keys.items()
        for form, b in key_forms(key).items()
        if b in blob
    ]


def wipe(database: Database) -> None:
    """Lose the database: delete the SQLite file, or drop and recreate the PostgreSQL database."""
    if database.is_sqlite:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{database.sqlite_path}{suffix}").unlink(missing_ok=True)
        return
    engine = admin_engine(database.server_url)
    try:
        with engine.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = :n AND pid <> pg_backend_pid()"
                ),
                {"n": database.name},
            )
            conn.execute(text(f'DROP DATABASE "{database.name}"'))
            conn.execute(text(f'CREATE DATABASE "{database.name}"'))
    finally:
        engine.dispose()


def fresh_store(cli: Cli, database: Database) -> None:
    """Wipe the database and `keyvault init` it with the keyring already in place."""
    wipe(database)
    result = expect(cli("init"))
    assert "created master key" not in result.stdout, "init must reuse the keyring file"


def populate(cli: Cli, home) -> dict[tuple, list[str]]:
    """A store with something in every table; returns the imported keys by scope, oldest first."""
    expect(cli("init"))
    for name in CLUSTERS:
        expect(cli("cluster", "add", name, "--open-api-url", f"http://{name}:8992"))
    expect(
        cli(
            "host",
            "add",
            "ta2",
            "10.0.0.2",
            "--user",
            "ops",
            "--become",
            "sudo",
            "--fingerprint",
            "SHA256:" + "B" * 43,
        )
    )
    expect(cli("host", "add", "ta3", "10.0.0.3", "--port", "2222"))
    expect(cli("token", "create", "reader", "--scope", "app:ta2/demo", "--expires", "90d"))
    expect(cli("token", "create", "rotator", "--scope", "root:ta3", "--rotate"))
    expect(cli("token", "revoke", "rotator", "--yes"))
    expect(
        cli(
            "webhook",
            "add",
            "--allow-private-network",
            "http://127.0.0.1:9/hook",
            "--scope",
            "app:ta2/*",
            "--scope",
            "root:ta3",
        )
    )
    expect(cli("policy", "set", "--cluster", "ta2", "--all-apps", "--max-age", "30d"))
    keys: dict[tuple, list[str]] = {}
    for (cluster, appid), n in SCOPES.items():
        for _ in range(n):
            keys.setdefault((cluster, appid), []).append(new_key())
            import_key(cli, cluster, appid, keys[(cluster, appid)][-1])
    # A retired master key row, versions re-wrapped, and one version sealed after it.
    expect(cli("master-key", "rotate", "--yes"))
    keys[("ta2", "demo")].append(new_key())
    import_key(cli, "ta2", "demo", keys[("ta2", "demo")][-1])

    engine = make_engine(home.database_url)
    try:
        with transaction(session_factory(engine)) as s:
            now = utcnow()
            host_id = s.execute(
                text("SELECT id FROM hosts WHERE address = '10.0.0.2'")
            ).scalar_one()
            cluster_id = s.execute(text("SELECT id FROM clusters WHERE name = 'ta2'")).scalar_one()
            s.add(
                Rotation(
                    id="r" + secrets.token_hex(8),
                    cluster_id=cluster_id,
                    scope="app:demo",
                    state="completed",
                    host_id=host_id,
                    host_label="ops@10.0.0.2:22",
                    actor="pytest",
                    created_at=now,
                    updated_at=now,
                    old_version=2,
                    new_version=3,
                    new_fingerprint=crypto.fingerprint(keys[("ta2", "demo")][2]),
                    cleaned_up=True,
                    verify_state="ok",
                    verify_code=0,
                    verify_message="ok",
                    verified_at=now,
                )
            )
            s.add(
                Rotation(
                    id="r" + secrets.token_hex(8),
                    cluster_id=cluster_id,
                    scope="root",
                    state="failed",
                    host_id=None,
                    host_label="ops@10.0.0.2:22",
                    actor="pytest",
                    created_at=now,
                    updated_at=now,
                    error="ta-tool said no",
                )
            )
            s.add(
                AuditRecord(
                    at=now,
                    token_name="reader",
                    action="read",
                    cluster="ta2",
                    scope="app:demo",
                    version=3,
                    client="127.0.0.1",
                    outcome="ok",
                )
            )
            s.add(
                ScopeSchedule(
                    cluster_id=cluster_id,
                    scope="app:demo",
                    consecutive_failures=2,
                    next_attempt_at=now,
                    last_error="refused",
                    updated_at=now,
                )
            )
            s.flush()
            assert webhooks.enqueue_deliveries(s, now=now) > 0
    finally:
        engine.dispose()
    return keys


def check_every_version(cli: Cli, keys: dict[tuple, list[str]]) -> None:
    for (cluster, appid), scope_keys in keys.items():
        for number, key in enumerate(scope_keys, start=1):
            same_key(
                reveal(cli, cluster, appid, number), key, f"{cluster} {appid or 'root'} v{number}"
            )


def all_histories(cli: Cli, keys) -> dict:
    return {scope: history(cli, *scope) for scope in keys}


# --- the sealed body, for crafting files in tests -------------------------------------------


def open_body(data: bytes, keyring: crypto.Keyring) -> tuple[bytes, dict]:
    header, sealed_part = service.read_header(data)
    n = crypto.NONCE_BYTES + crypto.KEY_BYTES + 16
    sealed = crypto.Sealed(sealed_part[n:], sealed_part[:n], header.master_key_id)
    body = json.loads(
        gzip.decompress(crypto.unseal(keyring, sealed, service.body_aad(header.raw), what="t"))
    )
    return header.raw, body


def seal_body(raw_header: bytes, body: dict, keyring: crypto.Keyring) -> bytes:
    sealed = crypto.seal(
        keyring, gzip.compress(json.dumps(body).encode()), service.body_aad(raw_header)
    )
    return raw_header + sealed.wrapped_key + sealed.ciphertext


def make_header(fields: dict) -> bytes:
    head = (
        service.MAGIC
        + b"\n"
        + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        + b"\n"
    )
    return head + hashlib.sha256(head).hexdigest().encode() + b"\n"


def header_fields(raw_header: bytes) -> dict:
    return json.loads(raw_header.split(b"\n")[1])


def live_keyring(home) -> crypto.Keyring:
    return crypto.load_keyring(home.master_key_file)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def populated(cli, home, database: Database, tmp_path):
    """A populated store and its backup file."""
    keys = populate(cli, home)
    before = dump_all(home.database_url)
    histories = all_histories(cli, keys)
    path = tmp_path / "store.kvbackup"
    result = expect(cli("backup", str(path)))
    return {"keys": keys, "before": before, "histories": histories, "file": path, "result": result}


# --- backup, wipe, restore ---------------------------------------------------------------------


def test_backup_wipe_restore_brings_everything_back(cli, home, database: Database, populated):
    keys, before, path, result = (
        populated["keys"],
        populated["before"],
        populated["file"],
        populated["result"],
    )
    ring = live_keyring(home)
    for table in (
        "master_keys",
        "clusters",
        "secrets",
        "secret_versions",
        "events",
        "hosts",
        "rotations",
        "access_tokens",
        "audit_log",
        "webhooks",
        "webhook_deliveries",
        "revision",
        "rotation_policies",
        "scope_schedules",
        "leases",
    ):
        assert before.get(table), f"the test store has no {table} rows"
    assert (
        len(before["master_keys"]) == 2
        and sum(r["retired_at"] is None for r in before["master_keys"]) == 1
    )

    # The backup: what it says, and what the file is.
    assert (
        ring.active in result.stdout
        and f"{len(before['secret_versions'])} secret_versions" in result.stdout
    )
    assert "master key is not in the backup" in result.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    blob = path.read_bytes()
    assert blob.startswith(b"KVBACKUP1\n")
    fields = header_fields(blob)
    assert fields["master_key_id"] == ring.active and fields["schema_revision"] == SCHEMA_HEAD
    assert fields["format"] == 1 and "created_at" in fields
    all_keys = {
        f"{c} {a or 'root'} v{i}": k for (c, a), ks in keys.items() for i, k in enumerate(ks, 1)
    }
    assert not find_keys(blob, all_keys), "a key is in the backup file in clear"
    assert not find_keys(
        blob, {f"master key {k}": base64.b64encode(v).decode() for k, v in ring.keys.items()}
    )
    assert ring.keys[ring.active] not in blob
    assert (
        b"secret_versions" not in blob and b"http://ta2:8992" not in blob
    )  # the body is encrypted

    # Wipe, init with the same keyring, restore.
    fresh_store(cli, database)
    assert not dump_all(home.database_url)["secret_versions"]
    restored = expect(cli("restore", str(path)))
    assert f"master key {ring.active}" in restored.stdout
    assert (
        f"every secret version decrypts ({len(before['secret_versions'])} checked)"
        in restored.stdout
    )

    after = dump_all(home.database_url)
    assert without_revision(after) == without_revision(before)
    assert revision_value(after) > revision_value(before)  # servers see a change
    check_every_version(cli, keys)
    assert all_histories(cli, keys) == populated["histories"]
    demo = populated["histories"][("ta2", "demo")]
    assert [r["state"] for r in demo] == ["invalidated"] * 3 + ["current"]
    assert [r["superseded_by"] for r in demo] == [2, 3, 4, None]
    expect(cli("db", "check"))

    # The store works on: new rows get fresh ids (PostgreSQL sequences were moved past them).
    later = new_key()
    import_key(cli, "ta2", "demo", later)
    same_key(reveal(cli, "ta2", "demo", 5), later, "key imported after the restore")
    keys[("ta2", "demo")].append(later)
    expect(cli("cluster", "add", "ta4", "--open-api-url", "http://ta4:8992"))
    expect(cli("host", "add", "ta4", "10.0.0.4"))
    expect(cli("token", "create", "later", "--scope", "root:ta4"))
    expect(
        cli(
            "webhook",
            "add",
            "--allow-private-network",
            "http://127.0.0.1:9/later",
            "--scope",
            "root:ta4",
        )
    )
    expect(cli("policy", "set", "--cluster", "ta4", "--root", "--max-age", "7d"))
    grown = dump_all(home.database_url)
    for table in (
        "clusters",
        "secret_versions",
        "events",
        "hosts",
        "access_tokens",
        "webhooks",
        "rotation_policies",
    ):
        assert len(grown[table]) == len(before[table]) + 1, table
        assert grown[table][-1]["id"] > max(r["id"] for r in before[table]), table
    check_every_version(cli, keys)


def test_backup_refuses_to_overwrite_without_force(cli, home, populated):
    path = populated["file"]
    first = path.read_bytes()
    one_error_line(cli("backup", str(path)), 1, "already exists", "--force")
    assert path.read_bytes() == first
    expect(cli("backup", str(path), "--force"))
    assert path.read_bytes() != first  # a new file (fresh data key and nonces)
    assert path.stat().st_mode & 0o777 == 0o600
    assert (
        sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []
    )  # no temp files


# --- refusals leave the database untouched -----------------------------------------------------


def test_restore_with_a_wrong_keyring_is_refused(
    cli, home, database: Database, populated, tmp_path
):
    path = populated["file"]
    original_ring = home.master_key_file.read_bytes()
    # Another machine: a fresh database and `keyvault init` made a new keyring.
    home.master_key_file.unlink()
    wipe(database)
    assert "created master key" in expect(cli("init")).stdout
    other = live_keyring(home)
    unchanged = dump_all(home.database_url)
    result = cli("restore", str(path))
    one_error_line(result, 1, "not in the keyring", "master key")
    assert result.stdout == ""
    assert dump_all(home.database_url) == unchanged

    # A keyring naming the backup's key id, but holding other key bytes.
    backup_id = header_fields(path.read_bytes())["master_key_id"]
    assert backup_id not in other.keys
    impostor = tmp_path / "impostor.key"
    crypto.save_keyring(
        impostor, crypto.Keyring(active=backup_id, keys={backup_id: secrets.token_bytes(32)})
    )
    home.master_key_file.unlink()
    impostor.rename(home.master_key_file)
    wipe(database)
    expect(cli("init"))
    unchanged = dump_all(home.database_url)
    one_error_line(
        cli("restore", str(path)),
        1,
        f"master key {backup_id}",
        "not the key this backup was made with",
    )
    assert dump_all(home.database_url) == unchanged

    # The right keyring restores it.
    home.master_key_file.unlink()
    crypto.write_private_file(home.master_key_file, original_ring)
    fresh_store(cli, database)
    expect(cli("restore", str(path)))
    check_every_version(cli, populated["keys"])


def damaged_variants(blob: bytes, ring: crypto.Keyring) -> dict[str, tuple[bytes, int, str]]:
    """name -> (file content, exit code, fragment of the error)."""
    raw_header, _body = open_body(blob, ring)
    body_start = len(raw_header) + 60
    fields = header_fields(raw_header)

    def flipped(at: int) -> bytes:
        b = bytearray(blob)
        b[at] ^= 0x01
        return bytes(b)

    created = fields["created_at"]
    changed_created = created[:-1] + ("1" if created[-1] != "1" else "2")
    forged = make_header({**fields, "created_at": changed_created})  # checksum recomputed
    return {
        "flipped body byte": (
            flipped(body_start + (len(blob) - body_start) // 2),
            1,
            "integrity check",
        ),
        "flipped last byte (tag)": (flipped(len(blob) - 1), 1, "integrity check"),
        "flipped wrapped key byte": (flipped(len(raw_header) + 20), 1, "integrity check"),
        "truncated body": (blob[: len(blob) - 100], 1, "integrity check"),
        "truncated after the header": (blob[: len(raw_header) + 30], 1, "truncated"),
        "truncated header": (blob[: len(raw_header) // 2], 2, "truncated or damaged"),
        "header byte changed": (
            blob.replace(created.encode(), changed_created.encode(), 1),
            1,
            "header is damaged",
        ),
        "header forged with its checksum": (forged + blob[len(raw_header) :], 1, "integrity check"),
        "other magic": (b"KVBACKUP7" + blob[9:], 2, "not supported"),
        "not a backup": (b"hello\n" + blob, 2, "not a keyvault backup"),
        "empty": (b"", 2, "not a keyvault backup"),
    }


def test_a_damaged_file_is_refused_and_nothing_is_written(
    cli, home, database: Database, populated, tmp_path
):
    path = populated["file"]
    blob = path.read_bytes()
    variants = damaged_variants(blob, live_keyring(home))
    fresh_store(cli, database)
    unchanged = dump_all(home.database_url)
    for name, (content, code, fragment) in variants.items():
        bad = tmp_path / f"bad-{len(content)}.kvbackup"
        bad.write_bytes(content)
        result = cli("restore", str(bad))
        assert result.exit_code == code, f"{name}: {describe(result)}"
        one_error_line(result, code, fragment)
        assert dump_all(home.database_url) == unchanged, name
        # --replace changes nothing either: the file is checked before anything is deleted.
        result = cli("restore", str(bad), "--replace", "--yes")
        assert result.exit_code == code, f"{name} with --replace: {describe(result)}"
        assert dump_all(home.database_url) == unchanged, name
    expect(cli("restore", str(path)))
    check_every_version(cli, populated["keys"])


def test_restore_into_a_store_with_data_needs_replace(cli, home, database: Database, populated):
    path, keys, before = populated["file"], populated["keys"], populated["before"]
    extra = new_key()
    import_key(cli, "ta3", "other", extra)
    expect(cli("token", "create", "after-backup", "--scope", "root:ta2"))
    changed = dump_all(home.database_url)

    one_error_line(cli("restore", str(path)), 1, "already holds keyvault data", "--replace")
    assert dump_all(home.database_url) == changed
    # The key imported since the backup is never deleted unless named (--discard-newer).
    one_error_line(cli("restore", str(path), "--replace", "--yes"), 1, "ta3 app:other v3")
    assert dump_all(home.database_url) == changed
    # --replace asks first; without a terminal it needs --yes.
    asked = cli("restore", str(path), "--replace", "--discard-newer")
    assert asked.exit_code == 2 and "--yes" in asked.stderr, describe(asked)
    assert dump_all(home.database_url) == changed

    result = expect(cli("restore", str(path), "--replace", "--discard-newer", "--yes"))
    assert "deleted:" in result.stdout
    after = dump_all(home.database_url)
    assert {**without_revision(after), "access_tokens": [], "audit_log": []} == {
        **without_revision(before),
        "access_tokens": [],
        "audit_log": [],
    }
    assert after["access_tokens"] == changed["access_tokens"]
    # The audit trail is kept: the backup's records and those written since (the import).
    assert all(r in after["audit_log"] for r in before["audit_log"])
    assert after["audit_log"] == changed["audit_log"]
    assert revision_value(after) > revision_value(changed)
    check_every_version(cli, keys)
    assert [r["version"] for r in history(cli, "ta3", "other")] == [1, 2]
    # Tokens are kept as the store has them (docs/backup.md): restore never drops or un-revokes one.
    tokens = json.loads(expect(cli("token", "list", "--json")).stdout)
    assert "after-backup" in {t["name"] for t in tokens}


def tampered_backups(blob: bytes, ring: crypto.Keyring) -> dict[str, tuple[bytes, str]]:
    """Backups, validly sealed, whose rows fail in the database or in the final check."""
    raw_header, body = open_body(blob, ring)

    def edited(change) -> bytes:
        copy = json.loads(json.dumps(body))
        change(copy["tables"])
        return seal_body(raw_header, copy, ring)

    def rows(tables, name):
        t = tables[name]
        return t["columns"], t["rows"]

    def two_current(tables):  # the partial unique index: one current version per secret
        cols, rs = rows(tables, "secret_versions")
        state, inv, sup = (
            cols.index("state"),
            cols.index("invalidated_at"),
            cols.index("superseded_by_id"),
        )
        secret = cols.index("secret_id")
        old = next(r for r in rs if r[secret] == rs[0][secret] and r[state] == "invalidated")
        old[state], old[inv], old[sup] = "current", None, None

    def bad_state(tables):  # a check constraint
        cols, rs = rows(tables, "rotations")
        rs[-1][cols.index("state")] = "exploded"

    def dangling_host(tables):  # a foreign key, in the last tables inserted
        cols, rs = rows(tables, "rotations")
        rs[-1][cols.index("host_id")] = 9999

    def swapped_ciphertexts(tables):  # inserted fine, fails the decrypt check before commit
        cols, rs = rows(tables, "secret_versions")
        c = cols.index("ciphertext")
        rs[0][c], rs[1][c] = rs[1][c], rs[0][c]

    def wrong_fingerprint(tables):
        cols, rs = rows(tables, "secret_versions")
        rs[-1][cols.index("fingerprint")] = "0" * 16

    def bad_webhook_secret(tables):
        cols, rs = rows(tables, "webhooks")
        rs[0][cols.index("url")] = "http://127.0.0.1:9/elsewhere"

    return {
        "two current versions": (edited(two_current), "do not fit the database"),
        "bad rotation state": (edited(bad_state), "do not fit the database"),
        "dangling host id": (edited(dangling_host), "do not fit the database"),
        "swapped ciphertexts": (edited(swapped_ciphertexts), "integrity check failed"),
        "wrong fingerprint": (edited(wrong_fingerprint), "fingerprint"),
        "moved webhook secret": (edited(bad_webhook_secret), "webhook 1 secret"),
    }


def test_a_failing_restore_with_replace_never_half_restores(
    cli, home, database: Database, populated, tmp_path
):
    path, keys = populated["file"], populated["keys"]
    variants = tampered_backups(path.read_bytes(), live_keyring(home))
    # The store moved on since the backup: its current data must survive every failed restore.
    extra = new_key()
    import_key(cli, "ta2", None, extra)
    keys = {**keys, ("ta2", None): [*keys[("ta2", None)], extra]}
    current = dump_all(home.database_url)
    for name, (content, fragment) in variants.items():
        bad = tmp_path / "tampered.kvbackup"
        bad.write_bytes(content)
        result = cli("restore", str(bad), "--replace", "--discard-newer", "--yes")
        one_error_line(result, 1, fragment)
        assert "Traceback" not in result.output
        assert dump_all(home.database_url) == current, f"{name}: the old data changed"
    check_every_version(cli, keys)
    # The store still works, and the untampered backup restores.
    expect(cli("restore", str(path), "--replace", "--discard-newer", "--yes"))
    check_every_version(cli, populated["keys"])


def test_a_backup_of_another_schema_revision_is_refused(
    cli, home, database: Database, populated, tmp_path
):
    ring = live_keyring(home)
    raw_header, body = open_body(populated["file"].read_bytes(), ring)
    fields = header_fields(raw_header)
    old_header = make_header({**fields, "schema_revision": "0001"})
    bad = tmp_path / "old.kvbackup"
    bad.write_bytes(seal_body(old_header, {**body, "schema_revision": "0001"}, ring))
    fresh_store(cli, database)
    unchanged = dump_all(home.database_url)
    one_error_line(cli("restore", str(bad)), 1, "schema revision 0001", SCHEMA_HEAD)
    assert dump_all(home.database_url) == unchanged


def test_restore_needs_a_database_at_schema_head(cli, home, database: Database, populated):
    wipe(database)  # no `keyvault init`: no schema at all
    one_error_line(cli("restore", str(populated["file"])), 1, "keyvault init")


def test_the_backup_covers_every_table_of_the_schema(home, populated, database: Database):
    engine = make_engine(home.database_url)
    try:
        from sqlalchemy import inspect

        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()
    _, body = open_body(populated["file"].read_bytes(), live_keyring(home))
    assert set(body["tables"]) == tables
    for name, table in body["tables"].items():
        rows = table["rows"]
        if name in CHAIN_TABLES:  # the chain's bookkeeping (tests/integration/test_audit_chain.py)
            continue
        if name == "audit_log":  # the backup's own intent record is in it, not in "before"
            action = table["columns"].index("action")
            rows = [r for r in rows if r[action] not in AUDITED_ATTEMPTS]
        assert len(rows) == len(populated["before"][name]), name
