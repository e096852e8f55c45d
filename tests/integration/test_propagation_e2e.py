"""Propagation end to end, on SQLite and PostgreSQL: the TA simulator (`keyvault sandbox up`:
ta-tool over its SSH front, the Open API emulator), real `keyvault serve` processes, and
consumers that are this test's HTTP reads with an ``X-Keyvault-Consumer`` header.

Every wait is a bounded poll of a condition (the store, a process's exit), never a sleep:
a server writes what it saw within about a second, and the test waits for exactly that.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from keyvault.sandbox import state as st
from keyvault.sandbox.run import SandboxPaths, stop
from tests.support.cli import KEYVAULT, Cli, Home, describe, expect, spawn_process
from tests.support.http import REQUEST_TIMEOUT, CountingReceiver, Server
from tests.support.timeouts import TIMEOUT

APP = "app1"
SCOPE = f"app:{APP}"
CLUSTER = "sandbox"
EXIT_STRAGGLERS, EXIT_OLD_KEY_ACCEPTED = 4, 5


@dataclass
class Fleet:
    """The simulator, the store, one server and the tokens the consumers use."""

    cli: Cli
    home: Home
    server: Server
    engine: object
    tokens: dict[str, str] = field(default_factory=dict, repr=False)
    servers: list[Server] = field(default_factory=list)

    def read(self, consumer: str, token: str = "fleet", server: Server | None = None) -> int:
        """One key read as ``consumer``; the version served (the key itself is not kept)."""
        url = (server or self.server).url
        headers = {"Authorization": f"Bearer {self.tokens[token]}", "X-Keyvault-Consumer": consumer}
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT, trust_env=False) as http:
            answer = http.get(f"/v1/clusters/{CLUSTER}/apps/{APP}", headers=headers)
        assert answer.status_code == 200, answer.status_code
        return answer.json()["version"]

    def consumers(self) -> list[dict]:
        return json.loads(expect(self.cli("consumers", "--cluster", CLUSTER, "--json")).stdout)

    def wait_consumers(self, ok: Callable[[dict[tuple[str, str], dict]], bool]) -> dict:
        """Poll `keyvault consumers` until ``ok(rows by (token, consumer))`` (bounded)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            rows = {(r["token"], r["consumer"]): r for r in self.consumers()}
            if ok(rows):
                return rows
            assert time.monotonic() < deadline, f"consumers never matched: {rows}"
            time.sleep(0.05)  # a poll interval, not a synchronisation

    def events(self, kind: str) -> list[dict]:
        with self.engine.connect() as conn:  # type: ignore[attr-defined]
            found = conn.execute(
                text("SELECT payload FROM events WHERE type = :t ORDER BY id"), {"t": kind}
            )
            return [json.loads(p) for (p,) in found]

    def current_version(self) -> int:
        rows = json.loads(
            expect(
                self.cli("secrets", "history", "--cluster", CLUSTER, "--appid", APP, "--json")
            ).stdout
        )
        return max(r["version"] for r in rows if r["state"] == "current")


def _token(cli: Cli, name: str) -> str:
    made = expect(cli("token", "create", name, "--scope", f"app:{CLUSTER}/{APP}", "--json"))
    return json.loads(made.stdout)["token"]


@pytest.fixture
def fleet(home: Home, cli: Cli, engine, tmp_path: Path) -> Iterator[Fleet]:
    expect(cli("init"))
    servers: list[Server] = []
    try:
        expect(cli("sandbox", "up", "--ssh-port", "0", "--api-port", "0", "--apps", APP))
        first = json.loads(
            expect(cli("rotate", "app", "--cluster", CLUSTER, APP, "--yes", "--json")).stdout
        )
        assert first["results"][0]["old_key"] == "unchecked"  # no previous key to try
        workdir = tmp_path / "serve"
        workdir.mkdir()
        servers.append(Server(workdir).launch())
        f = Fleet(cli=cli, home=home, server=servers[0], engine=engine, servers=servers)
        f.tokens = {"fleet": _token(cli, "fleet"), "fleet2": _token(cli, "fleet2")}
        f.server.wait_healthy()
        yield f
    finally:
        for server in servers:
            server.stop()
        stop(SandboxPaths(home.path))


def _rotate(*extra: str):
    """`keyvault rotate app` as its own process (it runs while the test reads)."""
    return spawn_process([*KEYVAULT, "rotate", "app", "--cluster", CLUSTER, APP, "--yes", *extra])


def _stale(names: set[str]) -> Callable[[dict], bool]:
    return lambda rows: {c for (_, c), r in rows.items() if r["stale"]} == names


