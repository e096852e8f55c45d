"""Several ``keyvault serve`` replicas on one store, for the lease and failover tests.

    replica(workdir, "a")            a Server with the scheduler and the webhook worker on,
                                     short leases (``LEASE_TTL``) and webhooks to loopback
    lease(engine, name)              the lease row (services/leases.LeaseInfo)
    holder_pid(info)                 the pid in a holder id (host:pid:instance)
    last_run(engine)                 the scheduler's last recorded run: (pid, end)
    worker_pids(serve_pid)           the worker processes of a ``serve --workers N``
    wait_for(what, probe)            a bounded poll of an observable state, never a sleep
    HoldingReceiver                  a webhook receiver that records every webhook-id and can
                                     hold requests unanswered (a delivery kept in flight)
    check_webhooks(engine, receiver, in_flight)
                                     every delivery delivered, the one in flight again

Nothing here prints a key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from keyvault.models import ROTATE_DUE_LEASE, Lease
from keyvault.services import leases
from tests.support.http import Server
from tests.support.timeouts import TIMEOUT

T = TypeVar("T")
LEASE_TTL = 3.0  # seconds: takeover within LEASE_TTL + LEASE_TTL / 3
SCHEDULER_INTERVAL = 0.5


def replica(
    workdir: Path, name: str, *, scheduler: bool = True, args: tuple[str, ...] = ()
) -> Server:
    """A replica (not started) with its own work directory under ``workdir``."""
    own = workdir / name
    own.mkdir(parents=True, exist_ok=True)
    server = Server(own, args=args)
    server.env.update(
        KEYVAULT_SERVE_WEBHOOKS="1",
        KEYVAULT_SERVE_SCHEDULER="1" if scheduler else "0",
        KEYVAULT_LEASE_TTL=str(LEASE_TTL),
        KEYVAULT_SCHEDULER_INTERVAL=str(SCHEDULER_INTERVAL),
        KEYVAULT_ALLOW_PRIVATE_NETWORK="1",
    )
    return server


def lease(engine: Engine, name: str) -> leases.LeaseInfo:
    with Session(engine) as session:
        info = leases.read(session, name)
    assert info is not None, f"no lease row {name}"
    return info


def live_holder(engine: Engine, name: str) -> leases.LeaseInfo | None:
    """The lease if a live holder has it (by the database's clock), else None."""
    with Session(engine) as session:
        info = leases.read(session, name)
        now = leases.database_now(session)
    return info if info is not None and leases.live(info, now) else None


def holder_pid(info: leases.LeaseInfo) -> int:
    assert info.holder is not None
    return int(info.holder.rsplit(":", 2)[1])


def last_run(engine: Engine) -> tuple[int | None, datetime | None]:
    """The scheduler's last recorded run (its lease is taken per run and given back with the
    run's end): the pid that ran it and when it ended (this machine's clock); None: no run."""
    with engine.connect() as conn:
        holder, finished = conn.execute(
            select(Lease.last_holder, Lease.last_finished_at).where(Lease.name == ROTATE_DUE_LEASE)
        ).one_or_none() or (None, None)
    return (int(holder.rsplit(":", 2)[1]) if holder else None), finished


def worker_pids(serve_pid: int) -> set[int]:
    """The workers of ``keyvault serve --workers N`` running as ``serve_pid``: its children
    (``/proc/<pid>/task/*/children``) that run multiprocessing's ``spawn_main`` (uvicorn
    spawns its workers so), not its resource tracker, nor a killed worker not yet reaped
    (a zombie has no command line)."""
    children: set[int] = set()
    for task in Path(f"/proc/{serve_pid}/task").iterdir():
        try:
            children.update(int(pid) for pid in (task / "children").read_text().split())
        except OSError:  # a thread that ended meanwhile
            continue
    return {pid for pid in children if b"spawn_main" in _cmdline(pid)}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = TIMEOUT) -> T:
    """Poll ``probe`` until it returns something other than None/False (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found is not None and found is not False:
            return found
        assert time.monotonic() < deadline, f"never happened within {timeout:g}s: {what}"
        time.sleep(0.05)  # a poll interval, not a synchronisation


class HoldingReceiver:
    """A webhook receiver on 127.0.0.1 that answers 204 and records each request's
    ``webhook-id`` (``received``: every request; ``answered``: those it answered). While
    ``holding`` is set, requests wait (unanswered) until ``release()``: a delivery kept in
    flight. ``held`` counts the requests waiting."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.answered: list[str] = []
        self.held = 0
        self.holding = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver._arrived(self.headers.get("webhook-id", ""))
                try:
                    self.send_response(204)
                    self.end_headers()
                except OSError:  # its sender died meanwhile: not answered
                    return
                with receiver._lock:
                    receiver.answered.append(self.headers.get("webhook-id", ""))

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def _arrived(self, msg_id: str) -> None:
        with self._lock:
            self.received.append(msg_id)
            hold = self.holding.is_set()
            self.held += hold
        if hold:
            self._released.wait(TIMEOUT)

    def release(self) -> None:
        self.holding.clear()
        self._released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


def check_webhooks(engine: Engine, receiver: HoldingReceiver, in_flight: str) -> None:
    """Every delivery delivered (waited for); each received, and nothing else; the one in
    flight at a kill again, with the same webhook-id (at least once, never lost)."""

    def rows(sql: str) -> list[Any]:
        with engine.connect() as conn:
            return list(conn.execute(text(sql)))

    wait_for(
        "every webhook delivered",
        lambda: (
            rows("SELECT count(*) FROM webhook_deliveries WHERE status != 'delivered'")[0][0] == 0
        ),
    )
    owed = {f"msg_{event_id}" for (event_id,) in rows("SELECT event_id FROM webhook_deliveries")}
    received = receiver.received
    assert owed <= set(received), sorted(owed - set(received))[:5]
    assert set(received) <= owed  # a repeat is a retry of an owed message, same webhook-id
    assert received.count(in_flight) >= 2
