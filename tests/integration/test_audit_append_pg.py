"""The HTTP audit writer's one-round-trip append on PostgreSQL (keyvault/services/
audit_chain_pg.py): a batch is written after the head this writer left only if the head is
still there; when another writer (a second `serve` process, the CLI) moved it, nothing is
written and the batch goes the locked way. Two writers in turn, the CLI in between, a row
written outside the chain: one chain, verified, every record once."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from keyvault.db import make_engine
from tests.support.cli import audit_report as verify
from tests.support.cli import expect
from tests.support.db import run_sql as sql

PG_ONLY = pytest.mark.parametrize("blank_database", ["postgres"], indirect=True)


def _writer(engine):
    from keyvault.config import load_settings
    from keyvault.http.audit_writer import AuditWriter
    from keyvault.services.audit_chain import chain_for

    writer = AuditWriter(engine, chain=chain_for(load_settings()))
    writer._sqlite = False
    return writer, writer._connect()  # the writer's own connection (autocommit)


def _close(engine, *writers) -> None:
    """Close each (writer, its connection) pair, then the engine."""
    for writer, conn in writers:
        if conn is not None:
            conn.invalidate()
        writer._thread.shutdown()
    engine.dispose()


def _record(n: int, cluster: str = "c") -> dict:
    return {"at": datetime.now(UTC), "action": "read", "outcome": "ok", "cluster": cluster,
            "token_name": f"t{n}", "version": n}  # fmt: skip


@PG_ONLY
def test_two_writers_in_turn_and_the_cli_keep_one_chain(cli, home, database):
    expect(cli("init"))
    expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))  # a chain key
    engine = make_engine(home.database_url)
    (a, conn_a), (b, conn_b) = _writer(engine), _writer(engine)
    try:
        before = verify(cli)["verified"]
        assert a._write(conn_a, [_record(1)], None) is None  # locked: the first batch
        assert a._write(conn_a, [_record(2)], None) is None  # alone: one statement
        assert a._write(conn_a, [_record(3), _record(4), _record(5)], None) is None
        assert (a._appender.locked, a._appender.fast) == (1, 2)
        assert b._write(conn_b, [_record(6)], None) is None  # b's first: locked
        assert a._write(conn_a, [_record(7)], None) is None  # b moved the head: a misses
        assert (a._appender.locked, a._appender.fast) == (2, 2)
        expect(cli("cluster", "set", "c", "--login-name", "b"))  # the CLI moves it too
        assert b._write(conn_b, [_record(8), _record(9)], None) is None
        assert a._write(conn_a, [_record(10)], None) is None  # just missed: locked, no try
        assert (a._appender.locked, a._appender.fast) == (3, 2)
        assert a._write(conn_a, [_record(11)], None) is None  # its own end again: fast
        assert a._write(conn_a, [_record(12)], None) is None
        assert (a._appender.locked, a._appender.fast) == (3, 4)
    finally:
        _close(engine, (a, conn_a), (b, conn_b))
    report = verify(cli)
    assert report["ok"], report
    rows = sql(home.database_url, "SELECT version FROM audit_log WHERE action = 'read'")
    assert sorted(r[0] for r in rows) == list(range(1, 13))  # each record once
    assert report["verified"] >= before + 12 + 1, report  # and the CLI's own


@PG_ONLY
def test_a_row_written_above_the_head_sends_the_batch_the_locked_way(cli, home, database):
    expect(cli("init"))
    expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))
    engine = make_engine(home.database_url)
    writer, conn = _writer(engine)
    try:
        assert writer._write(conn, [_record(1)], None) is None
        (last,) = sql(home.database_url, "SELECT last_id FROM audit_chain")
        sql(  # outside the chain, at the id the writer would take next
            home.database_url,
            "INSERT INTO audit_log (id, at, action, outcome) VALUES (:i, :at, 'x', 'ok')",
            i=last[0] + 1,
            at=datetime(2026, 1, 1),
        )
        assert writer._write(conn, [_record(2, cluster='it\'s "quoted" \\ ü')], None) is None
        assert (writer._appender.locked, writer._appender.fast) == (2, 0)
    finally:
        _close(engine, (writer, conn))
    (row,) = sql(home.database_url, "SELECT id, cluster FROM audit_log WHERE version = 2")
    assert row[0] == last[0] + 2 and row[1] == 'it\'s "quoted" \\ ü'
    report = verify(cli)  # the row outside the chain is what verify reports, nothing else
    assert not report["ok"] and report["problem_id"] == last[0] + 1, report


@PG_ONLY
def test_a_one_statement_append_waiting_on_a_locked_append_does_not_fork(cli, home, database):
    """READ COMMITTED: the writer's statement waits for the head's lock held by another
    append (the CLI's, a second server's), then re-checks its condition on the moved head:
    nothing written, the batch goes the locked way after that append; one chain."""
    import threading

    from keyvault.config import load_settings
    from keyvault.services.audit_chain import append_records, chain_for

    expect(cli("init"))
    expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))
    engine = make_engine(home.database_url)
    writer, conn = _writer(engine)
    other = engine.raw_connection()  # another process's append, holding the head's lock
    try:
        assert writer._write(conn, [_record(1)], None) is None  # locked: the first batch
        pid = conn.driver_connection.info.backend_pid
        append_records(other, sqlite=False, keys=chain_for(load_settings()).keys,
                       records=[_record(2)])  # fmt: skip
        result: list = []
        fast = threading.Thread(
            target=lambda: result.append(writer._write(conn, [_record(3)], None))
        )
        fast.start()
        for _ in range(10_000):  # until the writer's statement waits on the head's lock
            (row,) = sql(home.database_url, "SELECT wait_event_type FROM pg_stat_activity"
                         " WHERE pid = :p", p=pid)  # fmt: skip
            if row[0] == "Lock":
                break
        else:
            pytest.fail("the writer never waited on the head's lock")
        other.commit()
        fast.join()
        assert result == [None]
        assert (writer._appender.locked, writer._appender.fast) == (2, 0)
    finally:
        other.close()
        _close(engine, (writer, conn))
    report = verify(cli)
    assert report["ok"], report
    rows = sql(home.database_url, "SELECT version FROM audit_log WHERE action = 'read' ORDER BY id")
    assert [r[0] for r in rows] == [1, 2, 3]


@PG_ONLY
def test_a_batch_whose_connection_was_found_ended_is_written_not_taken_for_the_last(
    cli, home, database
):
    """The database ended the writer's idle connection (restart, pg_terminate_backend), and
    the next batch, its budget cut, fails on the first statement (the timeouts): nothing of
    it was sent, so it is written on a new connection. It was taken for the batch before
    (committed), so its requests were answered as audited and no record was written."""
    from keyvault.http.audit_writer import AuditEntry

    expect(cli("init"))
    expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))
    engine = make_engine(home.database_url)
    writer, conn = _writer(engine)
    writer._conn = conn
    try:
        assert writer._write(conn, [_record(1)], None) is None
        pid = conn.driver_connection.info.backend_pid
        sql(home.database_url, "SELECT pg_terminate_backend(:p)", p=pid)
        entry = AuditEntry(datetime.now(UTC), "t2", "read", "c", None, 2, None, "ok")
        assert writer._write_batch([(entry, None)], writer.timeout / 2) is None
    finally:
        _close(engine, (writer, writer._conn))
    rows = sql(home.database_url, "SELECT version FROM audit_log WHERE action = 'read' ORDER BY id")
    assert [r[0] for r in rows] == [1, 2]
    assert verify(cli)["ok"]


@PG_ONLY
def test_a_master_key_rotation_between_batches_sends_the_next_the_locked_way(cli, home, database):
    """`master-key rotate` in another process starts a new chain key (a record under the old
    one, the head's key moved): the writer's next batch misses and is linked under the new
    key, read from the store; the chain verifies."""
    expect(cli("init"))
    expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))
    engine = make_engine(home.database_url)
    writer, conn = _writer(engine)
    try:
        assert writer._write(conn, [_record(1)], None) is None
        assert writer._write(conn, [_record(2)], None) is None
        (before,) = sql(home.database_url, "SELECT key_id FROM audit_chain")
        expect(cli("master-key", "rotate", "--yes"))
        (after,) = sql(home.database_url, "SELECT key_id FROM audit_chain")
        assert writer._write(conn, [_record(3)], None) is None
        assert writer._write(conn, [_record(4)], None) is None  # just missed: locked
        assert writer._write(conn, [_record(5)], None) is None  # its own end: fast
        assert (writer._appender.locked, writer._appender.fast) == (3, 2)
    finally:
        _close(engine, (writer, conn))
    report = verify(cli)
    assert report["ok"], report
    rows = sql(home.database_url,
               "SELECT version, chain_key_id FROM audit_log WHERE action = 'read' ORDER BY id")  # fmt: skip
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    assert before[0] != after[0] and {r[1] for r in rows[2:]} == {after[0]}


@PG_ONLY
def test_two_writers_and_locked_appends_at_once_keep_one_chain(cli, home, database):
    """Two writers (two server processes' connections) and a third appending under the
    head's lock (the CLI's way), all at once: one verified chain, every record once."""
    import threading

    from keyvault.config import load_settings
    from keyvault.services.audit_chain import append_records, chain_for

    expect(cli("init"))
    expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))
    engine = make_engine(home.database_url)
    writers = [_writer(engine), _writer(engine)]
    keys = chain_for(load_settings()).keys
    errors: list = []

    def write(i: int) -> None:
        writer, conn = writers[i]
        for n in range(40):
            batch = [_record(1000 * i + 10 * n + k) for k in range(1 + n % 3)]
            if (error := writer._write(conn, batch, None)) is not None:
                errors.append(error)

    def locked() -> None:
        other = engine.raw_connection()
        try:
            for n in range(30):
                append_records(other, sqlite=False, keys=keys, records=[_record(5000 + n)])
                other.commit()
        finally:
            other.close()

    threads = [threading.Thread(target=write, args=(i,)) for i in (0, 1)]
    threads.append(threading.Thread(target=locked))
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        _close(engine, *writers)
    assert errors == []
    report = verify(cli)
    assert report["ok"], report
    rows = sql(home.database_url, "SELECT version FROM audit_log WHERE action = 'read'")
    expected = [1000 * i + 10 * n + k for i in (0, 1) for n in range(40) for k in range(1 + n % 3)]
    assert sorted(r[0] for r in rows) == sorted(expected + [5000 + n for n in range(30)])
