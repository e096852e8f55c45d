"""The audit writer of the HTTP server: one record per request that reads or changes keys.

``AuditWriter`` group-commits the records of many requests in one thread of its own, with
its own DBAPI connection: the event loop never waits on the database. Requests queue their
records on the loop; while one batch is written the next gathers. Each batch is appended
to the hash chain in one transaction: on SQLite by ``keyvault.services.audit_chain.
append_records`` (one lock and read of the chain's head, the inserts, one head update); on
PostgreSQL by ``keyvault.services.audit_chain_pg.PgAppender``, in one statement and one
round trip while no other process moved the head since this writer's last batch, else the
same way as SQLite's under the head's lock. Then the batch is copied to the JSON-lines sink
if one is configured. A request waits until its record is committed; if the write fails or
does not finish within the budget, the request fails too (503, as in Vault): no key leaves
the server without its audit record, and no rotation starts without its intent recorded.

The answer always matches the record: a record still queued when its request's budget runs
out is dropped (the request answers 503, and a record of that 503 is queued instead); once
a batch is being written, its requests wait for its commit, and the batch's own database
timeouts are cut to what is left of the earliest budget in it. So a read answered 503 is
never audited ``ok``. Reading the log back is ``keyvault.services.audit``.

Durability (``[audit] durability``; what each promises: docs/deployment.md, "Audit
durability"): ``fast`` commits with SQLite ``synchronous=NORMAL`` (WAL) or PostgreSQL
``synchronous_commit = off``: a committed record survives a crash of keyvault, but a crash of
the database's host (SQLite: the OS; PostgreSQL: the server) may roll back the last commits.
``durable`` commits with ``synchronous=FULL`` / ``synchronous_commit = on``: the record is on
disk (and on PostgreSQL's synchronous standbys, if configured) before the key is sent. (On
PostgreSQL the setting is the writer's session's: its connection is autocommit and its own.)
Either way a lost tail leaves the hash chain whole (the head moves in the same transaction).
``journal`` is ``keyvault.http.audit_journal.JournalAuditWriter``, which commits as ``fast``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, String
from sqlalchemy.pool import PoolProxiedConnection

from keyvault.db import session_factory, transaction
from keyvault.errors import DatabaseError
from keyvault.models import AuditRecord
from keyvault.services.audit_chain import AuditChain, append_records, ensure_chain_key
from keyvault.services.audit_chain_pg import PgAppender

log = logging.getLogger("keyvault.audit")
# The audit_log columns' VARCHAR lengths (the model's): every value is cut to fit.
_LENGTHS = {
    c.name: c.type.length
    for c in AuditRecord.__table__.c
    if isinstance(c.type, String) and c.type.length is not None
}
_CHECKPOINT_EVERY = 20_000  # audit records between WAL size checks
_WAL_LIMIT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class AuditEntry:
    at: datetime
    token_name: str
    action: str
    cluster: str | None
    scope: str | None
    version: int | None
    client: str | None
    outcome: str


class AuditUnavailable(DatabaseError):
    """The audit record could not be written (in time): the request it audits must not proceed."""


class AuditWriter:
    """Group-commits audit entries; ``await writer.record(entry)`` returns once it is committed.

    The writes run in one thread of their own (never on the event loop, which must keep
    answering ``/healthz`` and the requests that need no database while the database is
    locked or slow), through the writer's own DBAPI connection. Entries queue on the loop;
    while a batch is being written the next one gathers (group commit); a lone request is
    never delayed. A request waits at most ``timeout`` seconds for its record; the
    connection's own lock and statement timeouts bound the thread's wait as well.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        chain: AuditChain,
        timeout: float = 10.0,
        max_batch: int = 1024,
        durability: str = "fast",
    ) -> None:
        if durability not in ("fast", "durable", "journal"):  # journal: commits as fast
            raise ValueError(f"unknown audit durability {durability!r}")
        self._engine = engine
        self._chain = chain
        self.durability = durability
        self.timeout = timeout
        self._max_batch = max_batch
        self._pending: list[tuple[AuditEntry, asyncio.Future[None] | None]] = []
        # Futures of the batch being written: their requests wait for its commit.
        self._inflight: set[asyncio.Future[None]] = set()
        self._deadlines: dict[asyncio.Future[None], float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keyvault-audit")
        self._writing = False
        self._running = False
        self._conn: PoolProxiedConnection | None = None
        self._broken = False
        self.batches = 0
        self.written = 0
        self._since_checkpoint = 0
        self._busy_ms = 0  # the connection's lock wait now (SQLite busy_timeout; PostgreSQL
        # lock_timeout and statement_timeout)
        self._appender = PgAppender(chain.keys)

    def start(self) -> None:
        """Open the writer's connection and start writing for the running loop."""
        self._sqlite = self._engine.dialect.name == "sqlite"
        # A store without a chain key yet (new, or migrated) gets one now, not per batch.
        with transaction(session_factory(self._engine)) as session:
            self._chain.keys.prove(session)
            ensure_chain_key(session, keys=self._chain.keys, sink=self._chain.sink)
        self._conn = self._connect()
        self._loop = asyncio.get_running_loop()
        self._running = True

    def _connect(self) -> PoolProxiedConnection:
        conn = self._engine.raw_connection()
        wait_ms = max(1, int(self.timeout * 1000))
        if self._sqlite:
            # fast, WAL + NORMAL: a record survives a crash of keyvault; only an OS crash could
            # lose the last commits (a file audit device does not fsync per entry either).
            # durable, FULL: the WAL is fsynced at each commit, before the key is sent.
            _pragma(conn, f"synchronous={'FULL' if self.durability == 'durable' else 'NORMAL'}")
            # Checkpoints stay automatic, in the committing connection, and small (every 300
            # WAL pages): measured with wrk at 1 connection, p99 was ~2 ms at 300 pages,
            # ~4 ms at SQLite's default 1000, ~21 ms at 10,000 and ~60 ms with a background
            # checkpointer whose fsyncs made every write wait on the disk.
            _pragma(conn, "wal_autocheckpoint=300")
            # A stuck writer elsewhere fails a batch after the budget, not after 30 s.
            _pragma(conn, f"busy_timeout={wait_ms}")
            self._busy_ms = wait_ms
        else:
            # Autocommit, the durability and the timeouts for the session: a batch is then one
            # statement, one round trip (PgAppender). The connection never goes back to the
            # pool (_close). `on` is set explicitly: a role or database default of `off` must
            # not weaken `durable`.
            driver: Any = conn.driver_connection
            driver.autocommit = True
            commit = "on" if self.durability == "durable" else "off"
            cur = conn.cursor()
            try:  # a table lock (a long transaction, a restore) fails a batch after the budget
                cur.execute(f"SET synchronous_commit TO {commit}")
                cur.execute(f"SET lock_timeout = {wait_ms}")
                cur.execute(f"SET statement_timeout = {wait_ms}")
            finally:
                cur.close()
            self._busy_ms = wait_ms
            self._appender.end = None  # a new connection starts with a locked append
        return conn

    async def stop(self) -> None:
        """Write what is queued, then stop."""
        self._running = False
        loop = asyncio.get_running_loop()
        while self._pending:
            batch = self._take_batch()
            await loop.run_in_executor(self._thread, self._write_batch, batch)
        await loop.run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=False)

    def _close(self) -> None:
        if self._conn is not None:
            # Not back to the pool: on SQLite it may be synchronous=NORMAL, and key writes
            # must get the engine's FULL connections only.
            self._conn.invalidate()
            self._conn = None

    async def record(self, entry: AuditEntry, timeout: float | None = None) -> None:
        """Queue ``entry`` and wait until it is committed; ``AuditUnavailable`` if it is not."""
        loop = self._loop
        if not self._running or loop is None:
            raise AuditUnavailable(
                "the audit writer is not running", hint="check the server log and restart it"
            )
        future = loop.create_future()
        budget = self.timeout if timeout is None else timeout
        self._deadlines[future] = loop.time() + budget
        self._pending.append((entry, future))
        self._kick()
        # A timer, not asyncio.wait_for: wait_for costs a task per request on the hot path.
        timer = loop.call_later(budget, self._expire, future)
        try:
            await future
        finally:
            timer.cancel()
            self._deadlines.pop(future, None)

    def _expire(self, future: asyncio.Future[None]) -> None:
        """The budget ran out: fail the request unless its record is being written (then
        the commit decides, within the batch's cut timeouts, so answer and record agree)."""
        if future not in self._inflight:
            _settle(
                future,
                AuditUnavailable(
                    "the audit record was not written in time", hint="check the database"
                ),
            )

    def submit(self, entry: AuditEntry) -> None:
        """Queue ``entry`` without waiting for it (a request that fails anyway is not delayed)."""
        if self._running:
            self._pending.append((entry, None))
            self._kick()

    async def writable(self) -> bool:
        """True if an audit record can be written now (a rolled-back insert, within the budget)."""
        if not self._running or self._loop is None:
            return False
        probe = self._loop.run_in_executor(self._thread, self._probe_write)
        try:
            return await asyncio.wait_for(probe, self.timeout)
        except TimeoutError:
            return False

    def _kick(self) -> None:
        """Start writing the queue if no batch is being written (the loop's side, no I/O)."""
        if self._writing or not self._pending or self._loop is None:
            return
        batch = self._take_batch()
        if not batch:
            return
        self._writing = True
        now = self._loop.time()
        waiting = [f for _, f in batch if f is not None]
        self._inflight.update(waiting)
        left = min(
            (self._deadlines.get(f, now + self.timeout) - now for f in waiting), default=None
        )
        written = self._loop.run_in_executor(self._thread, self._write_batch, batch, left)
        written.add_done_callback(lambda done: self._written(batch, done))

    def _take_batch(self) -> list[tuple[AuditEntry, asyncio.Future[None] | None]]:
        # A request that already gave up (timed out, answered 503) is not recorded as served.
        live = [(e, f) for e, f in self._pending if f is None or not f.done()]
        batch, self._pending = live[: self._max_batch], live[self._max_batch :]
        return batch

    def _written(
        self,
        batch: list[tuple[AuditEntry, asyncio.Future[None] | None]],
        done: asyncio.Future[Exception | None],
    ) -> None:
        self._writing = False
        self._inflight.difference_update(f for _, f in batch if f is not None)
        failed = done.exception()
        if failed is not None:  # a bug in the writer: every waiting request learns it failed
            log.error("audit write failed: %s", failed, exc_info=failed)
        error = done.result() if failed is None else _write_failed()
        for _, future in batch:
            if future is not None:
                _settle(future, error)
        self._kick()

    def _write_batch(
        self, batch: list[tuple[AuditEntry, asyncio.Future[None] | None]], left: float | None = None
    ) -> Exception | None:
        """In the writer's thread: insert and commit ``batch`` within ``left`` seconds (what is
        left of its earliest waiting request's budget); the error to report, if any."""
        records = [record_of(e) for e, _ in batch]
        error = self._write_on_usable(records, left)
        if isinstance(error, _Lost):
            error = self._finish_lost(error.sent, records, left)
        if error is None:
            self.batches += 1
            self.written += len(batch)
            self._since_checkpoint += len(batch)
            if self._sqlite and self._since_checkpoint >= _CHECKPOINT_EVERY and self._conn:
                self._truncate_wal(self._conn)
        return error

    def _write_on_usable(
        self, records: list[dict[str, Any]], left: float | None
    ) -> Exception | None:
        conn = self._usable_connection()
        if conn is None:
            return _write_failed()
        return self._write(conn, records, left)

    def _finish_lost(
        self, sent: list[dict[str, Any]] | None, records: list[dict[str, Any]], left: float | None
    ) -> Exception | None:
        """The database ended the connection under a batch: on a new one, a batch whose
        statement committed before that is done; one that did not is written again. So its
        records are neither lost nor doubled (unless the old session commits after the check,
        possible only if it outlived its client's socket: then the records are doubled, never
        lost)."""
        conn = self._usable_connection()
        if conn is None:  # whether the sent batch committed cannot be known: a sink gap
            if sent is not None and self._chain.sink is not None:
                self._chain.sink.missed(sent)
            return _write_failed()
        try:
            done = sent is not None and self._appender.committed(conn.driver_connection, sent)
        except Exception as exc:  # noqa: BLE001 - every waiting request must learn it failed
            self._broken = True
            log.error("audit write failed: %s", exc)
            if sent is not None and self._chain.sink is not None:
                self._chain.sink.missed(sent)
            return _write_failed()
        if done and sent is not None:
            if self._chain.sink is not None:
                self._chain.sink.write(sent)
            return None
        error = self._write(conn, records, left)
        if isinstance(error, _Lost):  # lost twice in a row: the database is going away
            if error.sent is not None and self._chain.sink is not None:
                self._chain.sink.missed(error.sent)
            return _write_failed()
        return error

    def _probe_write(self) -> bool:
        """In the writer's thread: insert one row and roll it back (on a new connection
        if the database dropped the one held)."""
        ok = self._probe_once()
        return self._probe_once() is True if ok is None else ok

    def _probe_once(self) -> bool | None:
        """True: writable; False: not; None: the connection was found closed."""
        conn = self._usable_connection()
        if conn is None:
            return False
        probe = AuditEntry(datetime.now(UTC), "(probe)", "probe", None, None, None, None, "probe")
        records = [record_of(probe)]
        if not self._sqlite:
            try:
                driver: Any = conn.driver_connection
                with driver.transaction(force_rollback=True):
                    append_records(driver, sqlite=False, keys=self._chain.keys, records=records)
                return True
            except Exception as exc:  # noqa: BLE001 - whatever the reason, records cannot be written
                self._broken = True
                if _closed(conn):
                    return None
                log.warning("audit probe failed: %s", exc)
                return False
        cur = conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
            append_records(conn, sqlite=True, keys=self._chain.keys, records=records)
            return True
        except Exception as exc:  # noqa: BLE001 - whatever the reason, records cannot be written
            log.warning("audit probe failed: %s", exc)
            self._broken = True
            return False
        finally:
            # Nothing to undo, or the connection is gone: either way the probe is over.
            with contextlib.suppress(Exception):
                cur.execute("ROLLBACK")
            cur.close()

    def _usable_connection(self) -> PoolProxiedConnection | None:
        """The connection, reopened if the last batch failed on it; None if that fails."""
        if not self._broken:
            return self._conn
        # The last batch failed: the database may have dropped the connection (restart,
        # failover). Start this one on a fresh connection, or fail it as well.
        try:
            if self._conn is not None:
                self._conn.invalidate()
        except Exception:  # noqa: BLE001 - it is broken already
            pass
        try:
            self._conn, self._broken = self._connect(), False
        except Exception as exc:  # noqa: BLE001
            log.error("audit write failed: cannot reconnect: %s", exc)
            return None
        return self._conn

    def _write(
        self, conn: PoolProxiedConnection, records: list[dict[str, Any]], left: float | None
    ) -> Exception | None:
        """Append ``records`` to the chain and commit, in one transaction; the error to
        report, if any. Then copy them to the sink."""
        wait_ms = max(1, int((self.timeout if left is None else left) * 1000))
        linked: list[dict[str, Any]] | None = None
        if not self._sqlite:
            # What this batch sent, if anything: not the batch before's (committed), which a
            # connection found ended before this one's statement would leave for _finish_lost.
            self._appender.sent = None
            try:
                self._wait(conn, wait_ms)
                linked = self._appender.append(conn.driver_connection, records)
            except Exception as exc:  # noqa: BLE001 - every waiting request must learn it failed
                self._broken = True
                if _closed(conn):  # a restart, a failover, pg_terminate_backend
                    log.warning("audit connection lost during a write (%s); reconnecting", exc)
                    return _Lost(self._appender.sent)
                log.error("audit write failed: %s", exc)
                if self._appender.sent is not None and self._chain.sink is not None:
                    self._chain.sink.missed(self._appender.sent)  # its reply lost: maybe committed
                return _write_failed()
        else:
            cur = conn.cursor()
            try:
                self._wait(conn, wait_ms)
                cur.execute("BEGIN IMMEDIATE")
                linked = append_records(conn, sqlite=True, keys=self._chain.keys, records=records)
                cur.execute("COMMIT")
            except Exception as exc:  # noqa: BLE001 - every waiting request must learn it failed
                log.error("audit write failed: %s", exc)
                self._broken = True
                if linked is not None and self._chain.sink is not None:
                    self._chain.sink.missed(linked)  # the COMMIT's reply lost: maybe committed
                try:  # noqa: SIM105
                    cur.execute("ROLLBACK")
                except Exception:  # noqa: BLE001 - the connection may be gone; the error stands
                    pass
                return _write_failed()
            finally:
                cur.close()
        if self._chain.sink is not None:
            self._chain.sink.write(linked)
        return None

    async def effective_synchronous(self) -> str:
        """What a batch commits with, read on the writer's own connection (``PRAGMA
        synchronous``: 1 NORMAL, 2 FULL, inside a write transaction as a batch's; ``SHOW
        synchronous_commit``, the session's, which a batch's autocommit statement uses); for
        tests and diagnosis."""
        if not self._running or self._loop is None:
            raise AuditUnavailable("the audit writer is not running")
        return await self._loop.run_in_executor(self._thread, self._read_synchronous)

    def _read_synchronous(self) -> str:
        conn = self._usable_connection()
        if conn is None:
            raise AuditUnavailable("the audit writer has no connection")
        cur = conn.cursor()
        try:
            if self._sqlite:
                cur.execute("BEGIN IMMEDIATE")
                cur.execute("PRAGMA synchronous")
            else:
                cur.execute("SHOW synchronous_commit")
            row = cur.fetchone()
            return str(row[0]) if row else ""
        finally:
            if self._sqlite:
                with contextlib.suppress(Exception):
                    cur.execute("ROLLBACK")
            cur.close()

    def _wait(self, conn: PoolProxiedConnection, wait_ms: int) -> None:
        """Cut the connection's lock wait (SQLite ``busy_timeout``; PostgreSQL
        ``lock_timeout`` and ``statement_timeout``) to what is left of the batch's budget; a
        statement only when that is well below the budget, or when the previous batch's was
        cut (a lone request, the common case, costs none)."""
        full = max(1, int(self.timeout * 1000))
        wanted = wait_ms if wait_ms < full * 0.9 else full
        if wanted == self._busy_ms:
            return
        if self._sqlite:
            _pragma(conn, f"busy_timeout={wanted}")
        else:
            cur = conn.cursor()
            try:
                cur.execute(f"SET lock_timeout = {wanted}")
                cur.execute(f"SET statement_timeout = {wanted}")
            finally:
                cur.close()
        self._busy_ms = wanted

    def _truncate_wal(self, conn: PoolProxiedConnection) -> None:
        # Under constant reads SQLite's automatic (passive) checkpoints never get to reset the
        # WAL, so it would grow without bound. Now and then, if it is large, checkpoint and
        # truncate it: one stall of a few ms in many thousand writes (p99 stays flat).
        self._since_checkpoint = 0
        wal = self._engine.url.database + "-wal" if self._engine.url.database else None
        try:
            if wal and os.path.getsize(wal) > _WAL_LIMIT_BYTES:
                _pragma(conn, "wal_checkpoint(TRUNCATE)")
        except Exception as exc:  # noqa: BLE001 - busy or gone: the next round tries again
            log.info("WAL checkpoint skipped: %s", exc)