def test_consumers_are_recorded_and_a_rotation_waits_until_all_hold_the_new_key(fleet: Fleet):
    assert fleet.read("svc-a") == fleet.read("svc-b") == 1
    rows = fleet.wait_consumers(lambda rows: len(rows) == 2)
    assert {k: (r["version"], r["stale"], r["cluster"], r["scope"]) for k, r in rows.items()} == {
        ("fleet", "svc-a"): (1, False, CLUSTER, SCOPE),
        ("fleet", "svc-b"): (1, False, CLUSTER, SCOPE),
    }

    plan = json.loads(
        expect(fleet.cli("rotate", "app", "--cluster", CLUSTER, APP, "--plan", "--json")).stdout
    )
    assert [c["consumer"] for c in plan["plan"][0]["consumers"]] == ["svc-a", "svc-b"]
    assert fleet.current_version() == 1  # --plan rotated nothing

    waiting = _rotate("--json", "--wait-propagation", str(TIMEOUT))
    fleet.wait_consumers(_stale({"svc-a", "svc-b"}))  # v2 is stored: both hold a dead key
    assert fleet.read("svc-a") == fleet.read("svc-b") == 2
    out, err = waiting.communicate(timeout=TIMEOUT)
    assert waiting.returncode == 0, err
    result = json.loads(out)["results"][0]
    assert (result["new_version"], result["verify_state"], result["old_key"]) == (
        2,
        "verified",
        "rejected",
    )
    assert "2/2 consumer(s) hold v2" in err

    # The fixture's rotation (v1) propagated when they first read, this one once they re-read.
    [event] = [e for e in fleet.events("rotation.propagated") if e["version"] == 2]
    assert (event["rotation_id"], event["consumers"]) == (result["rotation_id"], 2)
    shown = json.loads(
        expect(fleet.cli("rotations", "show", result["rotation_id"], "--json")).stdout
    )
    assert shown["old_key"] == "rejected"
    p = shown["propagation"]
    assert (p["consumers"], p["updated"], p["stale"], p["complete"]) == (2, 2, [], True)
    assert p["propagated_at"] and p["last_updated_at"]

    # svc-b never re-reads: the wait runs out, names it, and exits 4.
    straggling = _rotate("--wait-propagation", "3")
    fleet.wait_consumers(_stale({"svc-a", "svc-b"}))
    assert fleet.read("svc-a") == 3
    out, err = straggling.communicate(timeout=TIMEOUT)
    assert straggling.returncode == EXIT_STRAGGLERS, err
    assert "fleet/svc-b (v2)" in err and "still on an old key" in err
    fleet.wait_consumers(_stale({"svc-b"}))
    table = expect(fleet.cli("consumers", "--cluster", CLUSTER, "--appid", APP)).stdout
    assert "svc-b" in table and "True" in table
    # the third rotation did not propagate
    assert [e["version"] for e in fleet.events("rotation.propagated")] == [1, 2]

    # The stale metric, per scope.
    with httpx.Client(base_url=fleet.server.url, timeout=REQUEST_TIMEOUT, trust_env=False) as http:
        scrape = http.get("/metrics").text
    samples = {
        (s.name, s.labels.get("scope")): s.value
        for f in text_string_to_metric_families(scrape)
        for s in f.samples
        if s.labels.get("cluster") == CLUSTER
    }
    assert samples[("keyvault_stale_consumers", SCOPE)] == 1
    assert samples[("keyvault_consumers", SCOPE)] == 2
    assert samples[("keyvault_old_key_accepted", SCOPE)] == 0


def test_a_previous_key_ta_still_accepts_is_an_alert(fleet: Fleet, receiver: CountingReceiver):
    hook = (
        "webhook",
        "add",
        "--allow-private-network",
        receiver.url,
        "--scope",
        f"app:{CLUSTER}/*",
    )
    expect(fleet.cli(*hook))
    paths = SandboxPaths(fleet.home.path)
    st.set_noise(paths.state_dir, accept_old_keys=True)
    rotated = fleet.cli("rotate", "app", "--cluster", CLUSTER, APP, "--yes", "--json")
    assert rotated.exit_code == EXIT_OLD_KEY_ACCEPTED, describe(rotated)
    assert "TA still accepts the previous key (v1)" in rotated.stderr
    result = json.loads(rotated.stdout)["results"][0]
    assert (result["old_key"], result["verify_state"]) == ("still_accepted", "verified")
    [event] = fleet.events("rotation.old_key_accepted")
    assert (event["rotation_id"], event["old_version"]) == (result["rotation_id"], 1)
    delivered = fleet.cli("webhook", "deliver", "--allow-private-network", "--json")
    assert json.loads(expect(delivered).stdout)["delivered"] >= 1
    sent = json.loads(expect(fleet.cli("webhook", "deliveries", "--json")).stdout)
    assert {"rotation.old_key_accepted", "secret.rotated"} <= {d["type"] for d in sent}
    assert receiver.requests >= 2
    shown = expect(fleet.cli("rotations", "show", result["rotation_id"])).stdout
    assert "old_key          still_accepted" in shown
    status = fleet.cli("status", "--json")
    assert status.exit_code == 3, describe(status)
    [finding] = [f for f in json.loads(status.stdout)["findings"] if f["check"] == "old_keys"]
    assert finding["status"] == "attention" and result["rotation_id"] in finding["detail"]

    st.set_noise(paths.state_dir, accept_old_keys=None)  # TA invalidates again
    again = json.loads(
        expect(fleet.cli("rotate", "app", "--cluster", CLUSTER, APP, "--yes", "--json")).stdout
    )
    assert again["results"][0]["old_key"] == "rejected"
    status = json.loads(fleet.cli("status", "--json").stdout)
    assert [f["status"] for f in status["findings"] if f["check"] == "old_keys"] == ["ok"]


