"""Change notifications from PostgreSQL: one listener thread per server process.

Migration 0010 makes PostgreSQL send ``NOTIFY keyvault_revision, '<new value>'`` whenever the
``revision`` counter changes and ``NOTIFY keyvault_events`` whenever events are recorded (in
the writer's transaction: heard only once committed). ``RevisionListener`` holds one
autocommit psycopg connection (``application_name`` ``keyvault-revision-listener``) that
``LISTEN``s on both, in its own thread, blocking in ``notifies()``; the event loop never
waits on it. What it learns:

- ``revision()``: the newest revision heard, or ``None`` while the listener is not connected
  (starting, dropped, the database restarting). Requests then read the counter from the
  database themselves, as without the listener (``ServerState.ensure_fresh``).
- ``changes``: a ``ChangeSignal`` fired on every notification, which wakes the long-polls.

After each (re)connect it listens first and then reads the counter, so a change committed
while it was away is seen. A dropped connection is retried after 0.1 s, doubling up to 5 s
(``KEYVAULT_REVISION_LISTENER_RETRY``: the first delay in seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

REVISION_CHANNEL = "keyvault_revision"
EVENTS_CHANNEL = "keyvault_events"
APPLICATION_NAME = "keyvault-revision-listener"
RETRY_ENV = "KEYVAULT_REVISION_LISTENER_RETRY"
_RETRY_FIRST = 0.1
_RETRY_CAP = 5.0
_WAKE_EVERY = 0.5  # seconds between looks at the stop flag while no notification comes


class ChangeSignal:
    """Wakes coroutines (on any event loop) from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def arm(self) -> asyncio.Future[None]:
        """A future done at the next ``fire()``. Arm before looking, then await: a change
        between the look and the wait still wakes the waiter."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._waiters.append((loop, future))
        return future

    def disarm(self, future: asyncio.Future[None]) -> None:
        with self._lock:
            self._waiters = [(lp, f) for lp, f in self._waiters if f is not future]

    def fire(self) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there now
                loop.call_soon_threadsafe(_settle, future)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class RevisionListener:
    """The thread that LISTENs for changes; see the module docstring."""

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        *,
        retry_first: float = _RETRY_FIRST,
    ) -> None:
        self._connect = connect
        self._retry_first = retry_first
        self.changes = ChangeSignal()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._revision: int | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self.connects = 0  # successful connections so far (the first one included)
        self.notifications = 0
        self._thread = threading.Thread(
            target=self._run, name="keyvault-revision-listener", daemon=True
        )

    @classmethod
    def for_engine(cls, engine: Engine) -> RevisionListener:
        """A listener on the database of ``engine`` (PostgreSQL), its own connection."""
        args, kwargs = engine.dialect.create_connect_args(engine.url)

        def connect() -> psycopg.Connection[Any]:
            return psycopg.connect(
                *args,
                **{
                    **kwargs,
                    "autocommit": True,
                    "application_name": APPLICATION_NAME,
                    "connect_timeout": 10,
                    # A silently dead peer (no FIN) is noticed by TCP within about a minute;
                    # the periodic re-check bounds staleness meanwhile.
                    "keepalives": 1,
                    "keepalives_idle": 30,
                    "keepalives_interval": 10,
                    "keepalives_count": 3,
                },
            )

        retry = float(os.environ.get(RETRY_ENV) or _RETRY_FIRST)
        return cls(connect, retry_first=retry)

    def revision(self) -> int | None:
        """The newest revision heard, ``None`` while not connected (then ask the database)."""
        return self._revision

    @property
    def connected(self) -> bool:
        return self._revision is not None

    def start(self) -> RevisionListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=_WAKE_EVERY * 4)

    def _run(self) -> None:
        delay = self._retry_first
        while not self._stop.is_set():
            try:
                self._listen()
                delay = self._retry_first  # it was connected: start over with a short delay
            except Exception as exc:  # noqa: BLE001 - any failure: fall back, then retry
                self._lost()
                log.warning(
                    "revision listener disconnected (%s); retrying in %.1fs",
                    type(exc).__name__,
                    delay,
                )
                self._stop.wait(delay)
                delay = min(max(delay * 2, self._retry_first), max(_RETRY_CAP, self._retry_first))
        self._lost()

    def _listen(self) -> None:
        conn = self._connect()
        try:
            conn.execute(f"LISTEN {REVISION_CHANNEL}")
            conn.execute(f"LISTEN {EVENTS_CHANNEL}")
            # After LISTEN: a change committed from here on is notified; one before, read now.
            row = conn.execute("SELECT value FROM revision WHERE id = 1").fetchone()
            self.connects += 1
            self._heard(int(row[0]) if row else 0)
            self.changes.fire()  # events may have been recorded while it was away
            while not self._stop.is_set():
                for note in conn.notifies(timeout=_WAKE_EVERY):
                    self.notifications += 1
                    if note.channel == REVISION_CHANNEL and note.payload.isdigit():
                        self._heard(int(note.payload))
                    self.changes.fire()
                    if self._stop.is_set():
                        break
        finally:
            self._lost()
            conn.close()

    def _heard(self, revision: int) -> None:
        with self._lock:
            if self._revision is None or revision > self._revision:
                self._revision = revision

    def advance(self, revision: int) -> None:
        """A newer revision read from the database (its notification late or lost)."""
        with self._lock:
            if self._revision is not None and revision > self._revision:
                self._revision = revision

    def _lost(self) -> None:
        with self._lock:
            self._revision = None


class ListenerCollector(Collector):
    """The listener's state for ``/metrics`` (this process's)."""

    def __init__(self, listener: Callable[[], RevisionListener | None]) -> None:
        self._listener = listener

    def collect(self) -> Iterator[Metric]:
        listener = self._listener()
        if listener is None:  # SQLite: no listener
            return
        yield GaugeMetricFamily(
            "keyvault_revision_listener_connected",
            "1 while this process hears PostgreSQL's change notifications, else 0 "
            "(requests then read the revision counter themselves)",
            value=1 if listener.connected else 0,
        )
        yield CounterMetricFamily(
            "keyvault_revision_listener_connects",
            "Connections the change listener made (the first one included)",
            value=listener.connects,
        )
        yield CounterMetricFamily(
            "keyvault_revision_notifications",
            "Change notifications this process heard",
            value=listener.notifications,
        )
        revision = listener.revision()
        yield GaugeMetricFamily(
            "keyvault_revision_heard",
            "The newest revision the listener heard of (-1 while not connected)",
            value=-1 if revision is None else revision,
        )
