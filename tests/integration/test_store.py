"""The encrypted, versioned store end to end through the CLI, on SQLite and PostgreSQL.

Every test runs on both databases (the ``db_url`` fixture). Keys are random, read
from stdin only, and never printed: comparisons go through ``same_key`` and byte
searches report which form was found, not the key.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import text

from keyvault import crypto
from keyvault.config import os_actor
from keyvault.db import current_revision, downgrade, head_revision, make_engine, upgrade
from keyvault.errors import IntegrityError, WrongMasterKey
from tests.support.cli import Cli, clear_keyvault_env, describe, expect, one_error_line
from tests.support.db import Database
from tests.support.leak_guard import new_key

CLUSTER = "ta2"
APPID = "demo"
TABLES = ("master_keys", "clusters", "secrets", "secret_versions", "events")


# --- helpers ------------------------------------------------------------------


def same_key(actual: str, expected: str, what: str) -> None:
    """Compare keys without ever putting one in the assertion message."""
    ok = actual == expected
    assert ok, f"{what}: the key differs from the one imported"


def scope_args(appid: str | None) -> list[str]:
    return ["--root"] if appid is None else ["--appid", appid]


def init_store(cli: Cli) -> None:
    expect(cli("init"))
    expect(cli("cluster", "add", CLUSTER, "--open-api-url", "http://ta2:8992"))


def import_key(
    cli: Cli, key: str, appid: str | None = APPID, *, cluster: str = CLUSTER, code: int = 0
):
    return expect(cli("import", "--cluster", cluster, *scope_args(appid), input=key + "\n"), code)


def reveal(cli: Cli, appid: str | None = APPID, version: int | None = None) -> str:
    args = ["secrets", "show", "--cluster", CLUSTER, *scope_args(appid), "--reveal"]
    if version is not None:
        args += ["--version", str(version)]
    result = expect(cli(*args))
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1, describe(result)
    return result.stdout[:-1]


def history(cli: Cli, appid: str | None = APPID) -> list[dict]:
    result = expect(cli("secrets", "history", "--cluster", CLUSTER, *scope_args(appid), "--json"))
    return json.loads(result.stdout)


def counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}


def key_forms(key: str) -> dict[str, bytes]:
    """The ways a key could show up in a file or a dump."""
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


@pytest.fixture
def store(cli):
    """An initialised home with cluster ta2."""
    init_store(cli)
    return cli


@pytest.fixture
def three_keys(store) -> list[str]:
    """Three keys imported, in order, for app demo."""
    keys = [new_key() for _ in range(3)]
    for key in keys:
        import_key(store, key)
    return keys


# --- init -----------------------------------------------------------------------


def test_init_creates_home_master_key_config_and_schema(
    blank_database: Database, tmp_path, monkeypatch
):
    home = tmp_path / "fresh" / "home"
    clear_keyvault_env(monkeypatch)
    monkeypatch.setenv("KEYVAULT_HOME", str(home))
    monkeypatch.setenv("KEYVAULT_DATABASE_URL", blank_database.url)
    cli = Cli()
    result = expect(cli("init"))
    assert "created master key" in result.stdout
    assert (home.stat().st_mode & 0o777) == 0o700
    master = home / "master.key"
    assert (master.stat().st_mode & 0o777) == 0o600
    assert (home / "keyvault.toml").exists()
    crypto.load_keyring(master)  # a valid keyring
    engine = make_engine(blank_database.url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_init_twice_never_overwrites_the_master_key(cli, home, engine):
    first = expect(cli("init"))
    assert "created master key" in first.stdout
    before = home.master_key_file.read_bytes()
    assert home.master_key_file.stat().st_mode & 0o777 == 0o600
    second = expect(cli("init"))
    assert "created master key" not in second.stdout
    assert home.master_key_file.read_bytes() == before
    # Even with the config file gone, the key stays.
    home.config_file.unlink()
    expect(cli("init"))
    assert home.master_key_file.read_bytes() == before
    assert counts(engine)["master_keys"] == 1


@pytest.mark.parametrize(
    "blank_database", ["sqlite"], indirect=True
)  # file modes concern SQLite only
def test_init_makes_the_sqlite_file_private(cli, database: Database):
    assert database.is_sqlite
    expect(cli("init"))
    assert database.sqlite_path.stat().st_mode & 0o777 == 0o600


def test_init_refuses_a_new_master_key_for_an_initialised_database(cli, home, engine):
    expect(cli("init"))
    moved = home.path / "elsewhere.key"
    home.master_key_file.rename(moved)
    before = counts(engine)
    one_error_line(cli("init"), 1, "already initialised")
    assert not home.master_key_file.exists()  # no new key was made
    assert counts(engine) == before


# --- import, history, show (the acceptance scenario) ----------------------------


def test_import_history_and_show(store, engine):
    keys = [new_key() for _ in range(3)]
    root_key = new_key()
    outputs = [import_key(store, key).stdout for key in keys]
    outputs.append(import_key(store, root_key, appid=None).stdout)
    assert "as version 1" in outputs[0] and "invalidated" not in outputs[0]
    assert (
        "as version 3" in outputs[2] and "version 2" in outputs[2] and "invalidated" in outputs[2]
    )

    rows = history(store)
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert [r["state"] for r in rows] == ["invalidated", "invalidated", "current"]
    assert [r["superseded_by"] for r in rows] == [2, 3, None]
    assert all(r["invalidated_at"] for r in rows[:2]) and rows[2]["invalidated_at"] is None
    assert [r["fingerprint"] for r in rows] == [crypto.fingerprint(k) for k in keys]
    assert {r["source"] for r in rows} == {"import"}
    assert {r["created_by"] for r in rows} == {os_actor(os.environ)}
    assert {r["cluster"] for r in rows} == {CLUSTER} and {r["scope"] for r in rows} == {"app:demo"}

    same_key(reveal(store), keys[2], "current app key")
    for number, key in enumerate(keys, start=1):
        same_key(reveal(store, version=number), key, f"app key version {number}")
    same_key(reveal(store, appid=None), root_key, "root key")
    root_rows = history(store, appid=None)
    assert [(r["version"], r["state"]) for r in root_rows] == [(1, "current")]

    listed = json.loads(expect(store("secrets", "list", "--json")).stdout)
    assert [(r["scope"], r["version"], r["state"]) for r in listed] == [
        ("app:demo", 3, "current"),
        ("root", 1, "current"),
    ]
    listed = json.loads(expect(store("secrets", "list", "--cluster", CLUSTER, "--json")).stdout)
    assert len(listed) == 2

    shown = json.loads(
        expect(store("secrets", "show", "--cluster", CLUSTER, "--appid", APPID, "--json")).stdout
    )
    assert shown["version"] == 3 and shown["state"] == "current"
    assert shown["fingerprint"] == crypto.fingerprint(keys[2])
    assert shown["key"].startswith("********")
    revealed = json.loads(
        expect(
            store(
                "secrets",
                "show",
                "--cluster",
                CLUSTER,
                "--appid",
                APPID,
                "--version",
                "1",
                "--reveal",
                "--json",
            )
        ).stdout
    )
    assert (
        revealed["version"] == 1
        and revealed["state"] == "invalidated"
        and revealed["superseded_by"] == 2
    )
    same_key(revealed["key"], keys[0], "JSON reveal of version 1")

    clusters = json.loads(expect(store("cluster", "list", "--json")).stdout)
    assert [(c["name"], c["open_api_url"]) for c in clusters] == [(CLUSTER, "http://ta2:8992")]

    # Nothing but --reveal prints a key.
    everything = "".join(
        store(*args).output
        for args in (
            ["secrets", "list"],
            ["secrets", "list", "--json"],
            ["secrets", "history", "--cluster", CLUSTER, "--appid", APPID],
            ["secrets", "history", "--cluster", CLUSTER, "--appid", APPID, "--json"],
            ["secrets", "show", "--cluster", CLUSTER, "--appid", APPID],
            ["secrets", "show", "--cluster", CLUSTER, "--appid", APPID, "--json"],
        )
    ) + "".join(outputs)
    assert not find_keys(
        everything.encode(), {f"key {i}": k for i, k in enumerate([*keys, root_key])}
    )

    # The outbox: one event per version, in the same transactions.
    with engine.connect() as conn:
        events = conn.execute(text("SELECT type, scope, payload FROM events ORDER BY id")).all()
    assert [(e.type, e.scope) for e in events] == [
        ("secret.created", "app:demo"),
        ("secret.rotated", "app:demo"),
        ("secret.rotated", "app:demo"),
        ("secret.created", "root"),
    ]
    payload = json.loads(events[2].payload)
    assert (payload["old_version"], payload["new_version"]) == (2, 3)
    assert payload["old_fingerprint"] == crypto.fingerprint(keys[1])
    assert payload["new_fingerprint"] == crypto.fingerprint(keys[2])
    assert payload["source"] == "import" and payload["actor"] == os_actor(os.environ)
    assert not find_keys("".join(e.payload for e in events).encode(), {"any": keys[2]})


def test_import_accepts_crlf_and_no_newline(store):
    first, second = new_key(), new_key()
    expect(store("import", "--cluster", CLUSTER, "--appid", APPID, input=first))
    expect(store("import", "--cluster", CLUSTER, "--appid", APPID, input=second + "\r\n"))
    same_key(reveal(store, version=1), first, "key without newline")
    same_key(reveal(store, version=2), second, "key with CRLF")


def test_any_format_stores_an_odd_key(store):
    odd = "odd-key." + new_key(20)
    one_error_line(store("import", "--cluster", CLUSTER, "--root", input=odd), 2, "key pattern")
    expect(store("import", "--cluster", CLUSTER, "--root", "--any-format", input=odd))
    same_key(reveal(store, appid=None), odd, "odd key")


# --- nothing in clear at rest ----------------------------------------------------


def pg_dump_binary(engine) -> str:
    """A pg_dump whose major version matches the server's."""
    with engine.connect() as conn:
        server_major = int(conn.execute(text("SHOW server_version_num")).scalar_one()) // 10000
    candidates = [
        shutil.which("pg_dump") or "/usr/bin/pg_dump",
        *sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_dump")),
    ]
    for candidate in candidates:
        try:
            out = subprocess.run(
                [candidate, "--version"], capture_output=True, text=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        match = re.search(r"(\d+)\.\d+", out)
        if match and int(match.group(1)) == server_major:
            return candidate
    pytest.fail(f"no pg_dump for PostgreSQL {server_major} among {candidates}")


def pg_dump(engine, database: Database) -> bytes:
    url = engine.url
    args = [pg_dump_binary(engine), "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432)]
    args += ["-U", url.username or "postgres", "--no-password", database.name]
    env = {"PATH": "/usr/bin:/bin"}
    if url.password:
        env["PGPASSWORD"] = url.password
    result = subprocess.run(args, capture_output=True, env=env)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def test_no_key_is_stored_in_clear(store, engine, database: Database, home):
    keys = {f"app key {i}": new_key() for i in range(1, 4)}
    keys["root key"] = new_key()
    for name, key in keys.items():
        import_key(store, key, appid=None if name == "root key" else APPID)
    expect(store("master-key", "rotate", "--yes"))

    if database.is_sqlite:
        # While a connection is open the WAL holds the recent pages: search it too.
        with engine.connect() as conn:
            conn.execute(text("SELECT count(*) FROM secret_versions")).all()
            files = sorted(glob.glob(f"{database.sqlite_path}*"))
            assert str(database.sqlite_path) in files
            blobs = {f: Path(f).read_bytes() for f in files}
        assert any(f.endswith("-wal") for f in blobs), files
    else:
        dump = pg_dump(engine, database)
        assert b"secret_versions" in dump and b"COPY public.secret_versions" in dump
        blobs = {"pg_dump": dump}
    for f in home.path.iterdir():
        if f.is_file():
            blobs[str(f)] = f.read_bytes()
    for where, blob in blobs.items():
        found = find_keys(blob, keys)
        assert not found, f"{where} holds {found}"
    # The fingerprints are there: that is expected and harmless.
    everything = b"".join(blobs.values())
    assert crypto.fingerprint(keys["root key"]).encode() in everything


# --- tampering --------------------------------------------------------------------


def version_rows(engine, scope: str = "app:demo"):
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT v.id, v.number, v.ciphertext, v.wrapped_key FROM secret_versions v"
                " JOIN secrets s ON s.id = v.secret_id WHERE s.scope = :scope ORDER BY v.number"
            ),
            {"scope": scope},
        ).all()