def test_two_servers_record_a_propagation_exactly_once(fleet: Fleet, tmp_path: Path):
    other = Server(tmp_path).launch()
    fleet.servers.append(other)
    other.wait_healthy()
    for consumer in ("svc-a", "svc-b"):
        fleet.read(consumer, "fleet", fleet.server)
        fleet.read(consumer, "fleet2", other)
    fleet.wait_consumers(lambda rows: len(rows) == 4)
    rotated = json.loads(
        expect(fleet.cli("rotate", "app", "--cluster", CLUSTER, APP, "--yes", "--json")).stdout
    )
    rid = rotated["results"][0]["rotation_id"]
    for consumer in ("svc-a", "svc-b"):  # each server writes and checks its own token's rows
        assert fleet.read(consumer, "fleet", fleet.server) == 2
        assert fleet.read(consumer, "fleet2", other) == 2
    # Each server commits its rows with its check: once all four are on v2, both have checked.
    fleet.wait_consumers(
        lambda rows: len(rows) == 4 and all(r["version"] == 2 for r in rows.values())
    )
    assert [e["rotation_id"] for e in fleet.events("rotation.propagated") if e["version"] == 2] == [
        rid
    ]


def test_a_failed_scope_of_a_bulk_run_still_alerts_and_waits(fleet: Fleet):
    """One failed scope (exit 1) must not hide the old-key alert (5 wins) nor skip the wait."""
    paths = SandboxPaths(fleet.home.path)
    st.set_noise(paths.state_dir, accept_old_keys=True)
    bulk = ("rotate", "app", "--cluster", CLUSTER, APP, "ghost", "--yes", "--json")
    rotated = fleet.cli(*bulk)
    assert rotated.exit_code == EXIT_OLD_KEY_ACCEPTED, describe(rotated)
    assert "TA still accepts the previous key (v1)" in rotated.stderr
    summary = json.loads(rotated.stdout)["summary"]
    assert (summary["rotated"], summary["failed"]) == (1, 1)

    st.set_noise(paths.state_dir, accept_old_keys=None)
    assert fleet.read("laggard") == fleet.current_version()  # then never reads again
    fleet.wait_consumers(lambda rows: ("fleet", "laggard") in rows)
    waited = fleet.cli(*bulk, "--wait-propagation", "0")
    assert waited.exit_code == 1, describe(waited)  # the failure wins over the stragglers (4)
    assert "fleet/laggard" in waited.stderr  # the wait ran and named who is behind


def test_gone_consumers_stop_holding_a_rotation_back(fleet: Fleet):
    """A revoked token's consumer, and one forgotten with `consumers forget`, are not known."""
    fleet.read("main")
    fleet.read("one-off")
    fleet.read("retired", token="fleet2")
    fleet.wait_consumers(lambda rows: len(rows) == 3)
    rotated = json.loads(
        expect(fleet.cli("rotate", "app", "--cluster", CLUSTER, APP, "--yes", "--json")).stdout
    )
    rid = rotated["results"][0]["rotation_id"]
    assert fleet.read("main") == 2
    fleet.wait_consumers(_stale({"one-off", "retired"}))

    def propagation() -> dict:
        shown = expect(fleet.cli("rotations", "show", rid, "--json")).stdout
        return json.loads(shown)["propagation"]

    assert (propagation()["consumers"], propagation()["complete"]) == (3, False)
    expect(fleet.cli("token", "revoke", "fleet2", "--yes"))
    assert propagation()["consumers"] == 2  # was 3 for 30 days: the token can never read again

    forget = ("consumers", "forget", "--token", "fleet", "--consumer", "one-off")
    refused = fleet.cli(*forget)  # no terminal, no --yes: nothing is forgotten
    assert refused.exit_code != 0 and "--yes" in refused.stderr
    forgot = expect(fleet.cli(*forget, "--cluster", CLUSTER, "--appid", APP, "--yes"))
    assert "forgot 1 consumer record(s)" in forgot.stdout
    assert f"rotation {rid} propagated" in forgot.stdout
    p = propagation()
    assert (p["consumers"], p["updated"], p["complete"]) == (1, 1, True) and p["propagated_at"]
    audit = json.loads(expect(fleet.cli("audit", "list", "--json")).stdout)
    outcomes = [r["outcome"] for r in audit if r["action"] == "consumers.forget"]
    assert outcomes == ["ok", "pending", "usage_error", "pending"]  # newest first
    assert {c["consumer"] for c in fleet.consumers()} == {"main", "retired"}  # one-off is gone
