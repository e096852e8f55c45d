"""Audit durability ``journal`` (keyvault/http/audit_journal.py), on SQLite and PostgreSQL:
a key is sent once its record is in the local journal; the records reach the hash chain
right after, each exactly once; a killed server's journal is shipped by the next start;
reads stop (503) when the database has taken no record for the budget, and resume.

The database is made to refuse audit appends, while keys and tokens still read, by holding
its write lock (SQLite) or a lock on the chain's head (PostgreSQL) from the test. Every wait
is a bounded poll of a state.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from keyvault.config import load_settings
from keyvault.errors import ConfigError
from keyvault.http.audit_journal import JournalAuditWriter
from keyvault.http.audit_writer import AuditEntry, AuditUnavailable, AuditWriter
from keyvault.http.journal_files import JournalFile, private_directory
from keyvault.models import AuditRecord
from keyvault.services.audit_chain import chain_for
from tests.support.cli import audit_report, expect
from tests.support.db import audit_appends_held, run_sql
from tests.support.http import Server, World
from tests.support.replicas import wait_for
from tests.support.timeouts import TIMEOUT

READ = "/v1/clusters/c/apps/a1"
TOKEN = "app-a1"


def _journal_server(world: World, **env: str) -> Path:
    """Restart the world's server with ``--audit-durability journal``; its journal directory."""
    workdir = world.server.workdir
    world.server.stop()
    world.server = Server(
        workdir, env={**os.environ, **env}, args=("--audit-durability", "journal")
    ).start()
    return Path(os.environ["KEYVAULT_HOME"]) / "audit-journal"


def _reads(engine, outcome: str | None = "ok", token: str | None = TOKEN) -> int:
    """Read records of ``token`` (None: any, a refused request's "(none)" too) with
    ``outcome`` (None: any but ok)."""
    where = [
        AuditRecord.action == "read",
        AuditRecord.outcome == outcome if outcome else AuditRecord.outcome != "ok",
    ]
    if token is not None:
        where.append(AuditRecord.token_name == token)
    with engine.connect() as conn:
        query = select(func.count()).where(*where)
        return int(conn.scalar(query) or 0)


def _lines(path: Path) -> int:
    return len(path.read_bytes().splitlines())


def test_reads_are_journaled_then_shipped_and_a_clean_stop_leaves_nothing(served: World, engine):
    journal = _journal_server(served)
    with served.http(TOKEN) as http:
        for _ in range(20):
            assert http.get(READ).status_code == 200
    wait_for("20 read records in the database", lambda: _reads(engine) == 20)
    [own] = journal.glob("*.jsonl")  # the server's, held under its lock
    assert stat.S_IMODE(journal.stat().st_mode) == 0o700
    assert stat.S_IMODE(own.stat().st_mode) == 0o600
    assert _lines(own) == 20
    served.server.stop()
    assert list(journal.iterdir()) == []  # all shipped: the files are gone
    assert _reads(engine) == 20
    report = audit_report(served.cli)
    assert report["ok"], report


def test_a_killed_servers_journal_is_shipped_once_by_the_next_start(served: World, engine):
    journal = _journal_server(served)
    server = served.server
    with served.http(TOKEN) as http:
        assert http.get(READ).status_code == 200  # the token and the key now cached
        wait_for("the first record", lambda: _reads(engine) == 1)
        with audit_appends_held(engine):
            for _ in range(10):  # answered: their records are in the journal only
                assert http.get(READ).status_code == 200
            assert server.proc is not None
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=TIMEOUT)
            [orphan] = journal.glob("*.jsonl")
            assert _lines(orphan) == 11
            assert int(orphan.with_suffix(".shipped").read_text()) == 1  # the first only
    # The lock is released: a batch of the dead server's still waiting on it (PostgreSQL
    # keeps its session) would commit now; the next start ends such a session first and
    # checks what is in before it ships, so every record lands once.
    server.start()
    wait_for("the orphan shipped", lambda: not orphan.exists())
    assert _reads(engine) == 11
    report = audit_report(served.cli)
    assert report["ok"], report


