"""Leases between the worker processes of ONE ``keyvault serve --workers 2`` (SQLite file,
PostgreSQL database). Every worker runs a scheduler and a webhook worker; the leases let
one act at a time. A webhook to a receiver on 127.0.0.1 is delivered, a second one is held
in flight at the receiver, and the worker holding the webhook lease (the one that sent it)
is killed with SIGKILL; uvicorn starts a replacement. Then:

- before the kill, the webhook lease's holder and the scheduler's last run are workers of
  the server (children of the serve process), and the lease row names one of the two;
- the other worker, or the replacement, takes the webhook lease over (a bounded poll of the
  lease row), and it is one of the server's workers as re-read after the kill;
- the scheduler's runs go on, by a live worker;
- every webhook is delivered, the one in flight again with the same webhook-id, and one
  made while the lease was still the dead worker's as well.

Nothing sleeps to synchronise: every wait is a bounded poll of a state.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from keyvault.models import WEBHOOK_LEASE, WebhookDelivery
from tests.support.cli import Cli, expect
from tests.support.http import Server
from tests.support.leak_guard import new_key
from tests.support.replicas import (
    LEASE_TTL,
    HoldingReceiver,
    check_webhooks,
    holder_pid,
    last_run,
    live_holder,
    replica,
    wait_for,
    worker_pids,
)

CLUSTER = "c"


@dataclass
class Workers:
    """One server with two workers, its store and the webhook receiver."""

    cli: Cli
    engine: Engine
    receiver: HoldingReceiver
    server: Server

    def pids(self) -> set[int]:
        assert self.server.proc is not None
        return worker_pids(self.server.proc.pid)

    def two_workers(self, without: int | None = None) -> set[int] | None:
        """Both workers' pids once there are two (none of them ``without``), else None."""
        pids = self.pids()
        return pids if len(pids) == 2 and without not in pids else None

    def event(self) -> None:
        """A new root key: one event, one webhook delivery owed to the receiver."""
        expect(self.cli("import", "--cluster", CLUSTER, "--root", input=new_key() + "\n"))

    def claimed_by(self) -> list[str | None]:
        """Who claimed each delivery not yet recorded (the one in flight)."""
        with self.engine.connect() as conn:
            return list(
                conn.scalars(
                    select(WebhookDelivery.claimed_by).where(WebhookDelivery.status == "pending")
                )
            )

    def scheduler_ran(self, pids: set[int], since: datetime) -> bool:
        """The scheduler's last recorded run ended after ``since``, by one of ``pids``."""
        pid, finished = last_run(self.engine)
        return pid in pids and finished is not None and finished > since


@pytest.fixture
def workers(cli: Cli, engine: Engine, tmp_path: Path, monkeypatch) -> Iterator[Workers]:
    """A store with cluster c and a webhook on its root key, served by two workers."""
    monkeypatch.setenv("KEYVAULT_ALLOW_PRIVATE_NETWORK", "1")
    expect(cli("init"))
    # Nothing listens there: the scheduler has no policy, nothing calls TA.
    expect(cli("cluster", "add", CLUSTER, "--open-api-url", "http://127.0.0.1:9"))
    receiver = HoldingReceiver()
    server = replica(tmp_path, "serve", args=("--workers", "2"))
    try:
        expect(cli("webhook", "add", receiver.url, "--scope", f"root:{CLUSTER}"))
        server.launch().wait_healthy()
        yield Workers(cli, engine, receiver, server)
    finally:
        server.stop()
        receiver.close()


def test_one_worker_holds_a_lease_and_another_takes_it_after_kill_9(workers: Workers):
    started = datetime.now(UTC)  # the runs' ends are written by this machine's clock
    first = wait_for("two workers", workers.two_workers)
    held = wait_for(
        "a worker holds the webhook lease", lambda: live_holder(workers.engine, WEBHOOK_LEASE)
    )
    assert holder_pid(held) in first, (held.holder, first)
    assert len(first - {holder_pid(held)}) == 1  # the row names one holder: the other is not it
    wait_for("a worker's scheduler runs", lambda: workers.scheduler_ran(first, started))

    workers.event()  # delivered by the holder, before the kill
    wait_for("the first webhook", lambda: len(workers.receiver.answered) >= 1)
    workers.receiver.holding.set()  # the next delivery stays in flight at the holder
    workers.event()
    wait_for("a delivery in flight", lambda: workers.receiver.held >= 1)
    in_flight = workers.receiver.received[-1]
    holder = live_holder(workers.engine, WEBHOOK_LEASE)  # the one that sent it
    assert holder is not None and holder_pid(holder) in first, (holder, first)
    assert workers.claimed_by() == [holder.holder]  # claimed under the lease, by its holder
    doomed = holder_pid(holder)

    killed_at = datetime.now(UTC)
    os.kill(doomed, signal.SIGKILL)
    killed = time.monotonic()
    workers.receiver.release()
    workers.event()  # owed while the dead worker's lease has not expired yet
    taken = wait_for(
        "another worker takes the webhook lease",
        lambda: (
            (info := live_holder(workers.engine, WEBHOOK_LEASE)) is not None
            and holder_pid(info) != doomed
            and info
        ),
    )
    takeover = time.monotonic() - killed
    after = wait_for("uvicorn replaces the killed worker", lambda: workers.two_workers(doomed))
    assert holder_pid(taken) in after, (taken.holder, after, doomed)
    assert taken.epoch > holder.epoch
    by = "the other worker" if holder_pid(taken) in first else "the replacement"
    wait_for("a live worker's scheduler runs", lambda: workers.scheduler_ran(after, killed_at))
    check_webhooks(workers.engine, workers.receiver, in_flight)
    print(
        f"workers {sorted(first)} -> {sorted(after)}; webhook lease {doomed} -> "
        f"{holder_pid(taken)} ({by}) "
        f"{takeover:.2f}s after kill -9 (ttl {LEASE_TTL:g}s, bound {LEASE_TTL * 4 / 3:g}s + poll); "
        f"webhook requests {len(workers.receiver.received)}, in flight {in_flight} "
        f"{workers.receiver.received.count(in_flight)}x"
    )