def set_blobs(engine, row_id: int, **values) -> None:
    assignments = ", ".join(f"{name} = :{name}" for name in values)
    with engine.begin() as conn:
        conn.execute(
            text(f"UPDATE secret_versions SET {assignments} WHERE id = :id"),
            {"id": row_id, **values},
        )


@pytest.mark.parametrize(
    "columns", [("ciphertext", "wrapped_key"), ("ciphertext",), ("wrapped_key",)]
)
def test_swapped_versions_fail_with_an_integrity_error(store, three_keys, engine, columns):
    one, two, _three = version_rows(engine)
    set_blobs(engine, one.id, **{c: getattr(two, c) for c in columns})
    set_blobs(engine, two.id, **{c: getattr(one, c) for c in columns})
    for number in (1, 2):
        result = store(
            "secrets",
            "show",
            "--cluster",
            CLUSTER,
            "--appid",
            APPID,
            "--version",
            str(number),
            "--reveal",
        )
        one_error_line(
            result, 1, "integrity check failed", f"app:demo version {number} of cluster {CLUSTER}"
        )
        assert result.stdout == ""
        # without --reveal the version is still authenticated, and refused
        result = store(
            "secrets", "show", "--cluster", CLUSTER, "--appid", APPID, "--version", str(number)
        )
        one_error_line(result, 1, f"version {number}")
    same_key(reveal(store, version=3), three_keys[2], "untouched version 3")


