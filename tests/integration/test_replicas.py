"""Two `keyvault serve` replicas on one store (SQLite file, PostgreSQL database), both with the
scheduler and the webhook worker on, the TA simulator (`keyvault sandbox up`) as the TA host,
and a rotation policy that makes the scheduler rotate all the time. The holder of the
webhook lease is killed with SIGKILL while a delivery of its is held in flight at the
receiver and while readers read the key from both replicas. Then:

- the other replica takes both leases (waited for on the lease rows: a bounded poll);
- every delivery is delivered, the one in flight again with the same webhook-id;
- no read returned a version older than the one committed before the read started;
- every key the TA simulator generated belongs to exactly one rotation row, and every
  rotation row to one stored version (nothing rotated twice, nothing lost).

Nothing sleeps to synchronise: every wait is a bounded poll of a state.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, text

from keyvault.models import WEBHOOK_LEASE
from keyvault.sandbox import state as st
from keyvault.sandbox.run import SandboxPaths, stop
from tests.support.cli import Cli, Home, expect
from tests.support.http import REQUEST_TIMEOUT, Server
from tests.support.replicas import (
    LEASE_TTL,
    HoldingReceiver,
    check_webhooks,
    holder_pid,
    last_run,
    live_holder,
    replica,
    wait_for,
)

CLUSTER, APP = "sandbox", "app1"
SCOPE = f"app:{APP}"
CURRENT = text(
    "SELECT v.number, v.fingerprint FROM secret_versions v JOIN secrets s ON s.id = v.secret_id"
    " JOIN clusters c ON c.id = s.cluster_id"
    " WHERE c.name = :c AND s.scope = :s AND v.state = 'current'"
)


@dataclass
class Readers:
    """Threads reading the key from each replica: each read must return at least the version
    committed before it started (read from the database first), with that version's
    fingerprint."""

    engine: Engine
    token: str
    servers: list[Server]
    stop: threading.Event = field(default_factory=threading.Event)
    ok: dict[int, int] = field(default_factory=dict)  # port -> good reads
    stale: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def committed(self) -> int:
        """The current version's number, as committed now."""
        with self.engine.connect() as conn:
            return int(conn.execute(CURRENT, {"c": CLUSTER, "s": SCOPE}).one()[0])

    def fingerprint_of(self, version: int) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                text(
                    "SELECT v.fingerprint FROM secret_versions v"
                    " JOIN secrets s ON s.id = v.secret_id JOIN clusters c ON c.id = s.cluster_id"
                    " WHERE c.name = :c AND s.scope = :s AND v.number = :n"
                ),
                {"c": CLUSTER, "s": SCOPE, "n": version},
            ).scalar()

    def _read(self, server: Server) -> None:
        port = server.port
        assert port is not None
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT, trust_env=False) as http:
            while not self.stop.is_set():
                before = self.committed()
                try:
                    answer = http.get(f"/v1/clusters/{CLUSTER}/apps/{APP}", headers=headers)
                except httpx.TransportError:
                    continue  # the killed replica
                body = answer.json() if answer.status_code == 200 else {}
                got = body.get("version", -1)
                if got < before or body.get("fingerprint") != self.fingerprint_of(got):
                    self.stale.append(f"port {port}: v{got} after v{before} committed")
                self.ok[port] = self.ok.get(port, 0) + 1

    def start(self) -> Readers:
        self.threads = [
            threading.Thread(target=self._read, args=(s,), daemon=True) for s in self.servers
        ]
        for t in self.threads:
            t.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(REQUEST_TIMEOUT * 2)


@dataclass
class Fleet:
    cli: Cli
    home: Home
    engine: Engine
    receiver: HoldingReceiver
    replicas: list[Server]
    token: str = field(repr=False, default="")

    def rows(self, sql: str) -> list:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql)))

    def by_pid(self, pid: int) -> Server:
        found = [s for s in self.replicas if s.proc is not None and s.proc.pid == pid]
        assert found, f"no replica has pid {pid} (the lease holder)"
        return found[0]

    def ran_since(self, pid: int, since: datetime) -> bool:
        """The scheduler's last recorded run is this pid's and ended after ``since``."""
        ran, finished = last_run(self.engine)
        return ran == pid and finished is not None and finished > since

    def rotations(self) -> int:
        return self.rows("SELECT count(*) FROM rotations")[0][0]


