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

import re
import shlex
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support import http as http_support
from tests.support.cli import KEYVAULT
from tests.support.consumers import REPO
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


# ----------------------------------------------------------------- the systemd example

UNIT = REPO / "ops" / "systemd" / "keyvault@.service"
REPLICA_ENV = REPO / "ops" / "systemd" / "keyvault-replica.env.example"
INSTALLED = "/opt/keyvault/venv/bin/keyvault"


def unit_service(path: Path = UNIT) -> tuple[dict[str, str], list[str], str]:
    """The [Service] section's Environment= assignments, EnvironmentFile= paths, ExecStart."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    service: dict[str, list[str]] = {}
    section = ""
    for line in lines:
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and section == "Service":
            key, _, value = line.partition("=")
            service.setdefault(key, []).append(value)
    env = dict(v.partition("=")[::2] for v in service.get("Environment", []))
    return env, service.get("EnvironmentFile", []), service["ExecStart"][0]


def env_file(path: Path = REPLICA_ENV) -> dict[str, str]:
    """KEY=value lines of a systemd EnvironmentFile (comments and blank lines skipped)."""
    pairs = (ln.partition("=") for ln in path.read_text().splitlines())
    return {k.strip(): v.strip() for k, _, v in pairs if k.strip() and not k.startswith("#")}


def exec_argv(exec_start: str, instance: str, env: dict[str, str]) -> list[str]:
    """ExecStart as systemd would run it for ``instance``: %i and ${VAR} expanded, the
    installed binary replaced by this checkout's ``python -m keyvault``."""
    argv = shlex.split(exec_start.replace("%i", instance))
    assert argv[0] == INSTALLED, f"ExecStart runs {argv[0]}, not {INSTALLED}"

    def value(match: re.Match[str]) -> str:
        return env[match.group(1)]

    return [*KEYVAULT, *(re.sub(r"\$\{(\w+)\}", value, a) for a in argv[1:])]


class UnitReplica(Server):
    """A replica started from the unit's command line (``%i`` = the port it is given)."""

    def __init__(self, workdir: Path, env: dict[str, str], exec_start: str) -> None:
        super().__init__(workdir)
        self.env = env
        self.exec_start = exec_start

    def launch(self) -> UnitReplica:
        self._starts += 1
        self.port = http_support.free_port()
        argv = exec_argv(self.exec_start, str(self.port), self.env)
        with (
            open(self.workdir / f"serve-{self._starts}.out", "wb") as out,
            open(self.workdir / f"serve-{self._starts}.err", "wb") as err,
        ):
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=self.env,
                cwd=self.workdir,
            )  # fmt: skip
        return self