def test_ciphertext_moved_to_another_scope_fails(store, three_keys, engine):
    import_key(store, new_key(), appid=None)
    (root,) = version_rows(engine, "root")
    app = version_rows(engine)[0]  # version 1 of the app, same number as the root version
    set_blobs(engine, root.id, ciphertext=app.ciphertext, wrapped_key=app.wrapped_key)
    result = store("secrets", "show", "--cluster", CLUSTER, "--root", "--reveal")
    one_error_line(result, 1, "integrity check failed", "root version 1")


def test_flipped_bit_in_ciphertext_fails(store, three_keys, engine):
    row = version_rows(engine)[2]
    blob = bytearray(row.ciphertext)
    blob[20] ^= 0x40
    set_blobs(engine, row.id, ciphertext=bytes(blob))
    result = store("secrets", "show", "--cluster", CLUSTER, "--appid", APPID, "--reveal")
    one_error_line(result, 1, "app:demo version 3", "altered")


# --- master key rotation ---------------------------------------------------------


def test_master_key_rotate_keeps_every_version_and_retires_the_old_key(store, home, engine):
    app_keys = [new_key() for _ in range(3)]
    for key in app_keys:
        import_key(store, key)
    root_key = new_key()
    import_key(store, root_key, appid=None)
    old_file = home.path / "previous.key"
    shutil.copy2(home.master_key_file, old_file)
    old_ring = crypto.load_keyring(old_file)

    result = expect(store("master-key", "rotate", "--yes"))
    assert "4 data keys re-wrapped" in result.stdout
    new_ring = crypto.load_keyring(home.master_key_file)
    assert set(new_ring.keys) == {new_ring.active} and new_ring.active != old_ring.active
    assert home.master_key_file.stat().st_mode & 0o777 == 0o600
    assert (
        sorted(p.name for p in home.path.iterdir() if p.name.startswith(".")) == []
    )  # no temp files

    for number, key in enumerate(app_keys, start=1):
        same_key(reveal(store, version=number), key, f"app version {number} after rotation")
    same_key(reveal(store, appid=None), root_key, "root key after rotation")

    with engine.connect() as conn:
        ids = (
            conn.execute(text("SELECT DISTINCT master_key_id FROM secret_versions")).scalars().all()
        )
        retired = dict(
            conn.execute(text("SELECT id, retired_at IS NOT NULL FROM master_keys")).all()
        )
    assert ids == [new_ring.active]
    assert {k: bool(v) for k, v in retired.items()} == {
        old_ring.active: True,
        new_ring.active: False,
    }

    # The previous keyring opens nothing: through the CLI ...
    before = counts(engine)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEYVAULT_MASTER_KEY_FILE", str(old_file))
        for version in (1, 2, 3):
            result = store(
                "secrets",
                "show",
                "--cluster",
                CLUSTER,
                "--appid",
                APPID,
                "--version",
                str(version),
                "--reveal",
            )
            one_error_line(result, 1, "no live master key")
            assert result.stdout == ""
        one_error_line(
            store("import", "--cluster", CLUSTER, "--root", input=new_key()), 1, "master key"
        )
        one_error_line(store("master-key", "rotate", "--yes"), 1, "master key")
    assert counts(engine) == before
    # ... and directly, row by row.
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.name, s.scope, v.number, v.ciphertext, v.wrapped_key, v.master_key_id"
                " FROM secret_versions v JOIN secrets s ON s.id = v.secret_id JOIN clusters c ON c.id = s.cluster_id"
            )
        ).all()
    assert len(rows) == 4
    for row in rows:
        sealed = crypto.Sealed(row.ciphertext, row.wrapped_key, row.master_key_id)
        aad = crypto.version_aad(row.name, row.scope, row.number)
        with pytest.raises((WrongMasterKey, IntegrityError)):
            crypto.unseal(old_ring, sealed, aad, what="row")
        # even claiming the row is still under the old key id
        with pytest.raises((WrongMasterKey, IntegrityError)):
            crypto.unseal(
                old_ring,
                crypto.Sealed(row.ciphertext, row.wrapped_key, old_ring.active),
                aad,
                what="row",
            )
        same = crypto.unseal(new_ring, sealed, aad, what="row").decode()
        assert crypto.fingerprint(same) in {crypto.fingerprint(k) for k in [*app_keys, root_key]}

    # A second rotation works as well, and new imports use the new key.
    expect(store("master-key", "rotate", "--yes"))
    newest = new_key()
    import_key(store, newest)
    same_key(reveal(store), newest, "key imported after two rotations")
    same_key(reveal(store, version=1), app_keys[0], "version 1 after two rotations")