@pytest.fixture
def fleet(home: Home, cli: Cli, engine, tmp_path: Path, monkeypatch) -> Iterator[Fleet]:
    monkeypatch.setenv("KEYVAULT_ALLOW_PRIVATE_NETWORK", "1")
    expect(cli("init"))
    receiver = HoldingReceiver()
    servers: list[Server] = []
    try:
        expect(cli("sandbox", "up", "--ssh-port", "0", "--api-port", "0", "--apps", APP))
        expect(cli("rotate", "app", "--cluster", CLUSTER, APP, "--yes", "--json"))
        expect(cli("webhook", "add", receiver.url, "--scope", f"app:{CLUSTER}/{APP}"))
        made = expect(cli("token", "create", "reader", "--scope", f"app:{CLUSTER}/{APP}", "--json"))
        servers += [replica(tmp_path, "a").launch(), replica(tmp_path, "b").launch()]
        f = Fleet(cli, home, engine, receiver, servers, json.loads(made.stdout)["token"])
        for server in servers:
            server.wait_healthy()
        yield f
    finally:
        for server in servers:
            server.stop()
        receiver.close()
        stop(SandboxPaths(home.path))


def test_lease_takeover_after_kill_9_of_the_holder_under_load(fleet: Fleet):
    expect(fleet.cli("policy", "set", "--cluster", CLUSTER, "--appid", APP, "--max-age", "1s"))
    wait_for("a replica holds the webhook lease", lambda: live_holder(fleet.engine, WEBHOOK_LEASE))
    readers = Readers(fleet.engine, fleet.token, fleet.replicas).start()
    try:
        wait_for("the scheduler rotates", lambda: fleet.rotations() >= 3)
        fleet.receiver.holding.set()  # the next delivery stays in flight at the holder
        wait_for("a delivery in flight", lambda: fleet.receiver.held >= 1)
        in_flight = fleet.receiver.received[-1]
        holder = live_holder(fleet.engine, WEBHOOK_LEASE)  # the one that sent it
        assert holder is not None
        doomed = fleet.by_pid(holder_pid(holder))
        survivor = next(s for s in fleet.replicas if s is not doomed)
        assert doomed.proc is not None
        killed_db = datetime.now(UTC)  # the runs' ends are written by this machine's clock
        os.kill(doomed.proc.pid, signal.SIGKILL)
        doomed.proc.wait(timeout=30)
        killed_at = time.monotonic()
        fleet.receiver.release()
        pid = survivor.proc.pid  # type: ignore[union-attr]
        wait_for(
            "the survivor takes the webhook lease",
            lambda: (
                (info := live_holder(fleet.engine, WEBHOOK_LEASE)) is not None
                and holder_pid(info) == pid
            ),
        )
        # The scheduler's lease is taken per run: a run of the survivor's ends after the kill
        # (one that finds the scope held by a rotation the dead one left unresolved included).
        wait_for("the survivor's scheduler runs", lambda: fleet.ran_since(pid, killed_db))
        takeover = time.monotonic() - killed_at
        expect(fleet.cli("policy", "remove", "--cluster", CLUSTER, "--appid", APP))
    finally:
        readers.finish()
    recovered = _recover_left_behind(fleet)
    _check_rotations(fleet)
    check_webhooks(fleet.engine, fleet.receiver, in_flight)
    assert readers.stale == [], readers.stale[:5]
    assert readers.ok.get(survivor.port or 0, 0) > 0, readers.ok
    print(
        f"takeover of both leases {takeover:.2f}s after kill -9 (ttl {LEASE_TTL:g}s); "
        f"reads {readers.ok}; rotations {fleet.rotations()} ({recovered} recovered); "
        f"webhook requests {len(fleet.receiver.received)}, in flight {in_flight} "
        f"{fleet.receiver.received.count(in_flight)}x"
    )


def _recover_left_behind(fleet: Fleet) -> int:
    """A rotation the killed replica left unresolved is finished by `recover` (never redone)."""
    unresolved = fleet.rows(
        "SELECT id FROM rotations WHERE state IN ('pending', 'needs_recovery', 'stored')"
    )
    for (rid,) in unresolved:
        expect(fleet.cli("rotations", "recover", rid, "--json"))
    return len(unresolved)


def _check_rotations(fleet: Fleet) -> None:
    """Each key TA generated has one rotation row and one stored version; none twice."""
    generated = st.generations(SandboxPaths(fleet.home.path).state_dir, SCOPE)
    states = dict(fleet.rows("SELECT state, count(*) FROM rotations GROUP BY state"))
    versions = fleet.rows(
        "SELECT count(*), count(DISTINCT v.fingerprint) FROM secret_versions v"
        " JOIN secrets s ON s.id = v.secret_id WHERE s.scope = 'app:app1'"
    )[0]
    assert set(states) <= {"completed", "failed"}, states
    assert states.get("completed", 0) == generated == versions[0] == versions[1], (
        states, generated, versions,
    )  # fmt: skip
