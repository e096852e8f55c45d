"""`keyvault sandbox up|status|add-apps|down` against a temporary KEYVAULT_HOME (SQLite).

The simulator runs as a real background process on free loopback ports; every test
stops it at teardown even when it fails halfway.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from keyvault.sandbox import state as st
from keyvault.sandbox.run import SandboxPaths, stop
from tests.support.cli import Cli, clear_keyvault_env, describe, expect, process_gone

KEY_RE = re.compile(r"(?<![A-Za-z0-9])[A-Za-z0-9]{64}(?![A-Za-z0-9])")
FREE_PORTS = ("--ssh-port", "0", "--api-port", "0")


@pytest.fixture
def kvhome(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "kvhome"
    clear_keyvault_env(monkeypatch)  # KEYVAULT_DATABASE_URL among them: SQLite in the home
    monkeypatch.setenv("KEYVAULT_HOME", str(home))
    monkeypatch.setenv("KEYVAULT_ACTOR", "pytest")
    yield home
    stop(SandboxPaths(home))


@pytest.fixture
def run() -> Cli:
    return Cli()


def registered(home: Path):
    from keyvault.db import make_engine, session_factory, transaction
    from keyvault.services.clusters import cluster_options, get_cluster
    from keyvault.services.hosts import list_hosts

    engine = make_engine(f"sqlite:///{home / 'keyvault.db'}")
    try:
        with transaction(session_factory(engine)) as session:
            cluster = get_cluster(session, name="sandbox")
            hosts = [
                {
                    "address": h.address,
                    "port": h.port,
                    "username": h.username,
                    "become": h.become,
                    "ta_user": h.ta_user,
                    "identity_file": h.identity_file,
                    "fingerprint": h.host_key_fingerprint,
                }
                for h in list_hosts(session, cluster_name="sandbox")
            ]
            return cluster.open_api_url, cluster_options(cluster), hosts
    finally:
        engine.dispose()


def no_key_in(result, *keys) -> None:
    text = result.stdout + result.stderr
    assert not KEY_RE.search(text)
    for key in keys:
        assert key is None or key not in text


def test_up_needs_init_and_starts_nothing(kvhome, run):
    result = run("sandbox", "up", *FREE_PORTS)
    assert result.exit_code != 0, describe(result)
    assert "keyvault init" in result.stderr
    assert not (kvhome / "sandbox" / "sandbox.pid").exists()


def test_status_and_down_when_nothing_runs(kvhome, run):
    status = json.loads(expect(run("sandbox", "status", "--json")).stdout)
    assert status["running"] is False and status["simulator"] is True
    assert "not running" in expect(run("sandbox", "down")).stdout


def test_up_registers_status_reports_down_stops(kvhome, run):
    expect(run("init"))
    up = expect(run("sandbox", "up", *FREE_PORTS))
    assert "simulator" in up.stdout and "not TA" in up.stdout
    assert "keyvault rotate root --cluster sandbox --yes" in up.stdout

    status = json.loads(expect(run("sandbox", "status", "--json")).stdout)
    assert status["running"] is True
    pid, ssh_port, api_port = status["pid"], status["ssh_port"], status["api_port"]
    assert ssh_port > 0 and api_port > 0 and not process_gone(pid)
    assert set(status["apps"]) == {"demo", "app1", "app2", "app3"}
    paths = SandboxPaths(kvhome)
    info = json.loads(paths.info_file.read_text())
    assert info["pid"] == pid and info["ssh_port"] == ssh_port
    assert paths.client_key.stat().st_mode & 0o777 == 0o600

    url, options, hosts = registered(kvhome)
    assert url == f"http://127.0.0.1:{api_port}"
    assert options["login_name"] == "root"
    state = st.read_state(paths.state_dir)
    assert options["project_ids"] == {a: v["project_id"] for a, v in state["apps"].items()}
    assert hosts == [
        {
            "address": "127.0.0.1",
            "port": ssh_port,
            "username": "root",
            "become": "su",
            "ta_user": "ta",
            "identity_file": str(paths.client_key),
            "fingerprint": status["host_key_fingerprint"],
        }
    ]

    # a second `up` finds it running and leaves one host registered
    again = expect(run("sandbox", "up", *FREE_PORTS))
    assert "already running" in again.stdout
    assert json.loads(expect(run("sandbox", "status", "--json")).stdout)["pid"] == pid
    assert len(registered(kvhome)[2]) == 1

    # the registration works end to end: keyvault reaches ta-tool through the SSH front
    expect(run("host", "check", "sandbox"))
    rotated = run("rotate", "root", "--cluster", "sandbox", "--yes")
    expect(rotated)
    assert st.generations(paths.state_dir, "root") == 1
    no_key_in(rotated, st.current_key(paths.state_dir, "root"))

    added = expect(run("sandbox", "add-apps", "extra"))
    assert "extra" in added.stdout
    assert "extra" in registered(kvhome)[1]["project_ids"]

    down = expect(run("sandbox", "down"))
    assert str(pid) in down.stdout
    assert process_gone(pid)  # `down` returns only once the server has exited
    assert not paths.pid_file.exists() and not paths.info_file.exists()
    assert json.loads(expect(run("sandbox", "status", "--json")).stdout)["running"] is False

    log = paths.log_file.read_text()
    assert not KEY_RE.search(log)
    assert "refusing" not in log