def test_keyring_left_by_a_crash_after_the_commit_still_opens(store, home):
    """Step 3 of the rotation never ran: the file holds old and new key, 'active' the old one."""
    key = new_key()
    import_key(store, key)
    old_ring = crypto.load_keyring(home.master_key_file)
    expect(store("master-key", "rotate", "--yes"))
    new_ring = crypto.load_keyring(home.master_key_file)
    both = crypto.Keyring(active=old_ring.active, keys={**old_ring.keys, **new_ring.keys})
    crypto.save_keyring(home.master_key_file, both)
    same_key(reveal(store), key, "key with the crash-time keyring")
    second = new_key()
    import_key(store, second)
    same_key(reveal(store), second, "key stored with the crash-time keyring")


# --- the database enforces one current version -----------------------------------


def test_database_refuses_a_second_current_version(store, three_keys, engine):
    from sqlalchemy.exc import IntegrityError as SAIntegrityError

    with engine.connect() as conn:
        current = (
            conn.execute(text("SELECT * FROM secret_versions WHERE state = 'current'"))
            .mappings()
            .one()
        )
    columns = [c for c in current if c != "id"]
    values = {**{c: current[c] for c in columns}, "number": 99}
    insert = text(
        f"INSERT INTO secret_versions ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)})"
    )
    with pytest.raises(SAIntegrityError, match="(?i)unique|duplicate"), engine.begin() as conn:  # noqa: RUF043
        conn.execute(insert, values)
    # Reviving an invalidated version is refused the same way.
    with pytest.raises(SAIntegrityError), engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE secret_versions SET state = 'current', invalidated_at = NULL WHERE number = 1"
            )
        )
    # So is a current version with an invalidation time, or an unknown state.
    for state, invalidated in (("current", current["created_at"]), ("retired", None)):
        with pytest.raises(SAIntegrityError), engine.begin() as conn:
            conn.execute(
                insert, {**values, "number": 98, "state": state, "invalidated_at": invalidated}
            )
    # A duplicate version number too.
    with pytest.raises(SAIntegrityError), engine.begin() as conn:
        conn.execute(
            insert,
            {
                **values,
                "number": 1,
                "state": "invalidated",
                "invalidated_at": current["created_at"],
            },
        )
    with engine.connect() as conn:
        states = conn.execute(
            text("SELECT state, count(*) FROM secret_versions GROUP BY state ORDER BY state")
        ).all()
    assert [tuple(s) for s in states] == [("current", 1), ("invalidated", 2)]


