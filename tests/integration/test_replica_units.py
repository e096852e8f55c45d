"""The two-replica example of docs/deployment.md, run from its own files: the command line
and environment of ops/systemd/keyvault@.service (instances keyvault@PORT) with
ops/systemd/keyvault-replica.env.example, on a PostgreSQL database of the test server.

What is substituted, and nothing else: the installed binary becomes this checkout's
``python -m keyvault``; KEYVAULT_HOME the test's home; in the example database URL the
host list's first host becomes a port nobody listens on and the second the test server,
the database and user the test's (the query, target_session_attrs included, is kept);
PGPASSFILE is dropped (the test server trusts loopback). systemd-analyze checks the same
units in CI (ops/systemd/verify.sh).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import make_url

from keyvault_client import Client
from tests.support.cli import Home
from tests.support.consumers import consumer_env
from tests.support.failover import (
    UnitReplica,
    env_file,
    kill9,
    read_key,
    stop_all,
    unit_service,
)
from tests.support.http import World, free_port

pytestmark = pytest.mark.parametrize("blank_database", ["postgres"], indirect=True)


def _database_url(example: str, test_url: str) -> str:
    """The example's URL pointed at the test database, its form and query kept."""
    test = make_url(test_url)
    example_url = make_url(example)
    hosts = example_url.query["host"]
    assert isinstance(hosts, tuple) and len(hosts) == 2, "the example lists two hosts"
    url = example.replace(hosts[0], f"127.0.0.1:{free_port()}", 1)
    url = url.replace(hosts[1], f"{test.host}:{test.port or 5432}", 1)
    url = url.replace(f"/{example_url.database}?", f"/{test.database}?", 1)
    return url.replace(f"//{example_url.username}@", f"//{test.username}@", 1)


def _replica_env(home: Home, db_url: str) -> dict[str, str]:
    unit_env, env_files, _ = unit_service()
    assert env_files[0] == "/etc/keyvault/replica.env"
    example = env_file()
    assert set(example) >= {"KEYVAULT_DATABASE_URL", "PGPASSFILE"}
    env = {**unit_env, **example}
    assert env["KEYVAULT_HOME"] == "/var/lib/keyvault" and env["BIND"] == "127.0.0.1"
    env["KEYVAULT_HOME"] = str(home.path)
    env["KEYVAULT_DATABASE_URL"] = _database_url(example["KEYVAULT_DATABASE_URL"], db_url)
    del env["PGPASSFILE"]
    return consumer_env(env)


@pytest.fixture
def unit_replicas(served: World, home: Home, tmp_path) -> Iterator[list[UnitReplica]]:
    env = _replica_env(home, served.db_url)
    exec_start = unit_service()[2]
    replicas = []
    try:
        for n in (1, 2):
            workdir = tmp_path / f"keyvault@{n}"
            workdir.mkdir()
            replicas.append(UnitReplica(workdir, env, exec_start).launch())
        for replica in replicas:
            replica.wait_healthy()
        yield replicas
    finally:
        stop_all(replicas)


def test_two_replicas_from_the_units_serve_and_fail_over(served: World, unit_replicas):
    world = served
    for replica in unit_replicas:
        assert read_key(world, replica.url, "app-all", "c", "app:a1") == (200, True)
        assert replica.env["KEYVAULT_DATABASE_URL"].count("host=") == 2
    kv = Client([r.url for r in unit_replicas], world.tokens["app-all"], retries=1, backoff=0.05)
    kill9(unit_replicas[0])
    world.import_key("c", "app:a1")
    info = kv.get_app("c", "a1")
    ok = info.key == world.keys[("c", "app:a1")] and info.version == 2
    assert ok and kv.url == unit_replicas[1].url
