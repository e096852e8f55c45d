"""Short renewable leases: one runner at a time across processes, workers and replicas.

A lease is a row of ``leases`` (one per name: ``rotate-due`` for the scheduler,
``webhook-deliveries`` for the webhook worker). Every decision is one conditional UPDATE,
so two runners can never both hold it:

- **renew**: ``holder = me AND expires_at > now`` → ``expires_at = now + ttl``;
- **take**: free, or expired (``expires_at <= now``) → holder, ``acquired_at`` and
  ``expires_at`` set, ``epoch + 1`` (a fencing token: it changes at every acquisition).

``now`` is the database's clock on PostgreSQL (``now()`` of the lease's own transaction),
so the replicas' clocks never meet in a comparison: skew between machines does not matter.
On SQLite (one machine) it is this machine's clock. Tests inject a clock instead.

``LeaseKeeper`` holds one lease for a runner: ``step()`` renews or takes it, a heartbeat
thread calls it every ``ttl / 3``, and ``held()`` is the fence the runner checks before it
starts anything. ``held()`` turns False as soon as a renewal fails (database error, or the
lease found taken), and also, by this process's monotonic clock, ``ttl - ttl / 5`` after the
start of the last successful renewal: the database's expiry is later than that, so a runner
that believes it holds the lease always does, even if its heartbeat stalls.

Takeover bound: a holder that dies (kill -9) keeps the lease until it expires, at most
``ttl`` after its last renewal; another runner polling every ``poll`` seconds takes it within
``ttl + poll``. Commits on purpose (each decision is its own short transaction).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import func, or_, select, text, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from keyvault.db import transaction
from keyvault.models import Lease, utcnow

DEFAULT_TTL = timedelta(seconds=15)
Clock = Callable[[], datetime]
SessionFactory = Callable[[], Session]
log = logging.getLogger("keyvault.leases")


def holder_id() -> str:
    """This runner: host, pid and a random instance id (two runners of one process differ)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True)
class LeaseInfo:
    """A lease row as the operator sees it (holder None: free)."""

    name: str
    holder: str | None
    acquired_at: datetime | None
    expires_at: datetime | None
    epoch: int

    def describe(self) -> str:
        if self.holder is None or self.expires_at is None:
            return "free"
        return f"{self.holder} until {self.expires_at.isoformat()}"


def database_now(session: Session) -> datetime:
    """The database's clock on PostgreSQL (shared by every replica); this machine's on SQLite."""
    bind = session.get_bind()
    if bind.dialect.name != "postgresql":
        return utcnow()
    value = session.scalar(select(func.now()))
    assert isinstance(value, datetime)
    return value.astimezone(UTC)


def read(session: Session, name: str) -> LeaseInfo | None:
    row = session.get(Lease, name)
    if row is None:
        return None
    return LeaseInfo(row.name, row.holder, row.acquired_at, row.expires_at, row.epoch or 0)


def read_all(session: Session) -> list[LeaseInfo]:
    """Every lease, by name (for `keyvault status` and /metrics)."""
    names = session.scalars(select(Lease.name).order_by(Lease.name)).all()
    return [info for name in names if (info := read(session, name)) is not None]


def live(info: LeaseInfo, now: datetime) -> bool:
    """Someone holds it now (a holder that died keeps it until ``expires_at``)."""
    return info.holder is not None and info.expires_at is not None and info.expires_at > now


def _updated(session: Session, stmt: Any) -> bool:
    return cast("CursorResult[Any]", session.execute(stmt)).rowcount == 1


def take(
    session: Session,
    *,
    name: str,
    holder: str,
    now: datetime,
    ttl: timedelta,
    renew_only: bool = False,
) -> LeaseInfo | None:
    """Renew the lease, or take it if free or expired; None if another holds it.
    ``renew_only``: never take it, only renew it (None unless ``holder`` holds it now).

    Only flushes; the caller commits. The row is created if a store lacks it."""
    if session.get(Lease, name) is None:
        session.add(Lease(name=name, epoch=0))
        session.flush()
    renewed = _updated(
        session,
        update(Lease)
        .where(Lease.name == name, Lease.holder == holder, Lease.expires_at > now)
        .values(expires_at=now + ttl),
    )
    taken = renewed or (
        not renew_only
        and _updated(
            session,
            update(Lease)
            .where(
                Lease.name == name,
                or_(Lease.holder.is_(None), Lease.expires_at.is_(None), Lease.expires_at <= now),
            )
            .values(holder=holder, acquired_at=now, expires_at=now + ttl, epoch=Lease.epoch + 1),
        )
    )
    session.expire_all()
    info = read(session, name)
    return info if taken and info is not None and info.holder == holder else None


def release(session: Session, *, name: str, holder: str) -> bool:
    """Give the lease back (only if ``holder`` has it); the next runner need not wait."""
    return _updated(
        session,
        update(Lease)
        .where(Lease.name == name, Lease.holder == holder)
        .values(holder=None, expires_at=None),
    )


def bound_idle(session: Session, ttl: timedelta) -> None:
    """PostgreSQL: end this session if its client leaves the transaction idle for a fifth of
    ``ttl`` (one second at least). A transaction that locks the lease row (a renewal, a fence) would otherwise
    hold the lock for as long as a holder that stopped inside it (power loss, a partition,
    SIGSTOP) stays unnoticed, hours until TCP keepalive: every takeover would wait on it."""
    if session.get_bind().dialect.name == "postgresql":
        # At least a second: a short ttl must not end sessions of a busy, live holder.
        ms = max(1000, int(ttl.total_seconds() * 200))
        session.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = {ms}"))