# --- migrations ------------------------------------------------------------------


def table_names(engine) -> set[str]:
    from sqlalchemy import inspect

    return set(inspect(engine).get_table_names())


def test_upgrade_downgrade_upgrade(engine):
    head = head_revision()
    assert current_revision(engine) == head
    assert {"master_keys", "clusters", "secrets", "secret_versions", "events"} <= table_names(
        engine
    )
    downgrade(engine, "base")
    assert current_revision(engine) is None
    assert table_names(engine) <= {"alembic_version"}
    upgrade(engine)
    assert current_revision(engine) == head
    assert {
        "master_keys",
        "clusters",
        "secrets",
        "secret_versions",
        "events",
        "hosts",
        "rotations",
    } <= table_names(engine)
    downgrade(engine, "0001")
    assert current_revision(engine) == "0001"
    assert "hosts" not in table_names(engine) and "secret_versions" in table_names(engine)
    upgrade(engine, "head")
    assert current_revision(engine) == head


def test_alembic_by_hand_on_a_blank_database(blank_database: Database):
    """env.py's other path: alembic opening its own connection from sqlalchemy.url."""
    from alembic import command

    from keyvault.db import alembic_config

    cfg = alembic_config(blank_database.url)
    command.upgrade(cfg, "head")
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "head")
    engine = make_engine(blank_database.url)
    try:
        assert current_revision(engine) == head_revision()
        assert {"secret_versions", "rotations"} <= table_names(engine)
    finally:
        engine.dispose()


