"""Audit durability ``journal``: the record is on a local file before the key is sent, and in
the database's hash chain a few milliseconds later.

``AuditWriter`` (``fast``, ``durable``) makes each key read wait for a database round trip.
``JournalAuditWriter`` makes it wait for one ``write(2)`` to a local append-only file instead,
as OpenBao's file audit device does, and ships the records to the same hash chain, through
the same group-committing connection, right behind. What it promises (docs/deployment.md,
"Audit durability"):

- a key is sent only after its record's line is in the journal (the page cache): a crash or
  kill -9 of keyvault loses no record; an OS crash or power cut may lose the lines not yet
  shipped (as the file device, which does not fsync per entry either);
- the records reach the database in order, each exactly once; while they cannot (database
  down, locked), reads go on for at most the budget (``--db-budget``) or ``MAX_BACKLOG``
  records, then fail with 503 until the backlog drains: never an unbounded blind spot;
- the journal of a process that died (kill -9, crash) is shipped by the next server process
  to start on this home (uvicorn's replacement worker, the next ``serve``) from its mark; a
  batch committed whose mark was not yet written is found in the database, not written twice;
- a clean stop ships everything and removes its files.

The files (one journal per server process, under its ``flock``, and its ``.shipped`` mark)
are ``keyvault.http.journal_files``. Past ``ROLL_BYTES`` a process starts a new journal;
the old one goes once all its lines are in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from keyvault.http.audit_writer import AuditEntry, AuditUnavailable, AuditWriter, record_of
from keyvault.http.journal_files import (
    FIELDS,
    JournalFile,
    Orphan,
    claim_orphans,
    private_directory,
)
from keyvault.models import AuditRecord
from keyvault.services.audit_chain import canonical_at

log = logging.getLogger("keyvault.audit")
MAX_BACKLOG = 100_000  # records written to the journal, not yet to the database
ROLL_BYTES = 16 * 1024 * 1024  # a process's journal past this size: start a new one
_RETRY_FIRST, _RETRY_MAX = 0.05, 1.0  # seconds between attempts while the database refuses


@dataclass
class _Queued:
    entry: AuditEntry
    file: JournalFile
    since: float  # event-loop time it was written to the journal


class JournalAuditWriter(AuditWriter):
    """``[audit] durability = "journal"``: ``record`` returns once the line is in the journal.

    One shipping task on the event loop then appends the records to the chain as ``fast``
    commits: on PostgreSQL one statement on an async connection of its own, else (SQLite, the
    locked way, a statement whose answer was lost) through ``AuditWriter``'s thread.
    """

    def __init__(self, *args: Any, directory: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs, durability="journal")
        self.directory = directory
        self._queue: deque[_Queued] = deque()
        self._file: JournalFile | None = None
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self._shipper: asyncio.Task[None] | None = None
        self._retry = _RETRY_FIRST
        self._failing = False  # the last batch failed: shipping is behind
        self.replayed = 0  # records shipped from orphaned journals
        self.writer_id = secrets.token_hex(6)
        self._files = 0
        # PostgreSQL: the async connection of the one-statement appends, its backend's pid,
        # and the linked records of a statement whose answer was lost (maybe committed).
        self._aconn: Any = None
        self._async_pid: int | None = None
        self._unsure: list[dict[str, Any]] | None = None

    def start(self) -> None:
        private_directory(self.directory)
        super().start()
        self._file = self._new_file()
        self._shipper = asyncio.get_running_loop().create_task(self._ship())

    async def record(self, entry: AuditEntry, timeout: float | None = None) -> None:
        """Write ``entry`` to the journal; ``AuditUnavailable`` if it cannot be, or if the
        database has not taken the journal's records for the budget (fail closed)."""
        self._refuse_if_behind()
        self._append(entry)

    def submit(self, entry: AuditEntry) -> None:
        """Journal the record of a request that failed anyway, unless the backlog is full
        (a flood of refused requests while the database is away must not fill the memory)."""
        if self._running and self._file is not None and len(self._queue) < MAX_BACKLOG:
            with contextlib.suppress(AuditUnavailable):
                self._append(entry)

    def _new_file(self) -> JournalFile:
        self._files += 1
        return JournalFile.create(self.directory, self.writer_id, self._files)

    def _connect(self) -> Any:
        """The writer's connection, named after this writer on PostgreSQL: should this
        process die with a batch waiting on a lock there, the process that ships its journal
        ends that session first (``_end_sessions``), so the batch cannot commit after the
        check for what is already in."""
        conn = super()._connect()
        if not self._sqlite:
            cur = conn.cursor()
            try:
                cur.execute(
                    "SELECT set_config('application_name', %s, false)",
                    (_session_name(self.writer_id),),
                )
            finally:
                cur.close()
        return conn

    @property
    def backlog(self) -> int:
        """Records in the journal, not yet in the database."""
        return len(self._queue)

    def _refuse_if_behind(self) -> None:
        if not self._running or self._file is None or self._loop is None:
            raise AuditUnavailable("the audit writer is not running", hint="restart the server")
        if self._queue and (
            len(self._queue) >= MAX_BACKLOG
            or self._loop.time() - self._queue[0].since > self.timeout
        ):
            raise AuditUnavailable(
                f"the database has not taken audit records for {self.timeout:g}s "
                f"({len(self._queue)} waiting in the journal)",
                hint="check the database; reads resume once the journal is shipped",
            )

    def _append(self, entry: AuditEntry) -> None:
        file, loop = self._file, self._loop
        assert file is not None and loop is not None
        try:
            if file.size >= ROLL_BYTES:
                file = self._roll(file)
            file.append(entry)
        except OSError as exc:
            log.error("audit journal write failed: %s", exc)
            raise AuditUnavailable(
                "the audit journal could not be written", hint=f"check {self.directory}"
            ) from None
        self._queue.append(_Queued(entry, file, loop.time()))
        self._wake.set()

    def _roll(self, old: JournalFile) -> JournalFile:
        """A new journal for new lines; the old one goes once its last line is shipped."""
        self._file = self._new_file()
        if old.shipped == old.lines:
            old.remove()
        return self._file

    async def _ship(self) -> None:
        """The shipping task; should it fail (a bug), reads are refused, not left unshipped."""
        try:
            await self._ship_all()
        except Exception:
            log.exception("audit journal: shipping stopped; key reads are refused")
            self._running = False
            raise

    async def _ship_all(self) -> None:
        """Orphaned journals first, then this process's, until stopped."""
        assert self._loop is not None
        # Read in the thread: a dead process's journal may be many MB.
        orphans = await self._loop.run_in_executor(self._thread, claim_orphans, self.directory)
        for orphan in orphans:
            await self._ship_orphan(orphan)
        while self._running or (self._queue and not self._stopped.is_set()):
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._ship_batch()
        while self._queue:  # stopping: one more try each, then the journal keeps the rest
            if not await self._ship_batch():
                return

    async def _ship_batch(self) -> bool:
        batch = [self._queue[i] for i in range(self._batch_size(len(self._queue)))]
        if not await self._commit([q.entry for q in batch]):
            return False
        for _ in batch:
            self._queue.popleft()
        for file in {id(q.file): q.file for q in batch}.values():
            file.mark(file.shipped + sum(1 for q in batch if q.file is file))
            if file is not self._file and file.shipped == file.lines:
                file.remove()
        return True

    def _batch_size(self, waiting: int) -> int:
        """The next batch: the one whose answer was lost again, if one was (it may be in:
        ``_settle_unsure`` checks it as it was), else as many as a batch takes."""
        return len(self._unsure) if self._unsure is not None else min(waiting, self._max_batch)

    async def _commit(self, entries: list[AuditEntry]) -> bool:
        """Append ``entries`` to the chain (one batch); False, after a pause, if it failed.

        On PostgreSQL the common case is one statement on the writer's async connection, on
        the event loop: no hand-off to the writer's thread, whose GIL hand-offs delayed the
        requests arriving meanwhile (p99 at 1 connection: ~5 ms through the thread, ~1.5-2
        on the loop). The rest (the locked way after another process moved the head, a
        statement whose answer was lost) goes through the thread, as in ``AuditWriter``.
        """
        assert self._loop is not None
        records = [record_of(e) for e in entries]
        if self._unsure is None and not self._sqlite and await self._append_on_loop(records):
            return self._succeeded()
        run = self._loop.run_in_executor
        unsure = self._unsure
        self._appender.sent = None  # set again only by a statement this attempt sends
        if unsure is not None:  # a statement's answer was lost: it may be in already
            error = await run(self._thread, self._settle_unsure, unsure, records)
        else:
            pairs: list[tuple[AuditEntry, asyncio.Future[None] | None]] = [
                (e, None) for e in entries
            ]
            error = await run(self._thread, self._write_batch, pairs, None)
        if error is None:
            self._unsure = None
            if unsure is not None:
                self.batches += 1
                self.written += len(records)
            return self._succeeded()
        if not self._sqlite:  # the statement sent now, else still the one before (if any)
            self._unsure = self._appender.sent or unsure
        await self._failed(error)
        return False

    async def _append_on_loop(self, records: list[dict[str, Any]]) -> bool:
        """The one-statement append on the async connection; False: not appended (no end
        known, backing off, the head moved, or failed: then ``_unsure``)."""
        fast = self._appender.fast_statement(records, None)
        if fast is None:
            return False
        try:
            conn = await self._async_connection()
            async with conn.cursor() as cur:
                await asyncio.wait_for(cur.execute(fast.sql, fast.params), self.timeout)
                rowcount = cur.rowcount
        except Exception as exc:  # noqa: BLE001 - lost, refused, timed out: maybe committed
            log.warning("audit journal: append on the async connection failed: %s", exc)
            self._unsure = fast.linked
            await self._drop_async_connection()
            return False
        if not self._appender.fast_result(fast, rowcount):
            return False
        self.batches += 1
        self.written += len(records)
        if self._chain.sink is not None:  # a file or a pipe: written in the thread, in order
            assert self._loop is not None
            await self._loop.run_in_executor(self._thread, self._chain.sink.write, fast.linked)
        return True

    def _settle_unsure(
        self, unsure: list[dict[str, Any]], records: list[dict[str, Any]]
    ) -> Exception | None:
        """In the writer's thread: end the session that sent ``unsure`` (so it cannot commit
        after the check), then append ``records`` unless ``unsure`` is in the log."""
        try:
            if self._async_pid is not None:
                self._end_sessions(pid=self._async_pid)
                self._async_pid = None
        except Exception as exc:  # noqa: BLE001 - the database is away: try again later
            return AuditUnavailable(f"the audit records wait: {exc}")
        return self._finish_lost(unsure, records, None)

    async def _async_connection(self) -> Any:
        if self._aconn is not None and not self._aconn.closed:
            return self._aconn
        cargs, cparams = self._engine.dialect.create_connect_args(self._engine.url)
        connect = psycopg.AsyncConnection.connect(*cargs, **cparams, autocommit=True)
        conn = await asyncio.wait_for(connect, self.timeout)
        wait_ms = max(1, int(self.timeout * 1000))
        for setting in ("synchronous_commit TO off", f"lock_timeout = {wait_ms}",
                        f"statement_timeout = {wait_ms}"):  # fmt: skip
            await conn.execute(f"SET {setting}")
        name = _session_name(self.writer_id)
        await conn.execute("SELECT set_config('application_name', %s, false)", (name,))
        self._aconn, self._async_pid = conn, conn.info.backend_pid
        return conn

    async def _drop_async_connection(self) -> None:
        conn, self._aconn = self._aconn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)

    def _succeeded(self) -> bool:
        if self._failing:
            log.warning("audit journal: the database takes records again")
        self._retry, self._failing = _RETRY_FIRST, False
        return True

    async def _failed(self, error: Exception) -> bool:
        """Log a failed attempt and pause before the next; False if stopping."""
        if not self._failing:
            log.error("audit journal: records wait in %s: %s", self.directory, error)
        self._failing = True
        pause, self._retry = self._retry, min(self._retry * 2, _RETRY_MAX)
        await self._pause(pause)
        return not self._stopped.is_set()

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the writer stops meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    async def _ship_orphan(self, orphan: Orphan) -> None:
        if orphan.unreadable:
            log.error(
                "audit journal %s: %d line(s) are not records (torn by a crash?): skipped",
                orphan.file.path, orphan.unreadable,
            )  # fmt: skip
        entries, ends, file = orphan.entries, orphan.ends, orphan.file
        checking = True  # what it committed is a prefix: checked until a chunk is not all in
        while entries and not self._stopped.is_set():
            done = 0
            if checking:
                chunk = entries[: self._max_batch]
                found = await self._already_committed(file.writer_id, chunk)
                if found is None:
                    break
                done, checking = found, found == len(chunk)
            if done == 0:
                batch = entries[: self._batch_size(len(entries))]
                if not await self._commit(batch):
                    continue
                done = len(batch)
                self.replayed += done
            file.mark(ends[done - 1])
            entries, ends = entries[done:], ends[done:]
        if entries:  # stopped first: left for the next process to start
            await self._forget_unsure()
            file.close()
            return
        log.warning("audit journal %s of a process gone: shipped", file.path)
        file.remove()

    async def _forget_unsure(self) -> None:
        """Give up a batch whose answer was lost (its journal is left to the next start,
        whose check finds it if it is in): end this writer's sessions, the async one's and
        the thread's (either may have sent it), so it cannot commit after that check."""
        unsure, self._unsure = self._unsure, None
        if unsure is None or self._sqlite or self._loop is None:
            return
        self._broken = True  # the thread reconnects before its next statement
        await self._drop_async_connection()  # and the loop opens a new one
        with contextlib.suppress(Exception):
            run = self._loop.run_in_executor
            await run(self._thread, lambda: self._end_sessions(writer_id=self.writer_id))

    async def _already_committed(self, writer_id: str, entries: list[AuditEntry]) -> int | None:
        """How many of ``entries`` (an orphan's first unshipped lines) are in the database
        already: its last batch may have committed before its mark was written. None: we
        stopped before the database answered."""
        if not entries:
            return 0
        assert self._loop is not None
        while True:  # the database may be away at start, as at any time
            try:
                run = self._loop.run_in_executor
                return await run(self._thread, self._committed_prefix, writer_id, entries)
            except Exception as exc:  # noqa: BLE001 - retried until it answers or we stop
                if not await self._failed(exc):
                    return None

    def _committed_prefix(self, writer_id: str, entries: list[AuditEntry]) -> int:
        if not self._sqlite:
            self._end_sessions(writer_id=writer_id)
        records = [record_of(e) for e in entries]
        ats = [canonical_at(r["at"]) for r in records]
        low, high = (datetime.fromisoformat(at).replace(tzinfo=UTC) for at in (min(ats), max(ats)))
        with Session(self._engine) as session:
            rows = session.scalars(
                select(AuditRecord).where(AuditRecord.at.between(low, high))
            ).all()
            found = Counter(_key(canonical_at(r.at), vars(r)) for r in rows)
        done = 0
        for at, record in zip(ats, records, strict=True):
            key = _key(at, record)
            if found[key] <= 0:  # each row in the log matches one record, no more
                break
            found[key] -= 1
            done += 1
        return done

    def _end_sessions(self, *, writer_id: str | None = None, pid: int | None = None) -> None:
        """End database sessions (a dead writer's, named after ``writer_id``; or the one of
        ``pid``) and wait until they are gone: PostgreSQL keeps a session whose client died
        or gave up while its statement waits for a lock, and that statement may commit."""
        name = _session_name(writer_id) if writer_id is not None else None
        deadline = time.monotonic() + self.timeout
        with Session(self._engine) as session:
            while ended := session.scalar(_END_SESSIONS, {"name": name, "pid": pid}):
                log.warning("audit journal: ended %d session(s) of %s", ended, name or pid)
                session.rollback()  # a new snapshot of pg_stat_activity
                if time.monotonic() > deadline:
                    raise AuditUnavailable(
                        f"the database session {name or pid!r} of an audit writer does not end",
                        hint="end it with pg_terminate_backend, then restart the server",
                    )
                time.sleep(0.05)

    async def stop(self) -> None:
        """Ship what is queued (one more attempt if the database refuses), then stop; what
        is left stays in the journal for the next process on this home to ship."""
        self._running = False
        self._stopped.set()
        self._wake.set()
        if self._shipper is not None:  # timed out, cancelled or failed (logged by _ship):
            with contextlib.suppress(Exception, asyncio.CancelledError):  # clean up anyway
                await asyncio.wait_for(self._shipper, 2 * self.timeout)
        if self._file is not None:
            if not self._queue and self._file.shipped == self._file.lines:
                self._file.remove()
            else:
                log.error(
                    "audit journal: %d record(s) left in %s for the next start to ship",
                    len(self._queue), self.directory,
                )  # fmt: skip
                self._file.close()
        await self._drop_async_connection()
        await super().stop()


def _key(at: str, record: dict[str, Any]) -> tuple[Any, ...]:
    return (at, *(record.get(f) for f in FIELDS))


_END_SESSIONS = text(
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
    " WHERE (application_name = :name OR pid = :pid) AND pid <> pg_backend_pid()"
)


def _session_name(writer_id: str) -> str:
    return f"keyvault-audit-journal {writer_id}"