def record_of(entry: AuditEntry) -> dict[str, Any]:
    """The chain record of ``entry``, every value within its column (one bad row must not
    fail a batch: a request's path may name anything, NULs included)."""
    return {
        "at": entry.at,
        "token_name": _text(entry.token_name, "token_name") or "(none)",
        "action": _text(entry.action, "action"),
        "cluster": _text(entry.cluster, "cluster"),
        "scope": _text(entry.scope, "scope"),
        "version": entry.version if entry.version is None or 0 <= entry.version < 2**31 else None,
        "client": _text(entry.client, "client"),
        "outcome": _text(entry.outcome, "outcome"),
    }


def _text(value: str | None, column: str) -> str | None:
    # PostgreSQL text cannot hold NUL; cut after escaping, to the column's VARCHAR length.
    if value is None:
        return None
    return value.replace("\x00", "\\x00")[: _LENGTHS[column]]


def _pragma(conn: PoolProxiedConnection, pragma: str) -> None:
    """Run a PRAGMA on the sqlite3 connection itself (outside SQLAlchemy's transaction)."""
    driver = conn.driver_connection
    if driver is not None:
        driver.execute(f"PRAGMA {pragma}")


class _Lost(AuditUnavailable):
    """The database ended the connection under a batch; ``sent``: the linked records of the
    statement then sent (None if none was), which may or may not have been committed."""

    def __init__(self, sent: list[dict[str, Any]] | None) -> None:
        super().__init__("the audit connection was lost", hint="check the database")
        self.sent = sent


def _closed(conn: PoolProxiedConnection) -> bool:
    """The DBAPI connection is closed (psycopg: the server ended the session)."""
    return bool(getattr(conn.driver_connection, "closed", False))


def _write_failed() -> AuditUnavailable:
    return AuditUnavailable("the audit record could not be written", hint="check the database")


def _settle(future: asyncio.Future[None], error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
