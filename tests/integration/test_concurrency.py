"""Concurrent writers on SQLite and PostgreSQL: real processes, real databases.

The invariant under test: whatever the interleaving, a secret has versions
1..n without gaps, exactly one of them current, each invalidated one superseded
by its successor, and every process either succeeded or failed cleanly.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from sqlalchemy import text

from keyvault import crypto
from tests.support.cli import KEYVAULT, Cli, describe, expect
from tests.support.db import Database
from tests.support.leak_guard import new_key
from tests.support.timeouts import TIMEOUT

CLUSTER = "ta2"
WORKERS = 4
ROUNDS = 5
CLEAN_FAILURES = ("database", "conflict", "already", "locked", "retry")


@pytest.fixture
def store(cli: Cli) -> Cli:
    expect(cli("init"))
    expect(cli("cluster", "add", CLUSTER, "--open-api-url", "http://ta2:8992"))
    return cli


def import_together(tmp_path, round_no: int, scope_args: list[str], keys: list[str]) -> list[dict]:
    """Start one `keyvault import` process per key, then release them all at once.

    Each process blocks reading stdin before it touches the database; the keys are
    written only after every process has been started.
    """
    procs = []
    try:
        for i, _ in enumerate(keys):
            out = open(tmp_path / f"r{round_no}-p{i}.out", "w+b")  # noqa: SIM115
            err = open(tmp_path / f"r{round_no}-p{i}.err", "w+b")  # noqa: SIM115
            proc = subprocess.Popen(
                [*KEYVAULT, "import", "--cluster", CLUSTER, *scope_args],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
            )
            procs.append((proc, out, err))
        for (proc, _, _), key in zip(procs, keys, strict=False):
            proc.stdin.write((key + "\n").encode())
        for proc, _, _ in procs:
            proc.stdin.close()
        results = []
        for (proc, out, err), key in zip(procs, keys, strict=False):
            code = proc.wait(timeout=TIMEOUT)
            out.seek(0)
            err.seek(0)
            results.append(
                {
                    "code": code,
                    "stdout": out.read().decode(),
                    "stderr": err.read().decode(),
                    "key": key,
                }
            )
        return results
    finally:
        for proc, out, err in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
            err.close()


def check_clean(result: dict) -> bool:
    """True if the import succeeded; assert that a failure was a clean one-line error."""
    assert "Traceback" not in result["stderr"] and "Traceback" not in result["stdout"]
    if result["code"] == 0:
        assert result["stdout"].startswith("stored "), result["stderr"]
        return True
    assert result["code"] == 1, f"exit {result['code']}: {result['stderr']!r}"
    lines = result["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result["stderr"]
    assert any(word in lines[0].lower() for word in CLEAN_FAILURES), lines[0]
    return False


def check_versions(engine, scope: str, stored_keys: list[str]) -> list:
    """Versions 1..n without gaps, one current, a chain of supersession, one event each."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT v.id, v.number, v.state, v.invalidated_at, v.superseded_by_id, v.fingerprint"
                " FROM secret_versions v JOIN secrets s ON s.id = v.secret_id"
                " WHERE s.scope = :scope ORDER BY v.number"
            ),
            {"scope": scope},
        ).all()
        secrets_rows = conn.execute(
            text("SELECT count(*) FROM secrets WHERE scope = :s"), {"s": scope}
        ).scalar_one()
        events = conn.execute(
            text("SELECT type, payload FROM events WHERE scope = :s ORDER BY id"), {"s": scope}
        ).all()
    assert secrets_rows == 1
    assert [r.number for r in rows] == list(range(1, len(stored_keys) + 1))
    assert [r.state for r in rows].count("current") == 1
    assert rows[-1].state == "current" and rows[-1].superseded_by_id is None
    for older, newer in zip(rows, rows[1:], strict=False):  # noqa: RUF007
        assert older.state == "invalidated" and older.invalidated_at is not None
        assert older.superseded_by_id == newer.id
    assert sorted(r.fingerprint for r in rows) == sorted(crypto.fingerprint(k) for k in stored_keys)
    assert len(events) == len(rows)
    assert [e.type for e in events] == ["secret.created"] + ["secret.rotated"] * (len(rows) - 1)
    assert [json.loads(e.payload)["new_version"] for e in events] == list(range(1, len(rows) + 1))
    return rows


