"""Change notifications: a real ``keyvault serve`` hears of changes made by other processes.

On PostgreSQL the server LISTENs (keyvault/http/revision_listener.py) and requests use the
revision it heard of instead of asking the database; the periodic re-check is set to 60 s
here, so a refusal within the test shows the notification (or the fallback) at work, not the
re-check. The listener's state is read from ``/metrics`` (bounded polls, no sleeps). On SQLite
nothing changed: every request reads the counter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from keyvault.db import normalize_url
from keyvault.http.revision_listener import APPLICATION_NAME
from tests.support.cli import Cli, proc_describe, run_keyvault
from tests.support.db import Database
from tests.support.http import World, build_world
from tests.support.revision import database_revision, revision_metrics
from tests.support.timeouts import TIMEOUT


def _world(cli: Cli, database: Database, tmp_path: Path, **env: str) -> Iterator[World]:
    workdir = tmp_path / "serve"
    workdir.mkdir()
    with pytest.MonkeyPatch.context() as mp:  # read by the server process at its start
        mp.setenv("KEYVAULT_REVISION_RECHECK_MS", "60000")
        for name, value in env.items():  # (overrides the above)
            mp.setenv(name, value)
        world = build_world(cli, database.url, workdir)
    try:
        yield world
    finally:
        world.server.stop()


# LISTEN/NOTIFY exists on PostgreSQL alone: those tests are parametrized for it (CI counts
# no skips), and the SQLite path for SQLite.
PG_ONLY = pytest.mark.parametrize("blank_database", ["postgres"], indirect=True)
SQLITE_ONLY = pytest.mark.parametrize("blank_database", ["sqlite"], indirect=True)


@pytest.fixture
def pg_world(cli: Cli, database: Database, tmp_path: Path) -> Iterator[World]:
    assert database.is_postgres  # the test is parametrized for PostgreSQL alone (PG_ONLY)
    yield from _world(cli, database, tmp_path)


@pytest.fixture
def pg_world_slow_retry(cli: Cli, database: Database, tmp_path: Path) -> Iterator[World]:
    """The listener waits an hour before reconnecting: once dropped, it stays down."""
    assert database.is_postgres  # the test is parametrized for PostgreSQL alone (PG_ONLY)
    yield from _world(cli, database, tmp_path, KEYVAULT_REVISION_LISTENER_RETRY="3600")


@pytest.fixture
def pg_world_short_recheck(cli: Cli, database: Database, tmp_path: Path) -> Iterator[World]:
    assert database.is_postgres  # the test is parametrized for PostgreSQL alone (PG_ONLY)
    yield from _world(cli, database, tmp_path, KEYVAULT_REVISION_RECHECK_MS="200")


def _metrics(world: World) -> dict[str, float]:
    return revision_metrics(world.url)


def _until(world: World, what: str, ok) -> dict[str, float]:
    """Poll /metrics until ``ok(metrics)`` (bounded); the metrics that satisfied it."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        metrics = _metrics(world)
        if ok(metrics):
            return metrics
        assert time.monotonic() < deadline, f"never {what}: {metrics}"
        time.sleep(0.02)  # the pause between polls (the condition is what is waited for)


def _database_revision(world: World) -> int:
    return database_revision(world.db_url)


def _revoke_elsewhere(name: str) -> None:
    result = run_keyvault("token", "revoke", name, "--yes")
    assert result.returncode == 0, proc_describe(result)


def _read_status(world: World) -> int:
    with world.http("app-a1") as http:
        return http.get("/v1/clusters/c/apps/a1").status_code


def _connected(m: dict[str, float]) -> bool:
    return m.get("keyvault_revision_listener_connected") == 1


@PG_ONLY
def test_a_revocation_by_another_process_is_refused_once_notified(pg_world: World):
    assert _read_status(pg_world) == 200  # token and key cached at this revision
    before = _until(pg_world, "connected", _connected)
    _revoke_elsewhere("app-a1")
    revision = _database_revision(pg_world)
    heard = _until(
        pg_world,
        f"heard of revision {revision}",
        lambda m: m.get("keyvault_revision_heard", -1) >= revision,
    )
    assert (
        heard["keyvault_revision_notifications_total"]
        > before["keyvault_revision_notifications_total"]
    )
    assert _read_status(pg_world) == 401


