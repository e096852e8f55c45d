"""`keyvault serve` as operators run it: `--port 0` prints the port it bound, `--log-format
json` writes one JSON object per line with one access line per request (request id, route
template, status; never a token or a key), and /metrics exports what the example alert rules
in ops/prometheus/ use, with values read from the store (SQLite and PostgreSQL).

A real server process on 127.0.0.1 (tests/support/http.py); every wait is bounded.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

import keyvault
from keyvault.models import Rotation, utcnow
from tests.support.cli import expect, proc_describe, run_keyvault
from tests.support.http import REQUEST_TIMEOUT, World, scrub
from tests.support.timeouts import TIMEOUT

# Upper bounds for a process to print its port and answer, and to stop (never durations
# that must elapse): the shared TIMEOUT, generous for two busy cores.
START_DEADLINE = STOP_DEADLINE = TIMEOUT
MADE_UP_ID = "[0-9a-f]{12}-[0-9a-f]+"  # made by the server: per-process prefix, counter
ALERTS = Path(__file__).resolve().parents[2] / "ops" / "prometheus" / "keyvault-alerts.yml"
LISTENING = re.compile(r"keyvault listening on http://127\.0\.0\.1:(\d+) ")
SUFFIXES = {  # sample names Prometheus stores for a family, by type
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
}


class _Lines:
    """The stderr lines of a process, read by a thread into a queue (bounded waits only)."""

    def __init__(self, stream) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.queue.put(line.rstrip("\n"))
        self.queue.put(None)

    def wait_for(self, pattern: re.Pattern[str], deadline: float) -> re.Match[str]:
        while True:
            line = self.queue.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                pytest.fail(f"the server exited: {scrub(chr(10).join(self.seen))[-1500:]}")
            self.seen.append(line)
            if match := pattern.search(line):
                return match

    def rest(self) -> list[str]:
        self.thread.join(STOP_DEADLINE)
        while (line := self.queue.get(timeout=STOP_DEADLINE)) is not None:
            self.seen.append(line)
        return self.seen


def _wait_healthy(url: str, proc: subprocess.Popen, deadline: float) -> None:
    with httpx.Client(timeout=2.0, trust_env=False) as http:
        while time.monotonic() < deadline:
            try:
                if http.get(f"{url}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            try:  # the pause between polls doubles as the early-exit check
                proc.wait(timeout=0.05)
                pytest.fail("the server exited before it answered /healthz")
            except subprocess.TimeoutExpired:
                pass
    pytest.fail(f"no answer on {url}/healthz within {START_DEADLINE:g}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_DEADLINE)


def _serve_port_0(world: World, cwd: Path, *options: str, talk) -> tuple[object, str]:
    """Run `keyvault serve --port 0 OPTIONS`, call ``talk(url)`` once it answers, stop it;
    return what ``talk`` returned and everything the server wrote on stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyvault", "serve", "--port", "0", *options],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=world.server.env,
        cwd=cwd,
    )
    lines = _Lines(proc.stderr)
    try:
        deadline = time.monotonic() + START_DEADLINE
        port = int(lines.wait_for(LISTENING, deadline).group(1))
        assert port != 0
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, deadline)
        result = talk(url)
    finally:
        _stop(proc)
        seen = lines.rest()
        proc.stderr.close()
    output = "\n".join(seen)
    assert not world.holds_key(output), "a key in the server log"
    assert not any(token in output for token in world.tokens.values()), "a token in the log"
    return result, output


def test_serve_port_0_prints_its_port_and_logs_json_access_lines(served: World, tmp_path):
    world = served

    def talk(url: str) -> tuple[httpx.Response, ...]:
        headers = {"Authorization": f"Bearer {world.tokens['root-c']}"}
        with httpx.Client(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT) as http:
            return (
                http.get("/v1/clusters/c/root", headers={"X-Request-ID": "trace-read-1"}),
                http.get("/v1/clusters/c/apps/a1", headers={"X-Request-ID": "x" * 200}),
                http.get("/v1/nothing-here"),
            )

    (read, refused, missing), output = _serve_port_0(
        world, tmp_path, "--log-format", "json", talk=talk
    )
    assert (read.status_code, read.headers["x-request-id"]) == (200, "trace-read-1")
    assert refused.status_code == 403
    made_up = refused.headers["x-request-id"]  # 200 characters is not sane: replaced
    assert re.fullmatch(MADE_UP_ID, made_up) and refused.json()["request_id"] == made_up
    assert missing.json()["request_id"] == missing.headers["x-request-id"]

    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    others = [line for line in output.splitlines() if not line.startswith("{")]
    assert all(LISTENING.search(line) for line in others), others  # all else is JSON
    access = {
        r["request_id"]: (r["method"], r["route"], r["status"])
        for r in records
        if r["logger"] == "keyvault.http.access"
    }
    assert access["trace-read-1"] == ("GET", "/v1/clusters/{cluster}/root", 200)
    assert access[made_up] == ("GET", "/v1/clusters/{cluster}/apps/{appid}", 403)
    assert access[missing.headers["x-request-id"]] == ("GET", "unmatched", 404)