def reveal_matches(cli: Cli, appid: str, keys: list[str]) -> None:
    result = expect(cli("secrets", "show", "--cluster", CLUSTER, "--appid", appid, "--reveal"))
    ok = result.stdout[:-1] in keys
    assert ok, "the current key is none of the keys of the last round"


@pytest.mark.slow  # rounds of 4 processes started together: 10-15 s
def test_concurrent_imports_into_one_scope(store, engine, tmp_path):
    stored: list[str] = []
    for round_no in range(ROUNDS):
        keys = [new_key() for _ in range(WORKERS)]
        results = import_together(tmp_path, round_no, ["--appid", "demo"], keys)
        winners = [r["key"] for r in results if check_clean(r)]
        assert winners, "no import of the round succeeded: " + "; ".join(
            r["stderr"] for r in results
        )
        stored += winners
        check_versions(engine, "app:demo", stored)
        reveal_matches(store, "demo", winners)
    numbers = sorted(
        int(line.split(" as version ")[1].split(",")[0])
        for line in (f.read_text() for f in tmp_path.glob("r*-p*.out"))
        if line.startswith("stored ")
    )
    assert numbers == list(range(1, len(stored) + 1))


def test_concurrent_first_imports_of_new_scopes(store, engine, tmp_path):
    for round_no in range(2):
        appid = f"fresh{round_no}"
        keys = [new_key() for _ in range(WORKERS)]
        results = import_together(tmp_path, round_no, ["--appid", appid], keys)
        winners = [r["key"] for r in results if check_clean(r)]
        assert winners
        check_versions(engine, f"app:{appid}", winners)
        reveal_matches(store, appid, winners)


# SQLite serialises every writer with BEGIN IMMEDIATE; row locks are PostgreSQL's matter.
@pytest.mark.postgres
@pytest.mark.parametrize("blank_database", ["postgres"], indirect=True)
def test_import_racing_a_master_key_rotation_stays_readable(store, database: Database, home):
    """An import that sealed with the old master key and commits while a rotation runs
    must not leave a version under the retired key: the rotation has to wait for it
    (here: give up on a short lock_timeout), or the import has to fail."""
    assert database.is_postgres
    from sqlalchemy.engine import make_url

    from keyvault.config import load_settings
    from keyvault.db import make_engine, session_factory
    from keyvault.errors import DatabaseError
    from keyvault.scope import app_scope
    from keyvault.services import masterkeys, secrets
    from keyvault.services import store as store_service

    existing = new_key()
    expect(store("import", "--cluster", CLUSTER, "--appid", "old", input=existing))
    racing = new_key()
    settings = load_settings()
    engine = make_engine(database.url)
    impatient = make_engine(
        make_url(database.url)
        .update_query_dict({"options": "-c lock_timeout=500"})
        .render_as_string(hide_password=False)
    )
    try:
        session = session_factory(engine)()
        try:
            keyring = store_service.open_keyring(session, settings=settings)
            secrets.import_key(
                session,
                keyring=keyring,
                cluster_name=CLUSTER,
                scope=app_scope("racing"),
                key=racing,
                actor="t",
            )
            session.flush()  # sealed under the current master key, not committed yet
            try:
                masterkeys.rotate_master_key(session_factory(impatient), settings=settings)
                rotated_meanwhile = True
            except DatabaseError:
                rotated_meanwhile = False
            session.commit()
        finally:
            session.close()
    finally:
        impatient.dispose()
        engine.dispose()
    if not rotated_meanwhile:
        expect(store("master-key", "rotate", "--yes"))
    for appid, key in (("old", existing), ("racing", racing)):
        result = store("secrets", "show", "--cluster", CLUSTER, "--appid", appid, "--reveal")
        assert result.exit_code == 0, describe(result)
        ok = result.stdout == key + "\n"
        assert ok, f"the key of {appid} changed"