def test_reads_stop_when_the_database_takes_no_record_for_the_budget(served: World, engine):
    _journal_server(served, KEYVAULT_HTTP_DB_BUDGET="1")
    answered = 0
    with served.http(TOKEN) as http:
        assert http.get(READ).status_code == 200
        answered += 1
        with audit_appends_held(engine):
            deadline = time.monotonic() + TIMEOUT
            while True:
                response = http.get(READ)
                if response.status_code != 200:
                    break
                answered += 1
                assert time.monotonic() < deadline, "reads never stopped"
            assert response.status_code == 503, response.text
            assert "key" not in response.json()
            if engine.dialect.name == "postgresql":  # SQLite's lock also holds up the token
                # and key reads once their cache expires: which 503 comes first varies there
                # (the in-process test below shows the journal's on both).
                assert "audit" in response.json()["detail"]
        # Released: the backlog drains, then reads are served again.
        wait_for("a read served again", lambda: http.get(READ).status_code == 200)
        answered += 1
    wait_for("every answered read recorded", lambda: _reads(engine) >= answered)
    assert _reads(engine) == answered  # each exactly once, and no 503 recorded as ok
    assert _reads(engine, None, token=None) >= 1  # the 503s, recorded as such
    report = audit_report(served.cli)
    assert report["ok"], report


def _entry(n: int) -> AuditEntry:
    return AuditEntry(datetime.now(UTC), "journal-test", "read", "c", "app:a1", n, None, "ok")


def _versions(engine) -> list[int]:
    with engine.connect() as conn:
        query = select(AuditRecord.version).where(AuditRecord.token_name == "journal-test")
        return sorted(v for v in conn.scalars(query) if v is not None)


async def _commit_directly(engine, entries: list[AuditEntry]) -> None:
    writer = AuditWriter(engine, chain=chain_for(load_settings()))
    writer.start()
    for entry in entries:
        await writer.record(entry)
    await writer.stop()


async def _replay(engine, directory: Path, gone: Path) -> int:
    writer = JournalAuditWriter(engine, chain=chain_for(load_settings()), directory=directory)
    writer.start()
    deadline = time.monotonic() + TIMEOUT
    while gone.exists():  # a bounded poll of the orphan's removal
        assert time.monotonic() < deadline, "the orphan was never shipped"
        await asyncio.sleep(0.02)
    await writer.stop()
    return writer.replayed


def test_an_orphan_is_shipped_from_its_mark_and_a_live_journal_is_left(cli, home, engine, tmp_path):
    """A dead process's journal: 6 records, 2 marked shipped, 2 more committed but not marked
    (killed between the commit and the mark) and a line torn by a crash; beside it a live
    process's journal (locked). The next writer ships records 5 and 6 only, skips the torn
    line, removes the orphan and leaves the live journal alone."""
    expect(cli("init"))
    directory = tmp_path / "audit-journal"
    private_directory(directory)
    dead = JournalFile.create(directory, "deadbeef0001")
    entries = [_entry(n) for n in range(1, 7)]
    for entry in entries:
        dead.append(entry)
    asyncio.run(_commit_directly(engine, entries[:4]))
    dead.mark(2)
    with open(dead.path, "ab") as torn:
        torn.write(b'{"at":"2026-12-04T10:00:00+00:00","token_na')
    dead.close()  # its lock goes, as with the process
    live = JournalFile.create(directory, "11ve00000001")
    try:
        live.append(_entry(99))
        replayed = asyncio.run(_replay(engine, directory, dead.path))
        assert live.path.exists() and _lines(live.path) == 1
    finally:
        live.close()
    assert replayed == 2
    assert _versions(engine) == [1, 2, 3, 4, 5, 6]
    report = audit_report(cli)
    assert report["ok"], report


async def _refused_after(engine, directory: Path) -> int:
    """Records written while the database takes none, until the writer refuses (its budget,
    0.5 s, passed); then, the lock released, all of them shipped. How many were taken."""
    writer = JournalAuditWriter(
        engine, chain=chain_for(load_settings()), directory=directory, timeout=0.5
    )
    writer.start()
    taken, deadline, refused = 0, time.monotonic() + TIMEOUT, None
    with audit_appends_held(engine):
        while refused is None:
            try:
                await writer.record(_entry(taken + 1))
                taken += 1
            except AuditUnavailable as exc:
                refused = str(exc)
            assert time.monotonic() < deadline, "never refused"
            await asyncio.sleep(0.01)  # the pace of the writes, not a synchronisation
    assert "has not taken audit records" in refused
    await _drained(writer)
    await writer.record(_entry(taken + 1))  # taken again
    await writer.stop()
    return taken + 1


def test_the_journal_refuses_records_once_the_database_took_none_for_the_budget(
    cli, home, engine, tmp_path
):
    expect(cli("init"))
    directory = tmp_path / "audit-journal"
    taken = asyncio.run(_refused_after(engine, directory))
    assert taken > 1
    assert _versions(engine) == list(range(1, taken + 1))  # each once, none lost
    assert list(directory.iterdir()) == []


