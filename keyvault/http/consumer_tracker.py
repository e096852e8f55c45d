"""Who holds which key: the server's record of which consumer read which version.

Every key read the fast path answers (200 or 304) calls ``ConsumerTracker.seen``: the
consumer is the token's name plus the name the client sends in ``X-Keyvault-Consumer``
(1-64 characters of ``[A-Za-z0-9._:@-]``; anything else, or no header, counts as the client
address). ``seen`` only touches an in-memory map on the event loop, so a steady consumer
costs a dict lookup per read; the map is written to ``consumer_reads`` (one upsert per
entry) by a thread of its own, only when an entry changed: a new consumer, a new version,
or a refresh of ``last_read_at`` once the last write is ``REFRESH_SECONDS`` old.

Staleness is bounded: an entry that changes is written within ``FLUSH_DELAY`` seconds (0.2 s,
plus the time of the write; a failed write, e.g. a locked database, is retried after
``RETRY_FIRST`` seconds, doubling up to ``RETRY_MAX``, while entries wait), so
``keyvault consumers`` and a waiting ``rotate --wait-propagation`` see a consumer on its new key within about a second.

Memory and the table are bounded: at most ``MAX_ENTRIES_PER_TOKEN`` (consumer, cluster,
scope) entries per token in each server process, and a write inserts a new row only while
the token has fewer rows than that (one more per concurrent writer at worst); a client
sending ever new names past the cap is still served, its new names are not recorded, and
the server logs it once per token. Rows not read for ``RETENTION`` (30 days) are deleted, and
so are such entries from memory (``evict_idle``, hourly): they stop counting against the cap.

After a write that moved consumers to a new version, the same thread checks whether the
scope's latest rotation has propagated (every consumer seen in 30 days holds its version)
and, if so, records ``rotation.propagated`` once (``services.propagation.claim_propagated``).

This module commits on purpose (like the audit writer): its own transactions, in its own
thread, never on the event loop. ``KEYVAULT_TRACK_CONSUMERS=0`` turns tracking off.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, bindparam, delete, text
from sqlalchemy.orm import Session, sessionmaker

from keyvault.db import session_factory, transaction
from keyvault.models import ConsumerRead, UTCDateTime, utcnow
from keyvault.services.propagation import RETENTION, check_scopes

log = logging.getLogger("keyvault.consumers")
CONSUMER_HEADER = b"x-keyvault-consumer"
CONSUMER_NAME = re.compile(r"[A-Za-z0-9._:@-]{1,64}")
MAX_ENTRIES_PER_TOKEN = 1000
FLUSH_DELAY = 0.2  # seconds an entry may wait, so that a burst of reads is one write
REFRESH_SECONDS = 60.0  # last_read_at is rewritten at most this often per consumer
RETRY_FIRST, RETRY_MAX = 0.5, 30.0  # seconds between tries of a failed write (doubling)
_PRUNE_EVERY = 3600.0  # seconds between deletions of rows older than RETENTION
_NAME_CACHE_LIMIT = 4096
Key = tuple[str, str, str, str]  # token, consumer, cluster, scope

_UPSERT = text(
    "INSERT INTO consumer_reads"
    " (token_name, consumer, cluster, scope, version, version_seen_at, last_read_at)"
    # Typed: PostgreSQL cannot deduce one type for a parameter used in SELECT and WHERE.
    " SELECT CAST(:token AS VARCHAR(64)), CAST(:consumer AS VARCHAR(64)),"
    " CAST(:cluster AS VARCHAR(64)), CAST(:scope AS VARCHAR(80)), CAST(:version AS INTEGER),"
    " :seen, :last"
    " WHERE (SELECT count(*) FROM consumer_reads WHERE token_name = :token) < :cap"
    " OR EXISTS (SELECT 1 FROM consumer_reads WHERE token_name = :token"
    " AND consumer = :consumer AND cluster = :cluster AND scope = :scope)"
    " ON CONFLICT (token_name, consumer, cluster, scope) DO UPDATE SET"
    " version = excluded.version,"
    " version_seen_at = CASE WHEN consumer_reads.version = excluded.version"
    " THEN consumer_reads.version_seen_at ELSE excluded.version_seen_at END,"
    " last_read_at = excluded.last_read_at"
    # Several servers write the same consumer: the latest read wins, whatever the order.
    " WHERE excluded.last_read_at >= consumer_reads.last_read_at"
).bindparams(bindparam("seen", type_=UTCDateTime), bindparam("last", type_=UTCDateTime))


class _Entry:
    __slots__ = ("last_read", "refresh_due", "version", "version_seen")

    def __init__(self, version: int, now: float) -> None:
        self.version, self.version_seen, self.last_read = version, now, now
        self.refresh_due = 0.0


_names: dict[bytes, str | None] = {}  # raw header value -> the valid name (or None)


def consumer_name(scope: MutableMapping[str, Any], client: str | None) -> str:
    """The consumer a request names (``X-Keyvault-Consumer``), else its client address."""
    for key, value in scope["headers"]:
        if key == CONSUMER_HEADER:
            name = _names.get(value, "")
            if name == "":  # not seen yet: checked once, remembered while the cache is small
                text = value.decode("latin-1")
                name = text if CONSUMER_NAME.fullmatch(text) else None
                if len(_names) < _NAME_CACHE_LIMIT:
                    _names[value] = name
            if name is not None:
                return name
            break
    return (client or "unknown")[:64]


class ConsumerTracker:
    """The in-memory map of one server process and the thread that writes it."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_per_token: int = MAX_ENTRIES_PER_TOKEN,
        flush_delay: float = FLUSH_DELAY,
        refresh_seconds: float = REFRESH_SECONDS,
    ) -> None:
        self.factory: sessionmaker[Session] = session_factory(engine)
        self.max_per_token = max_per_token
        self.flush_delay = flush_delay
        self.refresh_seconds = refresh_seconds
        self._entries: dict[Key, _Entry] = {}
        self._per_token: dict[str, int] = {}
        self._full: set[str] = set()  # tokens whose cap was reached (logged once)
        self._dirty: set[Key] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._next_prune = 0.0
        self._thread = threading.Thread(target=self._run, name="keyvault-consumers", daemon=True)
        self.writes = 0  # rows written (tests and logs)

    def start(self) -> ConsumerTracker:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Write what is pending, then stop the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(10)

    def seen(
        self,
        scope: MutableMapping[str, Any],
        token: str,
        client: str | None,
        cluster: str | None,
        key_scope: str | None,
        version: int | None,
    ) -> None:
        """A read of ``version`` was answered (on the event loop: memory only, no I/O)."""
        if cluster is None or key_scope is None or version is None:
            return
        key = (token, consumer_name(scope, client), cluster, key_scope)
        now = time.time()
        entry = self._entries.get(key)
        if entry is not None and entry.version == version:
            entry.last_read = now
            if now < entry.refresh_due:
                return  # the steady state: nothing to write
        elif entry is not None:
            entry.version, entry.version_seen, entry.last_read = version, now, now
        elif not self._admit(token):
            return
        else:
            entry = self._entries[key] = _Entry(version, now)
        with self._lock:
            entry.refresh_due = float("inf")  # until written: one dirty mark is enough
            self._dirty.add(key)
        self._wake.set()

    def _admit(self, token: str) -> bool:
        with self._lock:  # evict_idle decrements from the writer thread
            count = self._per_token.get(token, 0)
            if count < self.max_per_token:
                self._per_token[token] = count + 1
                return True
            first = token not in self._full
            self._full.add(token)
        if first:
            log.warning(
                "token %r read keys as more than %d consumers and scopes: the new ones are "
                "not tracked (see docs/propagation.md)",
                token, self.max_per_token,
            )  # fmt: skip
        return False

    def evict_idle(self, now: float) -> int:
        """Drop the entries not read for ``RETENTION`` (gone, or forgotten with `keyvault
        consumers forget`) from memory, so that they no longer count against their token's
        cap; an entry still waiting to be written stays. Returns how many went."""
        horizon = now - RETENTION.total_seconds()
        gone = 0
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.last_read < horizon and key not in self._dirty:
                    del self._entries[key]
                    self._per_token[key[0]] -= 1
                    self._full.discard(key[0])  # below the cap again: log if reached anew
                    gone += 1
        return gone

    def _run(self) -> None:
        backoff: float | None = None  # after a failed write: seconds until the next try
        while True:
            # A failed write's entries stay dirty but a steady consumer marks nothing new
            # (``seen`` returns early), so nothing would wake us: retry on our own.
            self._wake.wait(backoff)
            if not self._stopping:
                time.sleep(self.flush_delay)  # gather a burst (after a rotation) into one write
            self._wake.clear()
            try:
                self.flush()
                backoff = None
            except Exception as exc:  # noqa: BLE001 - retried with a capped backoff; reads go on
                backoff = min(RETRY_MAX, 2 * backoff) if backoff else RETRY_FIRST
                log.warning("could not record consumer reads (retry in %gs): %s", backoff, exc)
                with self._lock:
                    if not self._dirty:
                        backoff = None  # only the pruning failed: it runs again next write
            if self._stopping:
                return

    def _take(self) -> list[dict[str, Any]]:
        now = time.time()
        with self._lock:
            keys, self._dirty = self._dirty, set()
            rows = []
            for key in keys:
                entry = self._entries.get(key)
                if entry is None:  # evicted while a read marked it: its next read re-adds it
                    continue
                entry.refresh_due = now + self.refresh_seconds
                rows.append(_row(key, entry, self.max_per_token))
        return rows

    def flush(self) -> int:
        """Write the changed entries (in this thread) and, in the same transaction, check the
        scopes they read: a rotation whose consumers now all hold its key is recorded."""
        rows = self._take()
        if rows:
            scopes = sorted({(r["cluster"], r["scope"]) for r in rows})
            try:
                with transaction(self.factory) as session:
                    _lock_scopes(session, scopes)
                    session.execute(_UPSERT, rows)
                    recorded = check_scopes(session, scopes)
            except Exception:
                self._redo(rows)
                raise
            self.writes += len(rows)
            for rid in recorded:
                log.info("rotation %s propagated: every known consumer holds its key", rid)
        self._prune()
        return len(rows)

    def _redo(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            for r in rows:
                key = (r["token"], r["consumer"], r["cluster"], r["scope"])
                if (entry := self._entries.get(key)) is not None:
                    entry.refresh_due = float("inf")
                    self._dirty.add(key)

    def _prune(self) -> None:
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + _PRUNE_EVERY
        with transaction(self.factory) as session:
            session.execute(
                delete(ConsumerRead).where(ConsumerRead.last_read_at < utcnow() - RETENTION)
            )
        self.evict_idle(time.time())


def _lock_scopes(session: Session, scopes: list[tuple[str, str]]) -> None:
    """PostgreSQL: one server at a time writes and checks a scope (a transaction-scoped
    advisory lock, taken in sorted order), so that two servers writing the last two stale
    consumers at once cannot each miss the other's write. SQLite serialises writers anyway."""
    if session.get_bind().dialect.name != "postgresql":
        return
    for cluster, scope in scopes:
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:name))"),
            {"name": f"keyvault/consumers/{cluster}/{scope}"},
        )


def _row(key: Key, entry: _Entry, cap: int) -> dict[str, Any]:
    token, consumer, cluster, scope = key
    return {
        "token": token,
        "consumer": consumer,
        "cluster": cluster,
        "scope": scope,
        "version": entry.version,
        "seen": _at(entry.version_seen),
        "last": _at(entry.last_read),
        "cap": cap,
    }


def _at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


__all__ = ["ConsumerTracker", "consumer_name"]
