"""Per-process server state: database, keyring, and caches that are never stale.

Any commit that changes keys or tokens bumps the ``revision`` counter in the same
transaction; the caches hold only what was read at the revision a request knows, so they
are dropped before a request could see an old key or a revoked token. How a request knows
the revision (``ensure_fresh``):

- SQLite, or PostgreSQL while the change listener is not connected: it reads the counter
  (one tiny query).
- PostgreSQL with the listener connected (keyvault/http/revision_listener.py): the revision
  the listener heard of by NOTIFY, no query; and at most every ``recheck`` seconds (default
  1 s, ``KEYVAULT_REVISION_RECHECK_MS``) one request reads the counter anyway. That bounds
  what a lost notification can cost: a revoked token or an old key served for at most
  ``recheck`` plus one query's round trip after the commit.

No database call runs on the event loop: requests hand them to ``blocking()`` (a pool of
database threads) and wait at most ``db_budget`` seconds, then answer 503. A locked table
or a stuck writer delays the requests that need the database, never ``/healthz``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from keyvault.config import Settings
from keyvault.db import make_engine, require_head, session_factory, transaction
from keyvault.errors import DatabaseError, Forbidden, NotFound, Unauthorized
from keyvault.http.audit_journal import JournalAuditWriter
from keyvault.http.audit_writer import AuditWriter
from keyvault.http.headers import bearer_token
from keyvault.http.revision_listener import ChangeSignal, RevisionListener
from keyvault.models import (
    CURRENT,
    AccessToken,
    Cluster,
    MasterKey,
    Secret,
    SecretVersion,
    utcnow,
)
from keyvault.services.audit_chain import chain_for
from keyvault.services.secrets import reveal
from keyvault.services.store import open_keyring
from keyvault.services.tokens import Grant, check_token, token_hash

_NEGATIVE_CACHE_LIMIT = 10_000
# Seconds a cached token, grant or key is used before it is read again, whatever the revision
# counter says: the bound on a revoked token or an old key served when that counter was
# rewound or frozen by a database writer (docs/security.md).
CACHE_LIFETIME = 1.0
Stamp = tuple[int, int]  # (revision counter, CACHE_LIFETIME period) a cache entry was read at
DB_BUDGET = 5.0  # seconds a request waits for the database (its audit record included)
_DB_THREADS = 8  # database calls in flight at once; more wait their turn (within the budget)
_LOAD_STRIPES = 16  # locks the cache loads are spread over (by what they load)
# PostgreSQL connections of one server process (one --workers worker), opened as needed and
# kept: one per database thread; one each held by the audit writer and the revision probe;
# one each for the consumer tracker, the webhook worker and the scheduler; a few more for
# rotations (their own threads) before a caller waits. Plus the listener's own connection.
# docs/deployment.md, "Read performance".
_POOL = {"pool_size": _DB_THREADS + 5, "max_overflow": 4}
RECHECK_ENV = "KEYVAULT_REVISION_RECHECK_MS"  # set by `keyvault serve --revision-recheck-ms`
RECHECK_MS = 1000
T = TypeVar("T")
log = logging.getLogger(__name__)


def recheck_seconds() -> float:
    """How often a listening server reads the revision counter anyway (0: every request)."""
    return max(0, int(os.environ.get(RECHECK_ENV) or RECHECK_MS)) / 1000


@dataclass(frozen=True)
class KeyEntry:
    """A current key, its response body prepared once."""

    version: int
    etag: str
    body: bytes = field(repr=False)


class ServerState:
    """Database, keyring, caches and the audit writer of one server process."""

    def __init__(
        self,
        settings: Settings,
        *,
        db_budget: float = DB_BUDGET,
        recheck: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.clock = clock  # injected by tests: the caches' lifetime (CACHE_LIFETIME)
        self.db_budget = db_budget
        self.recheck = recheck_seconds() if recheck is None else recheck
        self._recheck_due = 0.0  # monotonic time of the next read of the counter (listening)
        self._recheck_lock = threading.Lock()
        self.engine = make_engine(settings.database_url, pool=_POOL)
        require_head(self.engine)
        self.factory = session_factory(self.engine)
        with transaction(self.factory) as session:
            self.keyring = open_keyring(session, settings=settings)
        # The sink "-" is the server's stdout (journald); opened now: a bad sink fails the start.
        self.audit = _audit_writer(self.engine, settings, db_budget)
        self._db_threads = ThreadPoolExecutor(_DB_THREADS, thread_name_prefix="keyvault-db")
        self._lock = threading.Lock()
        self._revision: Stamp | None = None
        self._cache_lock = threading.Lock()  # the caches and _revision, between db threads
        self._seen = threading.local()  # the stamp (revision, period) the current request read
        # One loader per token or key at a time: the requests that miss the same entry at
        # once (every CACHE_LIFETIME, under load) wait for the first one's read, not all query.
        self._loading = tuple(threading.Lock() for _ in range(_LOAD_STRIPES))
        # Each entry: (the stamp it was read at, the value).
        self._keys: dict[tuple[str, str], tuple[Stamp, KeyEntry | None]] = {}
        self._tokens: dict[str, tuple[Stamp, AccessToken | None]] = {}
        self._grants: dict[str, tuple[Stamp, Grant]] = {}
        self._probe = self._open_probe()
        # PostgreSQL: told of changes (started by start()); SQLite: no NOTIFY, the counter is
        # read by every request, and a change seen there wakes this process's long-polls.
        self.listener: RevisionListener | None = None
        self.changes = ChangeSignal()
        if self.engine.dialect.name == "postgresql":
            self.listener = RevisionListener.for_engine(self.engine)
            self.changes = self.listener.changes
        self.stopping = False  # set by stop_waiting(): long-polls answer at once

    def stop_waiting(self) -> None:
        """The server is stopping: wake every long-poll, and let none wait from now on (on the
        event loop's thread)."""
        self.stopping = True
        self.changes.fire()

    def _open_probe(self) -> Any:
        probe = self.engine.raw_connection()
        if self.engine.dialect.name == "postgresql":
            driver: Any = probe.driver_connection
            driver.autocommit = True
            cur = probe.cursor()
            try:  # a locked table fails the probe after the budget (the thread is freed)
                cur.execute(f"SET statement_timeout = {max(1, int(self.db_budget * 1000))}")
            finally:
                cur.close()
        return probe

    def deadline(self) -> float:
        """When a request starting now has used up its budget (event-loop time)."""
        return asyncio.get_running_loop().time() + self.db_budget

    async def blocking(
        self, call: Callable[..., T], *args: Any, deadline: float | None = None
    ) -> T:
        """``call(*args)`` in a database thread; ``DatabaseError`` if it takes over the budget
        (or runs past ``deadline``: what is left of the request's budget)."""
        loop = asyncio.get_running_loop()
        budget = self.db_budget if deadline is None else max(0.0, deadline - loop.time())
        pending = loop.run_in_executor(self._db_threads, call, *args)
        try:
            return await asyncio.wait_for(pending, budget)
        except TimeoutError:
            raise DatabaseError(
                f"the database did not answer within {self.db_budget:g}s",
                hint="check the database for a long transaction or a lock",
            ) from None

    def start(self) -> None:
        self.audit.start()
        if self.listener is not None:
            self.listener.start()

    async def aclose(self) -> None:
        await self.audit.stop()
        if self.listener is not None:
            # Joins a thread that wakes every 0.5 s: not on the event loop.
            await asyncio.get_running_loop().run_in_executor(None, self.listener.stop)
        self._db_threads.shutdown(wait=False, cancel_futures=True)
        self.close()

    def close(self) -> None:
        self._probe.close()
        self.engine.dispose()

    def database_revision(self) -> int:
        """The revision counter, read outside any transaction (one small query).

        If the database dropped the probe connection (restart, failover), it is reopened once;
        if that fails too the request gets ``DatabaseError`` (503), and the next one tries again.
        """
        with self._lock:
            try:
                return self._read_revision()
            except Exception:  # noqa: BLE001 - a raw DBAPI connection raises the driver's errors
                pass
            try:
                try:  # noqa: SIM105
                    self._probe.invalidate()
                except Exception:  # noqa: BLE001 - it is broken already
                    pass
                self._probe = self._open_probe()
                return self._read_revision()
            except Exception as exc:  # noqa: BLE001
                raise DatabaseError(
                    f"cannot read the revision counter ({type(exc).__name__})",
                    hint="check the database",
                ) from None

    def _read_revision(self) -> int:
        cur = self._probe.cursor()
        try:
            cur.execute("SELECT value FROM revision WHERE id = 1")
            return cur.fetchone()[0]
        finally:
            cur.close()

    def ensure_fresh(self) -> None:
        """Learn the revision for this request (this database thread); the caches answer it
        only with what was read at that same revision."""
        revision = self._current_revision()
        # The stamp also changes every CACHE_LIFETIME seconds: a cached token or key is read
        # again then even if the counter never moves (a database writer can rewind or freeze
        # it; rows it changed meanwhile are checked again, their MACs included).
        stamp = (revision, int(self.clock() // CACHE_LIFETIME))
        self._seen.revision = stamp
        with self._cache_lock:
            if stamp != self._revision:  # only what this stamp reads is of use now
                advanced = self._revision is not None and revision > self._revision[0]
                self._keys.clear()
                self._tokens.clear()
                self._grants.clear()
                self._revision = stamp
            else:
                advanced = False
        if advanced and self.listener is None:
            self.changes.fire()  # SQLite: a change this process saw wakes its long-polls

    def _current_revision(self) -> int:
        """The listener's revision while it is connected and the periodic check is not due;
        else the counter, read from the database."""
        heard = self.listener.revision() if self.listener is not None else None
        if heard is None:
            return self.database_revision()
        now = time.monotonic()
        if now < self._recheck_due:  # the common case: no lock, no query
            return heard
        with self._recheck_lock:
            if now < self._recheck_due:
                return heard
            # Due now: this request reads the counter, the others meanwhile use what was heard.
            self._recheck_due = now + self.recheck
        revision = self.database_revision()
        if revision > heard:
            assert self.listener is not None
            # Usually a notification still on its way; a lost one is caught here.
            log.debug("revision %d read before it was heard (heard %d)", revision, heard)
            self.listener.advance(revision)
        return max(revision, heard)

    def cached_read(
        self, authorization: str | None, cluster: str, scope: str
    ) -> tuple[Grant, KeyEntry] | None:
        """The grant and the key of a read, from memory alone (no I/O: for the event loop).

        Only what the database thread's way (``ensure_fresh``, ``authenticate``,
        ``key_entry``) would answer from its caches without a query: the listener connected
        and no re-check of the counter due, the stamp the caches hold the current one, and
        the token, its grant and the key cached at that stamp, the token unexpired, the
        scope granted. Anything else is None, and the request takes that way (which also
        answers every refusal), so this never serves what it would not."""
        if self.listener is None:  # SQLite: the counter is read by every request
            return None
        heard = self.listener.revision()
        if heard is None or time.monotonic() >= self._recheck_due:
            return None
        stamp = (heard, int(self.clock() // CACHE_LIFETIME))
        if stamp != self._revision:
            return None
        token = bearer_token(authorization)
        if token is None:
            return None
        digest = token_hash(token)
        row, granted, key = (
            self._tokens.get(digest),
            self._grants.get(digest),
            self._keys.get((cluster, scope)),
        )
        if row is None or granted is None or key is None:
            return None
        if row[0] != stamp or granted[0] != stamp or key[0] != stamp:
            return None
        token_row, grant, entry = row[1], granted[1], key[1]
        if token_row is None or entry is None or not grant.allows(cluster, scope):
            return None
        if token_row.expires_at is not None and token_row.expires_at <= utcnow():
            return None
        return grant, entry

    def _revision_seen(self) -> Stamp | None:
        return getattr(self._seen, "revision", None)

    def authenticate(self, authorization: str | None, now: datetime | None = None) -> Grant:
        """The grant of a ``Bearer`` token, or ``Unauthorized``."""
        token = bearer_token(authorization)  # the scheme in any case (RFC 9110 §11.1)
        if token is None:
            raise Unauthorized("missing bearer token", hint="send `Authorization: Bearer <token>`")
        digest = token_hash(token)
        revision = self._revision_seen()
        found = self._cached_grant(digest, revision, now)
        if found is not None:
            return found
        with self._load_lock(digest):  # another request may have read it meanwhile
            return self._cached_grant(digest, revision, now) or self._grant(digest, revision, now)

    def _cached_grant(
        self, digest: str, revision: Stamp | None, now: datetime | None
    ) -> Grant | None:
        """The grant cached for this token at ``revision``, if it is still unexpired."""
        cached, granted = self._tokens.get(digest), self._grants.get(digest)
        if cached is None or granted is None or cached[0] != revision or granted[0] != revision:
            return None
        row = cached[1]
        if row is not None and (row.expires_at is None or row.expires_at > (now or utcnow())):
            return granted[1]
        return None

    def _grant(self, digest: str, revision: Stamp | None, now: datetime | None) -> Grant:
        cached = self._tokens.get(digest)
        if cached is not None and cached[0] == revision:
            row = cached[1]
        else:
            with transaction(self.factory) as session:
                row = session.scalar(select(AccessToken).where(AccessToken.token_hash == digest))
                if row is not None:
                    session.expunge(row)
                    if row.mac_key_id is not None and row.mac_key_id not in self.keyring.keys:
                        self._reopen_keyring(session, row.mac_key_id)
            if row is not None or len(self._tokens) < _NEGATIVE_CACHE_LIMIT:
                self._cache(self._tokens, digest, revision, row)
        grant = check_token(row, digest, now or utcnow(), keyring=self.keyring)
        self._cache(self._grants, digest, revision, grant)
        return grant

    def _load_lock(self, what: Any) -> threading.Lock:
        return self._loading[hash(what) % _LOAD_STRIPES]

    def key_entry(self, cluster: str, scope: str) -> KeyEntry:
        """The current key of a scope (decrypted once per revision)."""
        cache_key = (cluster, scope)
        if (
            "\x00" in cluster or "\x00" in scope
        ):  # no name holds NUL, and PostgreSQL refuses to compare one
            raise NotFound(f"no current key for {scope!r} in cluster {cluster!r}")
        revision = self._revision_seen()
        entry = self._cached_key(cache_key, revision)
        if entry is False:
            with self._load_lock(cache_key):  # another request may have read it meanwhile
                entry = self._cached_key(cache_key, revision)
                if entry is False:
                    entry = self._load(cluster, scope)
                    self._cache(self._keys, cache_key, revision, entry)
        if entry is None:
            raise NotFound(f"no current key for {scope} in cluster {cluster}")
        return entry

    def _cached_key(
        self, cache_key: tuple[str, str], revision: Stamp | None
    ) -> KeyEntry | Literal[False] | None:
        """The key cached at ``revision`` (None: cached as absent); False if none is."""
        cached = self._keys.get(cache_key)
        return cached[1] if cached is not None and cached[0] == revision else False

    def _reopen_keyring(self, session: Session, key_id: str) -> None:
        """Sealed or MACed after a `master-key rotate` by another process: read the keyring
        file again (checked against the store), instead of refusing until a restart. A key
        id the store does not know (a forged row) leaves the keyring as it is."""
        if session.get(MasterKey, key_id) is not None:
            self.keyring = open_keyring(session, settings=self.settings)

    def _cache(self, cache: dict[Any, Any], key: Any, revision: Stamp | None, value: Any) -> None:
        """Keep ``value``, read at ``revision``, unless the caches have moved on meanwhile.

        Database threads fill the caches concurrently: a value read before a commit must
        not land after another thread saw the commit's revision (a dead key or a revoked
        token served again). Each entry carries the revision it was read at, and a
        request uses only entries of the revision it read itself.
        """
        if revision is None:
            return
        with self._cache_lock:
            if revision == self._revision:
                cache[key] = (revision, value)

    def _load(self, cluster: str, scope: str) -> KeyEntry | None:
        with transaction(self.factory) as session:
            version = session.scalar(
                select(SecretVersion)
                .join(Secret, SecretVersion.secret_id == Secret.id)
                .join(Cluster, Secret.cluster_id == Cluster.id)
                .where(
                    Cluster.name == cluster, Secret.scope == scope, SecretVersion.state == CURRENT
                )
            )
            if version is None:
                return None
            if version.master_key_id not in self.keyring.keys:
                self._reopen_keyring(session, version.master_key_id)
            key = reveal(self.keyring, version)
            body = json.dumps(
                {
                    "cluster": cluster,
                    "scope": scope,
                    "version": version.number,
                    "fingerprint": version.fingerprint,
                    "created_at": version.created_at.isoformat(),
                    "key": key,
                }
            ).encode()
            return KeyEntry(version=version.number, etag=f'"v{version.number}"', body=body)

    async def ready(self) -> bool:
        """Database reachable, master key loaded, and audit records writable (else no key
        read could succeed), each within the budget."""
        try:
            await self.blocking(self._database_answers)
        except Exception:  # noqa: BLE001 - not ready, whatever the reason
            return False
        return self.keyring is not None and await self.audit.writable()

    def _database_answers(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT value FROM revision WHERE id = 1"))


def require_scope(grant: Grant, cluster: str, scope: str) -> None:
    """``Forbidden`` unless the grant covers the scope."""
    if not grant.allows(cluster, scope):
        raise Forbidden(f"token {grant.name!r} may not read {scope} of cluster {cluster}")


def _audit_writer(engine: Engine, settings: Settings, budget: float) -> AuditWriter:
    """The writer of the ``[audit] durability`` chosen (docs/deployment.md)."""
    chain = chain_for(settings, dash=sys.stdout)
    if settings.audit_durability == "journal":
        directory = settings.audit_journal_dir
        return JournalAuditWriter(engine, chain=chain, timeout=budget, directory=directory)
    return AuditWriter(engine, chain=chain, timeout=budget, durability=settings.audit_durability)
