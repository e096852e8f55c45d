"""The audit chain against the adversarial review's three findings, on both databases:
forged records at or below a prune anchor (or beyond what the chain's start counted), an
old chain key put back in the head or used for a re-MACed tail after a master-key rotation,
and a sink that missed records (a failed write, a savepoint rolled back, a lost COMMIT
reply) marking a gap instead of reading as a deletion."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from keyvault.db import make_engine, session_factory, transaction
from tests.support.cli import audit_report as verify
from tests.support.cli import expect, one_error_line
from tests.support.db import run_sql as sql

FORGED = (
    "INSERT INTO audit_log (id, at, action, actor, target, outcome) "
    "VALUES (:i, :at, 'secrets.reveal', 'alice', 'cluster:c', 'ok')"
)


def test_a_record_forged_at_or_below_a_prune_anchor_is_inserted(cli, home):
    expect(cli("init"))
    expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))
    cut = datetime.now(UTC).isoformat()
    expect(cli("cluster", "set", "c", "--login-name", "b"))
    out = json.loads(expect(cli("audit", "prune", "--before", cut, "--yes", "--json")).stdout)
    assert verify(cli)["ok"]
    sql(home.database_url, FORGED, i=1, at=datetime(2026, 1, 1))
    report = verify(cli)
    assert not report["ok"] and report["problem_id"] == 1, report
    assert (
        "inserted" in report["problem"]
        and f"anchor (record {out['through_id']})" in (report["problem"])
    )
    one_error_line(cli("audit", "verify"), 1, "record 1 was inserted")


def test_a_record_forged_before_a_migrated_chain_start_is_caught(cli, home):
    from keyvault.db import downgrade, upgrade

    expect(cli("init"))
    engine = make_engine(home.database_url)
    try:
        downgrade(engine, "0006")
        with engine.begin() as conn:
            for day in range(1, 4):
                conn.execute(
                    text("INSERT INTO audit_log (at, token_name, action, outcome) "
                         "VALUES (:at, 'old', 'read', 'ok')"),
                    {"at": datetime(2026, 1, day)},
                )  # fmt: skip
        upgrade(engine)
    finally:
        engine.dispose()
    expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))
    before = verify(cli)
    assert before["ok"] and before["before_chain"] >= 3, before
    sql(home.database_url, FORGED, i=0, at=datetime(2026, 1, 1))  # a free id below the anchor
    report = verify(cli)
    assert not report["ok"] and "inserted before the chain" in report["problem"], report


def _old_chain_key(home) -> tuple[str, bytes, str]:
    """What an attacker with an old master key (and an old backup) holds: a chain key the
    chain has left, in the clear; and the live head key id."""
    from keyvault import crypto
    from keyvault.services.audit_chain import chain_key_aad

    rows = sql(
        home.database_url,
        "SELECT k.id, k.ciphertext, k.wrapped_key, k.master_key_id, h.key_id "
        "FROM audit_chain_keys k, audit_chain h ORDER BY k.created_at",
    )
    old = next(r for r in rows if r[0] != r[4])
    keyring = crypto.load_keyring(home.master_key_file)
    sealed = crypto.Sealed(bytes(old[1]), bytes(old[2]), old[3])
    return old[0], crypto.unseal(keyring, sealed, chain_key_aad(old[0]), what="t"), rows[0][4]


def test_an_old_chain_key_cannot_come_back_after_a_rotation(cli, home):
    from keyvault.services.audit_chain import link

    expect(cli("init"))
    expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))
    expect(cli("master-key", "rotate", "--yes"))
    expect(cli("cluster", "set", "c", "--login-name", "a"))
    assert verify(cli)["ok"]
    url = home.database_url
    old_id, old_key, live_id = _old_chain_key(home)
    # The head's key put back to the old one: appends refuse it, verify names it.
    sql(url, "UPDATE audit_chain SET key_id = :k", k=old_id)
    one_error_line(
        cli("cluster", "set", "c", "--login-name", "b"), 1, f"chain key {live_id}", "altered"
    )
    assert "head was altered" in verify(cli)["problem"]
    # A tail record re-MACed under the old key (head moved to match): named.
    last_id, last_mac = sql(url, "SELECT last_id, last_mac FROM audit_chain")[0]
    forged = {
        "at": datetime.now(UTC),
        "action": "secrets.reveal",
        "actor": "alice",
        "outcome": "ok",
    }
    (row,) = link(old_key, old_id, last_mac, last_id + 1, [forged])
    columns = ("id", "at", "action", "actor", "outcome", "chain_key_id", "chain_mac")
    sql(
        url,
        f"INSERT INTO audit_log ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)})",
        **{c: (datetime.fromisoformat(row["at"]) if c == "at" else row[c]) for c in columns},
    )
    sql(url, "UPDATE audit_chain SET last_id = :i, last_mac = :m", i=row["id"], m=row["chain_mac"])
    report = verify(cli)
    assert not report["ok"] and report["problem_id"] == row["id"], report
    assert "an old chain key was used again" in report["problem"]
    # Every rotation is a chained record naming the new key, under the key before it.
    started = sql(url, "SELECT chain_key_id, target FROM audit_log WHERE action = "
                       "'audit.chain_key_started' ORDER BY id")  # fmt: skip
    assert [t for _, t in started] == [f"audit-chain-key:{k}" for k in (started[0][0], live_id)]
    assert started[1][0] == old_id == started[0][0]


def _chain(home, sink_path):
    from keyvault.config import load_settings
    from keyvault.services.audit_chain import chain_for

    os.environ["KEYVAULT_AUDIT_SINK"] = str(sink_path)
    try:
        return chain_for(load_settings())
    finally:
        del os.environ["KEYVAULT_AUDIT_SINK"]


def _event(factory, chain, target: str, *, nested_rollback: str | None = None) -> None:
    from keyvault.services.audit import record_event

    with transaction(factory) as session:
        record_event(session, chain=chain, actor="t", action="test", target=target, outcome="ok")
        if nested_rollback is not None:
            savepoint = session.begin_nested()
            record_event(
                session, chain=chain, actor="t", action="test", target=nested_rollback,
                outcome="ok",
            )  # fmt: skip
            savepoint.rollback()


def test_a_sink_that_missed_records_marks_a_gap_and_verifies_around_it(cli, home, tmp_path):
    expect(cli("init"))
    sink_path = tmp_path / "audit.jsonl"
    chain = _chain(home, sink_path)
    engine = make_engine(home.database_url)
    factory = session_factory(engine)
    try:
        _event(factory, chain, "a")
        # A savepoint rolled back inside a committed transaction: the outer record is written.
        _event(factory, chain, "b", nested_rollback="dropped")
        good_fd = chain.sink._fd
        chain.sink._fd = os.open("/dev/full", os.O_WRONLY)  # the disk is full: writes fail
        _event(factory, chain, "missed-1")
        _event(factory, chain, "missed-2")
        os.close(chain.sink._fd)
        chain.sink._fd = good_fd
        assert chain.sink.failures == 2
        _event(factory, chain, "c")
        # A COMMIT whose reply was lost (the HTTP writer's case): marked as a gap too.
        with transaction(factory) as session:
            from keyvault.services.audit_chain import append

            lost = append(session, chain=chain.__class__(chain.keys), records=[
                {"at": datetime.now(UTC), "action": "test", "target": "lost", "outcome": "ok"}
            ])  # fmt: skip
        chain.sink.missed(lost)
        _event(factory, chain, "d")
    finally:
        chain.sink.close()
        engine.dispose()
    lines = [json.loads(line) for line in sink_path.read_text().splitlines()]
    targets = [line.get("target") for line in lines if "sink_gap" not in line]
    assert "b" in targets and "dropped" not in targets and "c" in targets
    gaps = [line["sink_gap"] for line in lines if "sink_gap" in line]
    assert len(gaps) == 3 and gaps[-1] == {"from": lost[0]["id"], "to": lost[0]["id"]}
    report = verify(cli, "--file", str(sink_path))
    assert report["ok"], report
    assert [tuple(g) for g in report["gaps"]] == [(g["from"], g["to"]) for g in gaps]
    assert report["verified"] == len(targets)
    summary = expect(cli("audit", "verify", "--file", str(sink_path))).stdout
    assert "sink gaps marked" in summary
    # A record deleted from the file outside a marked gap is still a deletion.
    kept = [json.dumps(line) for line in lines if line.get("target") != "c"]
    sink_path.write_text("\n".join(kept) + "\n")
    report = verify(cli, "--file", str(sink_path))
    assert not report["ok"] and "deleted" in report["problem"], report


class _LostCommitReply:
    """A real DBAPI connection whose COMMIT is applied and then reported lost (injected);
    on PostgreSQL, where the writer appends with one autocommit statement, that statement's
    reply is lost instead."""

    def __init__(self, conn) -> None:
        self._conn = conn

    def __getattr__(self, name: str):
        return getattr(self._conn, name)

    @property
    def driver_connection(self):
        return _LostCommitReply(self._conn.driver_connection)

    def commit(self) -> None:
        self._conn.commit()
        raise OSError("server closed the connection unexpectedly")

    def cursor(self):
        return _LostCommitCursor(self._conn.cursor())


class _LostCommitCursor:
    def __init__(self, cur) -> None:
        self._cur = cur

    def __getattr__(self, name: str):
        return getattr(self._cur, name)

    def execute(self, statement: str, *args):
        result = self._cur.execute(statement, *args)
        if statement == "COMMIT" or statement.startswith("WITH moved AS"):
            raise OSError("disk I/O error")
        return result


def test_the_http_writer_marks_a_batch_whose_commit_reply_was_lost(cli, home, tmp_path):
    from keyvault.http.audit_writer import AuditWriter

    expect(cli("init"))
    expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))  # a chain key
    sink_path = tmp_path / "audit.jsonl"
    chain = _chain(home, sink_path)
    engine = make_engine(home.database_url)
    writer = AuditWriter(engine, chain=chain)
    writer._sqlite = engine.dialect.name == "sqlite"
    conn = writer._connect()  # as the writer's own (PostgreSQL: autocommit)
    try:
        record = {"at": datetime.now(UTC), "action": "read", "outcome": "ok"}
        assert writer._write(conn, [record], None) is None
        assert writer._write(_LostCommitReply(conn), [record, record], None) is not None
        assert writer._write(conn, [record], None) is None
    finally:
        conn.close()
        chain.sink.close()
        engine.dispose()
        writer._thread.shutdown()
    lines = [json.loads(line) for line in sink_path.read_text().splitlines()]
    gaps = [line["sink_gap"] for line in lines if "sink_gap" in line]
    assert len(gaps) == 1 and gaps[0]["to"] == gaps[0]["from"] + 1, lines
    assert verify(cli)["ok"]  # the batch was committed: the database's chain has it
    report = verify(cli, "--file", str(sink_path))
    assert (
        report["ok"]
        and report["verified"] == 2
        and report["gaps"] == [[gaps[0]["from"], gaps[0]["to"]]]
    ), report


class _CommittedThenEnded(_LostCommitReply):
    """The writer's one statement is committed, then the database ends the connection
    before its reply (a restart, a failover): the connection is closed, the reply lost."""

    @property
    def driver_connection(self):
        return _CommittedThenEnded(self._conn.driver_connection)

    def cursor(self):
        return _EndedCursor(self._conn)


class _EndedCursor(_LostCommitCursor):
    def __init__(self, conn) -> None:
        super().__init__(conn.cursor())
        self._driver = conn

    def execute(self, statement: str, *args):
        result = self._cur.execute(statement, *args)
        if statement.startswith("WITH moved AS"):
            self._driver.close()
            raise OSError("server closed the connection unexpectedly")
        return result


@pytest.mark.parametrize("blank_database", ["postgres"], indirect=True)
def test_a_lost_batch_the_writer_cannot_reconnect_to_check_is_marked_a_sink_gap(
    cli, home, tmp_path, database
):
    """The database ended the connection under a batch and the writer cannot reconnect to
    learn whether it committed: the batch fails and its records are a gap in the sink (they
    are committed here), not a hole the sink's verify takes for deleted lines."""
    from keyvault.http.audit_writer import AuditEntry, AuditWriter

    expect(cli("init"))
    expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))
    sink_path = tmp_path / "audit.jsonl"
    chain = _chain(home, sink_path)
    engine = make_engine(home.database_url)
    writer = AuditWriter(engine, chain=chain)
    writer._sqlite = False
    connect = writer._connect
    writer._conn = connect()
    record = {"at": datetime.now(UTC), "action": "read", "outcome": "ok"}
    try:
        assert writer._write(writer._conn, [record], None) is None  # locked: the first
        writer._conn = _CommittedThenEnded(writer._conn)

        def unreachable():
            raise OSError("connection refused")

        writer._connect = unreachable
        entry = AuditEntry(datetime.now(UTC), "t", "read", "c", None, 1, None, "ok")
        assert writer._write_batch([(entry, None), (entry, None)]) is not None  # unchecked
        writer._connect = connect
        assert writer._write_batch([(entry, None)]) is None  # the database is back
    finally:
        if writer._conn is not None:
            writer._conn.invalidate()
        chain.sink.close()
        engine.dispose()
        writer._thread.shutdown()
    lines = [json.loads(line) for line in sink_path.read_text().splitlines()]
    gaps = [line["sink_gap"] for line in lines if "sink_gap" in line]
    assert verify(cli)["ok"]
    report = verify(cli, "--file", str(sink_path))
    assert report["ok"] and len(gaps) == 1, (report, lines)