def test_downgrade_and_upgrade_through_the_cli_and_db_check(cli, engine):
    expect(cli("init"))
    result = expect(cli("db", "check"))
    assert "models and migrations agree" in result.stdout
    info = json.loads(expect(cli("db", "current", "--json")).stdout)
    assert info == {"current": head_revision(), "head": head_revision()}
    downgrade(engine, "0001")
    one_error_line(cli("db", "check"), 1, "keyvault db upgrade")
    one_error_line(cli("secrets", "list"), 1, "keyvault db upgrade")
    result = expect(cli("db", "upgrade"))
    assert head_revision() in result.stdout
    expect(cli("db", "check"))


def test_commands_on_an_empty_database_name_keyvault_init(
    blank_database: Database, tmp_path, monkeypatch
):
    clear_keyvault_env(monkeypatch)
    monkeypatch.setenv("KEYVAULT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KEYVAULT_DATABASE_URL", blank_database.url)
    one_error_line(Cli()("secrets", "list"), 1, "keyvault init")


# --- wrong, missing or unsafe master key --------------------------------------------


def other_init(tmp_path, monkeypatch) -> Path:
    """Run `keyvault init` for another store; return its master key file."""
    other = tmp_path / "other-home"
    with monkeypatch.context() as mp:
        mp.setenv("KEYVAULT_HOME", str(other))
        mp.setenv("KEYVAULT_DATABASE_URL", f"sqlite:///{other / 'other.db'}")
        mp.setenv("KEYVAULT_MASTER_KEY_FILE", str(other / "master.key"))
        expect(Cli()("init"))
    return other / "master.key"


def test_wrong_master_key_file_is_refused_and_nothing_is_written(
    store, three_keys, home, engine, tmp_path, monkeypatch
):
    foreign = other_init(tmp_path, monkeypatch)
    foreign_bytes = foreign.read_bytes()
    before = counts(engine)
    monkeypatch.setenv("KEYVAULT_MASTER_KEY_FILE", str(foreign))
    one_error_line(
        store("import", "--cluster", CLUSTER, "--appid", APPID, input=new_key()),
        1,
        "no live master key",
    )
    one_error_line(
        store("import", "--cluster", CLUSTER, "--appid", "fresh", input=new_key()), 1, "master key"
    )
    one_error_line(
        store("secrets", "show", "--cluster", CLUSTER, "--appid", APPID, "--reveal"),
        1,
        "master key",
    )
    one_error_line(store("master-key", "rotate", "--yes"), 1, "master key")
    one_error_line(store("init"), 1, "was initialised with master key")
    assert counts(engine) == before
    assert foreign.read_bytes() == foreign_bytes  # not grown by the failed rotation


def test_impostor_key_under_the_right_id_is_refused(store, three_keys, home, engine):
    ring = crypto.load_keyring(home.master_key_file)
    impostor = crypto.Keyring(active=ring.active, keys={ring.active: bytes(32)})
    crypto.save_keyring(home.master_key_file, impostor)
    before = counts(engine)
    one_error_line(
        store("import", "--cluster", CLUSTER, "--appid", APPID, input=new_key()),
        1,
        "does not open this store",
    )
    one_error_line(store("init"), 1, "does not open this store")
    assert counts(engine) == before


