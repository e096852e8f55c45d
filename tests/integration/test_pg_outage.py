"""A ``keyvault serve`` through a PostgreSQL outage, as a failover or a restart of the
database looks from keyvault: every connection to its database terminated
(``pg_terminate_backend``, only this test's database: the server is shared), and new ones
refused meanwhile (``ALTER DATABASE ... ALLOW_CONNECTIONS false``).

While the database is away, key reads and long-polls answer 503 with keyvault's JSON error
(never an old key, never a 500 or a stack trace), ``/readyz`` answers 503 and ``/healthz`` 200 (the
process lives). Once it is back, reads recover by themselves (bounded poll, no restart of
keyvault), every 200 on the way is the current key, and the revision listener reconnects:
a key imported afterwards is heard through NOTIFY (the periodic re-check is 60 s here).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.cli import Cli
from tests.support.db import Database
from tests.support.dbfaults import refusing_connections, terminate_backends
from tests.support.http import Server, World, build_world, free_port, key_matches
from tests.support.revision import database_revision, revision_metrics
from tests.support.timeouts import TIMEOUT

pytestmark = pytest.mark.parametrize("blank_database", ["postgres"], indirect=True)
KEY_PATH = "/v1/clusters/c/apps/a1"


@pytest.fixture
def world(cli: Cli, database: Database, tmp_path: Path) -> Iterator[World]:
    assert database.is_postgres
    workdir = tmp_path / "serve"
    workdir.mkdir()
    with pytest.MonkeyPatch.context() as mp:  # read by the server at its start
        mp.setenv("KEYVAULT_REVISION_RECHECK_MS", "60000")
        built = build_world(cli, database.url, workdir)
    try:
        yield built
    finally:
        built.server.stop()


def _read(world: World) -> httpx.Response:
    with world.http("app-a1") as http:
        return http.get(KEY_PATH)


def _is_current(world: World, response: httpx.Response) -> bool:
    return response.status_code == 200 and key_matches(world, response.json(), "c", "app:a1")


def _refused_cleanly(response: httpx.Response) -> bool:
    """503 with keyvault's JSON error body, no trace of a stack or of a key."""
    body = response.json()
    return (
        response.status_code == 503
        and body.get("error") == "database_error"
        and bool(body.get("request_id"))
        and "Traceback" not in response.text
        and "key" not in body
    )


def _until(what: str, condition) -> object:
    deadline = time.monotonic() + TIMEOUT
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.05)  # the pause between polls (the condition is what is waited for)


def _listener(world: World, connects: int) -> bool:
    m = revision_metrics(world.url)
    return (
        m.get("keyvault_revision_listener_connected") == 1
        and m.get("keyvault_revision_listener_connects_total", 0) >= connects
    )


def _recover(world: World) -> list[int]:
    """Read until the current key comes back; the statuses seen on the way."""
    seen: list[int] = []

    def current() -> bool:
        response = _read(world)
        seen.append(response.status_code)
        if response.status_code == 200:
            ok = _is_current(world, response)
            assert ok, "a 200 that is not the current key"
            return True
        assert _refused_cleanly(response), f"HTTP {response.status_code} while recovering"
        return False

    _until("a key read answered again", current)
    return seen


def _outage(world: World, database: Database) -> None:
    assert database.server_url is not None
    with refusing_connections(database.server_url, database.name, cut=True):
        for _ in range(5):
            response = _read(world)
            assert _refused_cleanly(response), f"HTTP {response.status_code} during the outage"
        with world.http() as http:
            assert http.get("/readyz").status_code == 503
            assert http.get("/healthz").status_code == 200
        with world.http("app-a1") as http:  # a long-poll too: 503, not a wait or a 500
            assert _refused_cleanly(http.get("/v1/events?after=0&wait=5"))
        _until("the listener noticed", lambda: not _listener(world, 1))


def test_reads_answer_503_while_postgres_is_away_and_recover_by_themselves(
    world: World, database: Database
):
    assert _is_current(world, _read(world))
    _until("the listener connected", lambda: _listener(world, 1))
    _outage(world, database)
    # The very first read once it is back: the pool checks a connection before use and
    # the audit writer opens a new one (both had lost theirs).
    assert _recover(world) == [200]
    _until("the listener reconnected", lambda: _listener(world, 2))
    world.import_key("c", "app:a1")  # heard by NOTIFY: the re-check is a minute away
    revision = database_revision(world.db_url)
    _until(
        "the new revision heard",
        lambda: revision_metrics(world.url).get("keyvault_revision_heard", -1) >= revision,
    )
    assert _is_current(world, _read(world))
    with world.http() as http:
        assert http.get("/readyz").status_code == 200


def test_a_second_outage_is_survived_too(world: World, database: Database):
    # Two in a row: what a switchover and a switch back look like.
    assert _is_current(world, _read(world))
    for connects in (2, 3):
        _outage(world, database)
        _recover(world)
        _until(f"the listener reconnected ({connects})", lambda c=connects: _listener(world, c))
        world.import_key("c", "app:a1")
        assert _is_current(world, _read(world))


def test_terminated_connections_alone_cost_no_failed_read(world: World, database: Database):
    # pg_terminate_backend without refusing new connections (an admin, a pooler restart):
    # the pool's pre-ping replaces the dead connections, the listener reconnects.
    assert database.server_url is not None
    assert _is_current(world, _read(world))
    _until("the listener connected", lambda: _listener(world, 1))
    assert terminate_backends(database.server_url, database.name) >= 1
    assert _is_current(world, _read(world))  # the audit record: written on a new connection
    _until("the listener reconnected", lambda: _listener(world, 2))
    world.import_key("c", "app:a1")
    assert _is_current(world, _read(world))
    assert terminate_backends(database.server_url, database.name) >= 1
    with world.http() as http:  # the audit probe of /readyz reconnects the same way
        assert http.get("/readyz").status_code == 200


def test_a_multi_host_url_connects_to_the_host_that_answers(world: World, database: Database):
    # libpq's failover list, as docs/deployment.md shows it: the first host refuses, the
    # second takes writes (target_session_attrs=read-write). Serve, its listener and the CLI.
    url = _multi_host(database.url)
    workdir = world.server.workdir / "multi-host"
    workdir.mkdir()
    server = Server(workdir, env={**world.server.env, "KEYVAULT_DATABASE_URL": url}).start()
    try:
        _until("the listener connected", lambda: _listener_at(server.url))
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KEYVAULT_DATABASE_URL", url)
            world.import_key("c", "app:a1", other_process=True)
        with httpx.Client(base_url=server.url, timeout=15.0, trust_env=False) as http:
            response = http.get(KEY_PATH, headers=_bearer(world))
        assert _is_current(world, response)
    finally:
        server.stop()


def _multi_host(url: str) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    assert parsed.password is None  # the test server trusts loopback; no secret to quote
    hosts = f"host=127.0.0.1:{free_port()}&host={parsed.host}:{parsed.port or 5432}"
    return (
        f"postgresql+psycopg://{parsed.username}@/{parsed.database}"
        f"?{hosts}&target_session_attrs=read-write"
    )


def _listener_at(url: str) -> bool:
    return revision_metrics(url).get("keyvault_revision_listener_connected") == 1


def _bearer(world: World) -> dict[str, str]:
    return {"Authorization": f"Bearer {world.tokens['app-a1']}"}