def test_serve_no_access_log_writes_no_access_lines(served: World, tmp_path):
    def talk(url: str) -> int:
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT) as http:
            return http.get("/v1/clusters/c/root").status_code

    status, output = _serve_port_0(served, tmp_path, "--no-access-log", talk=talk)
    assert status == 401
    assert "keyvault.http.access" not in output, scrub(output)[-800:]


def test_serve_on_a_taken_port_is_a_one_line_error(served: World):
    taken = served.server.port
    result = run_keyvault("serve", "--port", str(taken), env=served.server.env)
    assert result.returncode == 1, proc_describe(result)
    assert result.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{taken}: Address already in use; "
        "choose another --port or --host, or stop the process using it"
    ], proc_describe(result)


def _exported_names(families) -> set[str]:
    return {f.name + suffix for f in families.values() for suffix in SUFFIXES.get(f.type, ("",))}


def _alert_rules() -> list[dict]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _seed_rotations(engine) -> dict:
    """A finished scheduled rotation (90 s), a failed one, and one unresolved for an hour."""
    now = utcnow()
    rows = [  # id, state, actor, created, updated
        ("rot-sched-ok", "completed", "scheduler", now - timedelta(hours=3), None),
        ("rot-failed", "failed", "token:x", now - timedelta(hours=2), None),
        ("rot-stuck", "needs_recovery", "token:x", now - timedelta(hours=1), None),
    ]
    with engine.begin() as conn:
        cluster_id = conn.scalar(text("SELECT id FROM clusters WHERE name = 'c'"))
        for rid, state, actor, created, _ in rows:
            conn.execute(
                Rotation.__table__.insert().values(
                    id=rid,
                    cluster_id=cluster_id,
                    scope="root" if rid != "rot-stuck" else "app:a2",
                    state=state,
                    host_label="ta1.example:22",
                    actor=actor,
                    created_at=created,
                    updated_at=created + timedelta(seconds=90),
                )
            )
    return {"scheduler_success": now - timedelta(hours=3) + timedelta(seconds=90)}


def test_metrics_read_from_the_store_and_the_alert_rules_name_only_those(served: World, engine):
    world = served
    expect(world.cli("policy", "set", "--cluster", "c", "--root", "--max-age", "30d"))
    expect(world.cli("policy", "set", "--cluster", "c", "--all-apps", "--max-age", "7d"))
    _seed_rotations(engine)
    with world.http("root-c") as http:
        assert http.get("/v1/clusters/c/root").status_code == 200
        scrape = http.get("/metrics")
    assert scrape.status_code == 200 and not world.holds_key(scrape.text)
    families = {f.name: f for f in text_string_to_metric_families(scrape.text)}

    def value(name: str, **labels: str) -> float:
        [found] = [
            s.value for f in families.values() for s in f.samples
            if s.name == name and s.labels == labels
        ]  # fmt: skip
        return found

    assert value("keyvault_build_info", version=keyvault.__version__) == 1
    assert value("keyvault_rotation_duration_seconds_count", cluster="c", outcome="completed") == 1
    total = value("keyvault_rotation_duration_seconds_sum", cluster="c", outcome="failed")
    assert total == pytest.approx(90, abs=0.01)
    assert value("keyvault_unresolved_rotation_age_seconds", cluster="c") >= 3600
    assert value("keyvault_rotations", cluster="c", state="needs_recovery") == 1
    # A rotation by the scheduler is not a recorded scheduler run (test_scheduler_runs.py).
    assert value("keyvault_scheduler_last_run_ok") == 0
    assert value("keyvault_scheduler_last_success_timestamp_seconds") == 0
    assert value("keyvault_key_max_age_seconds", cluster="c", scope="root") == 30 * 86400
    assert value("keyvault_key_max_age_seconds", cluster="c", scope="app:a1") == 7 * 86400
    assert not [
        s for s in families["keyvault_key_max_age_seconds"].samples if s.labels["cluster"] == "c2"
    ]
    assert value("keyvault_key_age_seconds", cluster="c2", scope="root") >= 0

    rules = _alert_rules()
    assert {r["alert"] for r in rules} >= {
        "KeyvaultInstanceDown",
        "KeyvaultServerErrors",
        "KeyvaultRotationUnresolved",
        "KeyvaultKeyOlderThanPolicy",
        "KeyvaultSchedulerStalled",
        "KeyvaultWebhookDeliveriesDead",
    }
    exported = _exported_names(families)
    for rule in rules:
        assert rule["expr"].strip() and rule["annotations"]["summary"], rule["alert"]
        named = set(re.findall(r"\bkeyvault_[a-z0-9_]+", rule["expr"]))
        unknown = named - exported
        assert not unknown, f"{rule['alert']} names metrics keyvault does not export: {unknown}"
    assert {n for r in rules for n in re.findall(r"\bkeyvault_[a-z0-9_]+", r["expr"])} >= {
        "keyvault_http_requests_total",
        "keyvault_key_age_seconds",
        "keyvault_key_max_age_seconds",
        "keyvault_scheduler_last_success_timestamp_seconds",
        "keyvault_unresolved_rotation_age_seconds",
        "keyvault_webhook_deliveries",
    }