@PG_ONLY
def test_a_lost_notification_is_caught_by_the_periodic_recheck(pg_world_short_recheck: World):
    world = pg_world_short_recheck
    assert _read_status(world) == 200
    _until(world, "connected", _connected)
    engine = create_engine(normalize_url(world.db_url))
    try:  # every notification of the revision is lost from now on
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER keyvault_revision_notify ON revision"))
    finally:
        engine.dispose()
    _revoke_elsewhere("app-a1")
    # Refused within the re-check interval (200 ms here): retried up to a generous deadline,
    # so a busy machine does not fail it; the point is that it ends while still connected.
    deadline = time.monotonic() + TIMEOUT
    while _read_status(world) != 401:
        assert time.monotonic() < deadline, "the revoked token was still accepted"
    assert _connected(_metrics(world))  # not the fallback: the listener never dropped


def _terminate_listener(world: World, database: Database) -> None:
    assert database.server_url is not None
    engine = create_engine(normalize_url(database.server_url))
    try:
        with engine.connect() as conn:
            # In the select list: evaluated only for the rows the WHERE clause kept.
            killed = (
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = :app AND datname = :db"
                    ),
                    {"app": APPLICATION_NAME, "db": database.name},
                )
                .scalars()
                .all()
            )
    finally:
        engine.dispose()
    assert killed == [True]


@PG_ONLY
def test_while_the_listener_is_down_every_request_checks_the_database(
    pg_world_slow_retry: World, database: Database
):
    world = pg_world_slow_retry
    assert _read_status(world) == 200
    _until(world, "connected", _connected)
    _terminate_listener(world, database)
    _until(world, "disconnected", lambda m: m.get("keyvault_revision_listener_connected") == 0)
    _revoke_elsewhere("app-a1")  # its notification reaches nobody in this server
    assert _read_status(world) == 401  # the next request read the counter itself


@PG_ONLY
def test_a_dropped_listener_reconnects_and_is_notified_again(pg_world: World, database: Database):
    assert _read_status(pg_world) == 200
    _until(pg_world, "connected", _connected)
    _terminate_listener(pg_world, database)
    _until(
        pg_world,
        "reconnected",
        lambda m: _connected(m) and m.get("keyvault_revision_listener_connects_total", 0) >= 2,
    )
    assert _read_status(pg_world) == 200
    _revoke_elsewhere("app-a1")
    revision = _database_revision(pg_world)
    _until(pg_world, "heard", lambda m: m.get("keyvault_revision_heard", -1) >= revision)
    assert _read_status(pg_world) == 401


@pytest.fixture
def any_world(cli: Cli, database: Database, tmp_path: Path) -> Iterator[World]:
    yield from _world(cli, database, tmp_path)


def test_a_long_poll_returns_with_an_event_recorded_by_another_process(any_world: World):
    world = any_world
    with world.http("app-a1") as http:
        last = http.get("/v1/events").json()["last_id"]
    answer: dict = {}

    def long_poll() -> None:
        # wait=30 and a 25 s client timeout: an answer at all is the event, not the timeout.
        with world.http("app-a1") as http:
            params = {"after": last, "wait": 30}
            answer["body"] = http.get("/v1/events", params=params, timeout=25.0).json()

    poller = threading.Thread(target=long_poll)
    poller.start()
    try:
        world.import_key("c", "app:a1", other_process=True)
    finally:
        poller.join(TIMEOUT + 30)
    assert "body" in answer, "the long-poll did not answer"
    types = [(e["type"], e["cluster"], e["scope"]) for e in answer["body"]["events"]]
    assert types == [("secret.rotated", "c", "app:a1")]


@SQLITE_ONLY
def test_sqlite_reads_the_counter_on_every_request(cli: Cli, database: Database, tmp_path: Path):
    assert database.is_sqlite
    for world in _world(cli, database, tmp_path):
        assert _read_status(world) == 200
        assert "keyvault_revision_listener_connected" not in _metrics(world)
        _revoke_elsewhere("app-a1")
        assert _read_status(world) == 401  # no listener, no re-check interval: at once
