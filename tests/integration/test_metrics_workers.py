"""/metrics with `keyvault serve --workers 2`, and the audit writer's durability setting.

Workers: a real server with two workers; every scrape, whichever worker answers it, shows
the key reads of all of them, also after a worker was killed (-9) and replaced by uvicorn
(its counts stay: prometheus_client's multiprocess semantics). The directory of the metric
files is private (0700) while the server runs and gone once it stopped.

Durability: the setting reaches the audit writer's own connection, read inside a batch's
transaction (PRAGMA synchronous / SHOW synchronous_commit), on SQLite and PostgreSQL, also
when PostgreSQL's database default is synchronous_commit = off; key writes commit
synchronously whatever that default. A bad value is one `error:` line.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from keyvault.config import load_settings
from keyvault.db import make_engine
from keyvault.http.state import ServerState
from tests.support.cli import Cli, expect
from tests.support.http import REQUEST_TIMEOUT, Server, World
from tests.support.timeouts import TIMEOUT

KEY_ROUTE = re.compile(
    r'^keyvault_http_requests_total\{code="200",method="GET",'
    r'route="/v1/clusters/\{cluster\}/apps/\{appid\}"\} (\S+)$',
    re.MULTILINE,
)


def _fresh(world: World, path: str, token: str | None = None) -> httpx.Response:
    """One request on a new connection (so the kernel may hand it to either worker)."""
    headers = {"Authorization": f"Bearer {world.tokens[token]}"} if token else {}
    with httpx.Client(timeout=REQUEST_TIMEOUT, trust_env=False) as http:
        return http.get(f"{world.url}{path}", headers=headers)


def _read_keys(world: World, count: int) -> None:
    for _ in range(count):
        assert _fresh(world, "/v1/clusters/c/apps/a1", "app-a1").status_code == 200


def _scraped_reads(world: World) -> int:
    scrape = _fresh(world, "/metrics")
    assert scrape.status_code == 200
    found = KEY_ROUTE.search(scrape.text)
    return int(float(found.group(1))) if found else 0


def _pids(directory: Path) -> set[int]:
    # Each worker writes keyvault_build_info at start: one gauge file per worker process.
    return {int(p.stem.rsplit("_", 1)[1]) for p in directory.glob("gauge_max_*.db")}


def _wait_for(what: str, check):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)  # a poll's pause, bounded above; nothing waits on it to elapse
    pytest.fail(f"timed out waiting for {what}", pytrace=False)


def test_request_counters_add_up_across_workers_and_outlive_a_killed_worker(
    served: World, tmp_path
):
    served.server.stop()
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    server = Server(
        served.server.workdir,
        env={**os.environ, "TMPDIR": str(tmpdir)},
        args=("--workers", "2", "--audit-durability", "durable"),
    )
    served.server = server
    server.start()
    [directory] = list(tmpdir.glob("keyvault-metrics-*"))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    first = set(_wait_for("both workers", lambda: len(_pids(directory)) == 2 and _pids(directory)))

    _read_keys(served, 12)
    for _ in range(6):  # whichever worker answers, the same total
        assert _scraped_reads(served) == 12

    # A worker that counted dies; uvicorn starts another; the dead one's counts stay.
    counted = [p for p in first if (directory / f"counter_{p}.db").exists()]
    victim = counted[0]
    os.kill(victim, signal.SIGKILL)
    _wait_for("a replacement worker", lambda: _pids(directory) - first)
    _read_keys(served, 8)
    for _ in range(6):
        assert _scraped_reads(served) == 20
    assert (directory / f"counter_{victim}.db").exists()

    server.stop()
    assert not directory.exists(), "the metrics directory outlived the server"


@pytest.mark.parametrize(
    ("durability", "sqlite", "postgresql"), [("fast", "1", "off"), ("durable", "2", "on")]
)
def test_the_durability_setting_reaches_the_audit_writers_connection(
    cli: Cli, env: dict, db_url: str, durability: str, sqlite: str, postgresql: str
):
    expect(cli("init"))
    engine = make_engine(db_url)
    try:
        postgres = engine.dialect.name == "postgresql"
        if postgres:  # a database default of off must not weaken durable nor key writes
            with engine.begin() as conn:
                name = conn.execute(text("SELECT current_database()")).scalar_one()
                conn.execute(text(f'ALTER DATABASE "{name}" SET synchronous_commit = off'))
            plain = create_engine(db_url, poolclass=NullPool)  # without keyvault's policy
            with plain.connect() as conn:
                assert conn.execute(text("SHOW synchronous_commit")).scalar_one() == "off"
            plain.dispose()
        settings = load_settings({**env, "KEYVAULT_AUDIT_DURABILITY": durability}, actor="test")
        assert settings.audit_durability == durability

        async def effective() -> str:
            state = ServerState(settings)
            state.start()
            try:
                return await state.audit.effective_synchronous()
            finally:
                await state.aclose()

        assert asyncio.run(effective()) == (postgresql if postgres else sqlite)
        keys = make_engine(db_url)  # a new connection, after the database default changed
        try:
            with keys.connect() as conn:
                query = "SHOW synchronous_commit" if postgres else "PRAGMA synchronous"
                assert str(conn.execute(text(query)).scalar_one()) == ("on" if postgres else "2")
        finally:
            keys.dispose()
    finally:
        engine.dispose()


def test_a_bad_durability_is_one_error_line(cli: Cli, env: dict, monkeypatch):
    bad_option = cli("serve", "--audit-durability", "sometimes")
    assert bad_option.exit_code == 2
    [line] = bad_option.stderr.strip().splitlines()
    assert line.startswith("error:") and "--audit-durability" in line and "durable" in line

    monkeypatch.setenv("KEYVAULT_AUDIT_DURABILITY", "sometimes")
    bad_env = cli("secrets", "list")
    assert bad_env.exit_code != 0
    [line] = bad_env.stderr.strip().splitlines()
    assert line.startswith(
        "error: KEYVAULT_AUDIT_DURABILITY must be one of 'fast', 'durable', 'journal'"
    )

    monkeypatch.delenv("KEYVAULT_AUDIT_DURABILITY")
    home = Path(env["KEYVAULT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "keyvault.toml").write_text('[audit]\ndurability = "strict"\n')
    bad_file = cli("secrets", "list")
    assert bad_file.exit_code != 0
    [line] = bad_file.stderr.strip().splitlines()
    assert line.startswith("error: audit.durability in ") and "'strict'" in line
