"""Two ``keyvault serve`` replicas on one database, for the failover tests.

    pair = replica_pair(world)        # world.server is replica 0; a second one is started
    kill9(pair[0])                    # SIGKILL, reaped: no graceful shutdown at all
    restart(pair[0])                  # the same port again (consumers know only that URL)

Both replicas run from the same environment (``KEYVAULT_DATABASE_URL``, master key file)
as the World's server, each with a working directory of its own. On PostgreSQL that is
the deployment of docs/deployment.md ("Several replicas on PostgreSQL"); on SQLite, two
processes on one file on one machine (WAL: readers and one writer across processes).

``read_key`` fetches a key over plain HTTP and reports the status and whether the body is
the World's current key, never the key itself.
"""

from __future__ import annotations

import subprocess

import httpx
import pytest

from tests.support import http as http_support
from tests.support.http import REQUEST_TIMEOUT, Server, World, key_matches
from tests.support.timeouts import TIMEOUT


def replica_pair(world: World) -> list[Server]:
    """The World's server and a second replica on the same database (started, healthy)."""
    workdir = world.server.workdir / "replica-1"
    workdir.mkdir(exist_ok=True)
    second = Server(workdir, env=dict(world.server.env), args=world.server.args)
    return [world.server, second.start()]


def kill9(server: Server) -> None:
    """SIGKILL the replica and reap it (its port then refuses connections)."""
    proc = server.proc
    assert proc is not None, "the replica is not running"
    proc.kill()
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"replica on port {server.port} survived SIGKILL", pytrace=False)
    server.proc = None


def restart(server: Server) -> None:
    """Start a stopped replica again on the port it had."""
    port = server.port
    assert port is not None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(http_support, "free_port", lambda: port)
        server.start()


def read_key(world: World, url: str, token: str, cluster: str, scope: str) -> tuple[int, bool]:
    """GET the key of (cluster, scope) from ``url``: (status, body is the current key)."""
    path = f"/v1/clusters/{cluster}/" + ("root" if scope == "root" else f"apps/{scope[4:]}")
    headers = {"Authorization": f"Bearer {world.tokens[token]}"}
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT, trust_env=False) as http:
        response = http.get(path, headers=headers)
    current = response.status_code == 200 and key_matches(world, response.json(), cluster, scope)
    return response.status_code, current


def stop_all(servers: list[Server]) -> None:
    for server in servers:
        server.stop()