@pytest.mark.parametrize("blank_database", ["postgres"], indirect=True)
def test_the_writers_sessions_ended_under_load_lose_and_double_nothing(served: World, engine):
    """pg_terminate_backend on the journal writer's sessions (the async one of the
    one-statement appends and the thread's) between and during reads: the writer reconnects,
    settles a statement whose answer was lost, and every read is recorded exactly once."""
    _journal_server(served)
    answered = 0
    with served.http(TOKEN) as http:
        for round_ in range(5):
            for _ in range(40):
                assert http.get(READ).status_code == 200
                answered += 1
            ended = run_sql(
                served.db_url,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name LIKE 'keyvault-audit-journal %'",
            )
            assert round_ > 0 or ended[0][0] >= 1, "no journal writer session to end"
    wait_for("every read recorded", lambda: _reads(engine) >= answered)
    assert _reads(engine) == answered
    report = audit_report(served.cli)
    assert report["ok"], report


async def _ship_all_of(
    engine, directory: Path, entries: list[AuditEntry], *, one_by_one: bool = False
) -> JournalAuditWriter:
    """A journal writer that records ``entries`` (``one_by_one``: each shipped before the
    next is recorded, so each is a batch of its own), ships them and stops."""
    writer = JournalAuditWriter(engine, chain=chain_for(load_settings()), directory=directory)
    writer.start()
    for n, entry in enumerate(entries, start=1):
        await writer.record(entry)
        if one_by_one or n == len(entries):
            await _drained(writer)
    await writer.stop()
    return writer


async def _drained(writer: JournalAuditWriter) -> None:
    deadline = time.monotonic() + TIMEOUT
    while writer.backlog:  # a bounded poll of the backlog draining
        assert time.monotonic() < deadline, "the journal was never shipped"
        await asyncio.sleep(0.005)


def test_a_record_of_hostile_values_is_shipped_not_retried_forever(cli, home, engine, tmp_path):
    """An unauthenticated GET /v1/clusters/%00...%00/root is audited: its values are cut to
    their columns after NULs are escaped, so the batch is written (a record the database
    refused would block the journal behind it)."""
    expect(cli("init"))
    hostile = AuditEntry(
        datetime.now(UTC), "\x00" * 64, "read", "\x00" * 64, "app:" + "\x00" * 76, 2**40,
        "\x00" * 64, "unauthorized",
    )  # fmt: skip
    writer = asyncio.run(_ship_all_of(engine, tmp_path / "j", [hostile, _entry(1)]))
    assert writer.written == 2
    assert _versions(engine) == [1]
    report = audit_report(cli)
    assert report["ok"], report


def test_a_foreign_journal_directory_stops_the_start_and_odd_files_are_left(
    cli, home, engine, tmp_path
):
    expect(cli("init"))
    directory = tmp_path / "audit-journal"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)  # whatever the umask
    writer = JournalAuditWriter(engine, chain=chain_for(load_settings()), directory=directory)
    with pytest.raises(ConfigError, match="must be a directory of this user with mode 0700"):
        writer.start()
    writer._thread.shutdown()
    os.chmod(directory, 0o700)
    # A journal name pointing elsewhere, and a mark that would: read by no one, written by no one.
    (directory / "other-1-abcdefabcdef-1.jsonl").symlink_to("/etc/hostname")
    target = tmp_path / "victim"
    target.write_bytes(b"untouched")
    (directory / "other-2-abcdefabcdef-1.shipped").symlink_to(target)
    (directory / "other-2-abcdefabcdef-1.jsonl").write_bytes(b"")
    assert asyncio.run(_ship_all_of(engine, directory, [_entry(1)])).written == 1
    assert _versions(engine) == [1]
    assert target.read_bytes() == b"untouched"
    assert (directory / "other-1-abcdefabcdef-1.jsonl").is_symlink()


def test_shipped_records_reach_the_sink_in_chain_order(cli, home, engine, tmp_path, monkeypatch):
    """The JSON-lines sink gets each shipped record once, in the chain's order (on PostgreSQL
    the one-statement appends run on the loop; their lines are written in the writer's
    thread, after the batches before)."""
    expect(cli("init"))
    sink = tmp_path / "audit.jsonl"
    monkeypatch.setenv("KEYVAULT_AUDIT_SINK", str(sink))
    entries = [_entry(n) for n in range(1, 31)]
    writer = asyncio.run(_ship_all_of(engine, tmp_path / "j", entries, one_by_one=True))
    assert writer.written == 30
    if engine.dialect.name == "postgresql":  # the first locked, then the loop's statements
        assert writer._appender.fast >= 28
    lines = [json.loads(line) for line in sink.read_text().splitlines()]
    ours = [line for line in lines if line.get("token_name") == "journal-test"]
    assert [line["version"] for line in ours] == list(range(1, 31))
    ids = [line["id"] for line in lines if "id" in line]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