def holds(session: Session, *, name: str, holder: str, now: datetime) -> bool:
    """The fence inside a transaction that acts: ``holder`` has the lease now. On PostgreSQL
    the row is share-locked until commit, so no takeover commits before this transaction."""
    found = session.scalar(
        select(Lease.name)
        .where(Lease.name == name, Lease.holder == holder, Lease.expires_at > now)
        .with_for_update(read=True)
    )
    return found is not None


class LeaseKeeper:
    """One runner's hold on lease ``name``: ``step()`` renews or takes it, ``start()`` runs a
    heartbeat that does so every ``ttl / 3``, ``held()`` is the fence (see the module).

    ``on_taken(info, previous)`` is called after each acquisition (not renewal) with the
    holder it replaced (None: the lease was free or given back), from the caller of ``step``.
    ``clock`` None: the database's clock. ``retake`` False: once acquired, only renewed; lost
    (taken over, or expired), it is never taken again by this keeper, even when free: a run
    that lost it (the scheduler's, whose plan is stale by then) must end, not carry on.
    """

    def __init__(
        self,
        factory: SessionFactory,
        *,
        name: str,
        holder: str | None = None,
        ttl: timedelta = DEFAULT_TTL,
        clock: Clock | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        on_taken: Callable[[LeaseInfo, str | None], None] | None = None,
        retake: bool = True,
    ) -> None:
        self.factory, self.name, self.ttl = factory, name, ttl
        self.holder = holder or holder_id()
        self.clock, self.monotonic, self.on_taken = clock, monotonic, on_taken
        self.info: LeaseInfo | None = None  # the row after the last step (ours or another's)
        self.acquisitions = 0
        self.retake = retake
        self._valid_until = float("-inf")  # monotonic; held() is False after it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def every(self) -> float:
        """Seconds between heartbeats (renewals, or attempts to take the lease)."""
        return self.ttl.total_seconds() / 3

    def now(self, session: Session) -> datetime:
        return self.clock() if self.clock is not None else database_now(session)

    def held(self) -> bool:
        return self.monotonic() < self._valid_until

    def fence(self, session: Session) -> bool:
        """``held()`` and, in ``session``'s transaction, the row says so (see ``holds``)."""
        if not self.held():
            return False
        bound_idle(session, self.ttl)
        return holds(session, name=self.name, holder=self.holder, now=self.now(session))

    def guard(self, session: Session) -> bool:
        """``fence(session)``; False also un-holds the lease (a runner acting on it stops)."""
        held = self.fence(session)
        if not held:
            self._lose("the lease row names another holder, or none")
        return held

    def confirm(self) -> bool:
        """``held()``, and the row agrees (one short transaction); False on any error."""
        try:
            with transaction(self.factory) as s:
                confirmed = self.fence(s)
        except Exception as exc:  # noqa: BLE001 - cannot confirm: act as if lost
            self._lose(f"could not confirm: {type(exc).__name__}: {exc}")
            return False
        if not confirmed:
            self._lose("the lease row names another holder, or none")
        return confirmed

    def step(self) -> bool:
        """Renew or take the lease once; True if held afterwards. A failure un-holds it."""
        try:
            return self.acquire()
        except Exception as exc:  # noqa: BLE001 - a database hiccup: not held until renewed
            self._lose(f"could not renew: {type(exc).__name__}: {exc}")
            return False

    def acquire(self) -> bool:
        """``step()``, but a database error is raised (after un-holding the lease)."""
        started = self.monotonic()
        was = self.info.holder if self.info is not None else None
        try:
            with transaction(self.factory) as s:
                bound_idle(s, self.ttl)
                previous = read(s, self.name)
                mine = take(
                    s,
                    name=self.name,
                    holder=self.holder,
                    now=self.now(s),
                    ttl=self.ttl,
                    renew_only=not self.retake and self.acquisitions > 0,
                )
                self.info = mine or read(s, self.name)
        except BaseException:
            self._valid_until = float("-inf")
            raise
        if mine is None:
            if was == self.holder:
                self._lose(f"taken over by {self.info.describe() if self.info else 'nobody'}")
            self._valid_until = float("-inf")
            return False
        self._valid_until = started + self.ttl.total_seconds() * 0.8
        if previous is None or previous.epoch != mine.epoch:
            self._acquired(mine, previous)
        return True

    def _acquired(self, mine: LeaseInfo, previous: LeaseInfo | None) -> None:
        self.acquisitions += 1
        before = previous.holder if previous is not None else None
        log.info("lease %s taken (epoch %d, previous holder %s)", self.name, mine.epoch, before)
        if self.on_taken is None:
            return
        try:
            self.on_taken(mine, before if before != self.holder else None)
        except Exception:  # the lease stands; what the hook did not do waits for its own bound
            log.exception("after taking lease %s", self.name)

    def _lose(self, why: str) -> None:
        if self.held():
            log.warning("lease %s lost: %s", self.name, why)
        self._valid_until = float("-inf")

    def release(self) -> bool:
        """Give the lease back (at a clean stop); False if it was not ours."""
        self._valid_until = float("-inf")
        try:
            with transaction(self.factory) as s:
                return release(s, name=self.name, holder=self.holder)
        except Exception as exc:  # noqa: BLE001 - it expires on its own
            log.warning("could not release lease %s: %s", self.name, exc)
            return False

    def start(self, *, first: bool = True) -> LeaseKeeper:
        """Start the heartbeat thread (``first``: its first step now, else after ``every``)."""
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat, args=(first,), name=f"keyvault-lease-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def _beat(self, first: bool) -> None:
        if not first and self._stop.wait(self.every):
            return
        while True:
            self.step()
            if self._stop.wait(self.every):
                return

    def stop(self, *, release: bool = True, timeout: float = 10.0) -> None:
        """Stop the heartbeat; ``release``: give the lease back if held."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        if release and self.info is not None and self.info.holder == self.holder:
            self.release()