def test_missing_master_key_names_keyvault_init(store, three_keys, home, engine):
    home.master_key_file.unlink()
    before = counts(engine)
    one_error_line(
        store("import", "--cluster", CLUSTER, "--appid", APPID, input=new_key()),
        1,
        "does not exist",
        "keyvault init",
    )
    one_error_line(
        store("secrets", "show", "--cluster", CLUSTER, "--appid", APPID), 1, "keyvault init"
    )
    assert counts(engine) == before


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o400])
def test_master_key_with_loose_mode_is_refused(store, three_keys, home, engine, mode):
    home.master_key_file.chmod(mode)
    before = counts(engine)
    line = one_error_line(
        store("import", "--cluster", CLUSTER, "--appid", APPID, input=new_key()),
        1,
        f"chmod 600 {home.master_key_file}",
    )
    assert f"{mode:04o}" in line
    one_error_line(
        store("secrets", "show", "--cluster", CLUSTER, "--appid", APPID, "--reveal"), 1, "chmod 600"
    )
    one_error_line(store("init"), 1, "chmod 600")
    assert counts(engine) == before
    assert (
        home.master_key_file.stat().st_mode & 0o777 == mode
    )  # keyvault does not "fix" it silently


# --- refused input ------------------------------------------------------------------

BAD_INPUTS = {
    "empty": "",
    "newline only": "\n",
    "two lines": "{k}\n{k2}\n",
    "two keys on one line": "{k} {k2}\n",
    "leading space": " {k}\n",
    "trailing space": "{k} \n",
    "tab": "{k}\t\n",
    "blank line after": "{k}\n\n",
    "nul byte": "{k}\x00\n",
    "63 characters": "{k63}\n",
    "65 characters": "{k}x\n",
    "wrong alphabet": "{k63}-\n",
    "too long": "{long}\n",
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_stdin_is_refused_with_exit_2_and_nothing_written(store, engine, name):
    key, key2 = new_key(), new_key()
    data = BAD_INPUTS[name].format(k=key, k2=key2, k63=key[:63], long=new_key(5000))
    before = counts(engine)
    result = store("import", "--cluster", CLUSTER, "--appid", APPID, input=data)
    one_error_line(result, 2)
    assert not find_keys(result.output.encode(), {"input": key, "second": key2, "prefix": key[:63]})
    assert counts(engine) == before


def test_reimporting_the_current_key_is_a_conflict(store, engine):
    key = new_key()
    import_key(store, key)
    before = counts(engine)
    result = store("import", "--cluster", CLUSTER, "--appid", APPID, input=key + "\n")
    one_error_line(result, 1, "already version 1")
    assert not find_keys(result.output.encode(), {"key": key})
    assert counts(engine) == before


def test_unknown_cluster_is_refused_with_a_hint(store, engine):
    before = counts(engine)
    one_error_line(
        store("import", "--cluster", "nope", "--appid", APPID, input=new_key()),
        1,
        "no cluster named 'nope'",
        "keyvault cluster",
    )
    one_error_line(
        store("secrets", "show", "--cluster", "nope", "--root"), 1, "keyvault cluster list"
    )
    one_error_line(store("secrets", "list", "--cluster", "nope"), 1, "no cluster")
    assert counts(engine) == before


def test_unknown_scope_and_version_are_not_found(store, three_keys):
    one_error_line(
        store("secrets", "show", "--cluster", CLUSTER, "--root"), 1, "no key stored for root"
    )
    one_error_line(
        store("secrets", "history", "--cluster", CLUSTER, "--appid", "other"), 1, "no key stored"
    )
    one_error_line(
        store("secrets", "show", "--cluster", CLUSTER, "--appid", APPID, "--version", "7"),
        1,
        "no version 7",
    )


@pytest.mark.parametrize(
    "scope",
    [
        ["--root", "--appid", APPID],
        [],
        ["--appid", "x; rm -rf ~"],
        ["--appid", "$(id)"],
        ["--appid", "-rf"],
    ],
    ids=["both", "neither", "semicolon", "subshell", "dash"],
)
def test_bad_scope_options_are_usage_errors(store, engine, scope):
    before = counts(engine)
    result = store("import", "--cluster", CLUSTER, *scope, input=new_key())
    assert result.exit_code == 2, describe(result)
    assert "Traceback" not in result.output
    assert counts(engine) == before


def test_duplicate_cluster_is_a_conflict(store):
    one_error_line(
        store("cluster", "add", CLUSTER, "--open-api-url", "http://other:8992"), 1, "already exists"
    )
    one_error_line(
        store("cluster", "add", "x y", "--open-api-url", "http://other:8992"),
        2,
        "invalid cluster name",
    )
    one_error_line(
        store("cluster", "add", "ta3", "--open-api-url", "ftp://ta3"), 2, "invalid Open API URL"
    )
