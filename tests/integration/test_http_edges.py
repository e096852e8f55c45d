"""The HTTP server at its edges, against a real ``keyvault serve`` on SQLite and PostgreSQL.

- The database locked by another connection (a long transaction, a restore, a stuck
  writer): ``/healthz`` still answers, a key read answers 503 within the server's database
  budget and ``/readyz`` says not ready, all while the lock is held; everything recovers
  once it is released.
- ``X-Forwarded-For`` is believed only from a proxy named by ``--forwarded-allow-ips``.
- A request line or header block over the limit is refused once that much is read (a
  100 MB ``Authorization`` header is never buffered); no redirect built from ``Host``.
- ``/metrics`` can require a token and never shows the database URL.
- Webhooks are delivered to a private address (here 127.0.0.1) only with
  ``--allow-private-network``.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import make_url

from keyvault.models import AuditRecord, WebhookDelivery
from tests.support.cli import expect, one_error_line
from tests.support.db import lock_held
from tests.support.http import CountingReceiver, Server, World, key_matches
from tests.support.timeouts import TIMEOUT

XFF = {"X-Forwarded-For": "203.0.113.9"}
METRICS_TOKEN = "scrape-token-for-the-test"
MB = 1024 * 1024


def restart_with(world: World, **env: str) -> None:
    """Restart the world's server with these ``serve`` options (their environment variables)."""
    workdir = world.server.workdir
    world.server.stop()
    world.server = Server(workdir, env={**os.environ, **env}).start()


def database_locked(engine):
    """Another connection holds the database's write lock (SQLite) or an ACCESS EXCLUSIVE
    lock on the tables every request needs (PostgreSQL) until the block ends."""
    return lock_held(
        engine,
        sqlite="BEGIN EXCLUSIVE",
        postgres="LOCK TABLE revision, access_tokens, audit_log IN ACCESS EXCLUSIVE MODE",
    )


def last_client(engine) -> str | None:
    with engine.connect() as conn:
        return conn.scalar(select(AuditRecord.client).order_by(AuditRecord.id.desc()).limit(1))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def send_huge_header(port: int, total: int) -> int:
    """Send a request whose Authorization header is ``total`` bytes long; the bytes sent
    before the server closed the connection."""
    chunk = b"A" * (256 * 1024)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        try:
            sock.sendall(b"GET /v1/clusters/c/root HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer ")
            while sent < total:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return sent
    return sent


def raw_request(port: int, request: bytes) -> bytes:
    """Send ``request`` and read the answer until the server closes or has sent a response."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n\r\n" not in answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        return answer


def pipelined_statuses(port: int, requests: bytes, count: int) -> list[int]:
    """Send ``requests`` at once on one connection; the statuses of the first ``count``
    answers (read until that many have arrived or the server closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(requests)
        answers = b""
        while answers.count(b"HTTP/1.1 ") < count:
            data = sock.recv(65536)
            if not data:
                break
            answers += data
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answers)]


def test_the_server_keeps_answering_while_the_database_is_locked(served: World, engine):
    world = served
    restart_with(world, KEYVAULT_HTTP_DB_BUDGET="1")
    with world.http("app-all") as http:
        assert key_matches(world, http.get("/v1/clusters/c/apps/a1").json(), "c", "app:a1")
        with database_locked(engine):
            # Each answer arrives while the lock is held (it is released after the block):
            # none of them waited for it.
            assert http.get("/healthz").status_code == 200
            read = http.get("/v1/clusters/c/apps/a2")
            assert read.status_code == 503, read.text
            assert read.json()["error"] == "database_error"
            assert "key" not in read.json()
            readyz = http.get("/readyz")
            assert readyz.status_code == 503, readyz.text
            assert "audit" in readyz.json()["detail"]
            assert http.get("/healthz").status_code == 200
        assert key_matches(world, http.get("/v1/clusters/c/apps/a2").json(), "c", "app:a2")
        assert http.get("/readyz").status_code == 200


def test_forwarded_for_is_believed_only_from_a_named_proxy(served: World, engine):
    world = served
    with world.http("app-all") as http:
        assert http.get("/v1/clusters/c/apps/a1", headers=XFF).status_code == 200
    assert last_client(engine) == "127.0.0.1"  # any local client could have forged it

    restart_with(world, KEYVAULT_FORWARDED_ALLOW_IPS="127.0.0.1")
    with world.http("app-all") as http:
        assert http.get("/v1/clusters/c/apps/a1", headers=XFF).status_code == 200
    assert last_client(engine) == "203.0.113.9"  # the proxy named says who its client was


def test_oversized_heads_are_refused_early_and_nothing_redirects(served: World):
    world = served
    port, pid = world.server.port, world.server.proc.pid
    before = rss_bytes(pid)
    sent = send_huge_header(port, 100 * MB)
    assert sent < 100 * MB  # the server hung up long before the header ended
    assert rss_bytes(pid) - before < 32 * MB  # and did not hold what it was sent

    # A long request line or header block: refused, whether it arrived in one read or not.
    answer = raw_request(port, b"GET /" + b"x" * (64 * 1024) + b" HTTP/1.1\r\nHost: kv\r\n\r\n")
    assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 414")), answer[:100]
    with world.http("app-all") as http:
        long_path = http.get("/v1/clusters/c/apps/" + "a" * 5000)
        assert (long_path.status_code, long_path.json()["error"]) == (414, "uri_too_long")
        many = {f"x-filler-{i}": "y" * 1000 for i in range(20)}
        headers = http.get("/v1/clusters/c/apps/a1", headers=many)
        assert (headers.status_code, headers.json()["error"]) == (431, "headers_too_large")

    for path in ("/v1/events/", "/healthz/", "/v1/clusters/c/root/"):
        answer = raw_request(
            port, f"GET {path} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".encode()
        )
        assert answer.startswith(b"HTTP/1.1 404"), (path, answer[:100])
        assert b"location:" not in answer.lower() and b"evil.example" not in answer

    # Many small requests pipelined on one connection are no oversized head.
    pipelined = b"GET /healthz HTTP/1.1\r\nHost: kv\r\n\r\n" * 600  # ~23 KiB in one send
    assert pipelined_statuses(port, pipelined, 600) == [200] * 600

    with world.http("app-all") as http:  # the server is fine
        assert key_matches(world, http.get("/v1/clusters/c/apps/a1").json(), "c", "app:a1")


def test_metrics_can_require_a_token_and_never_show_the_database_url(served: World, tmp_path: Path):
    world = served
    database = make_url(world.db_url).database
    assert database
    with world.http() as http:
        open_scrape = http.get("/metrics")
    assert open_scrape.status_code == 200
    assert database not in open_scrape.text and world.db_url not in open_scrape.text

    token_file = tmp_path / "metrics.token"
    token_file.write_text(METRICS_TOKEN + "\n")
    restart_with(world, KEYVAULT_METRICS_TOKEN_FILE=str(token_file))
    with world.http() as http:
        refused = http.get("/metrics")
        assert refused.status_code == 401
        assert refused.json()["error"] == "unauthorized"
        wrong = http.get("/metrics", headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401
        scraped = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert scraped.status_code == 200
    assert "keyvault_http_requests_total" in scraped.text
    assert database not in scraped.text and world.db_url not in scraped.text


def restart_delivering(world: World, **env: str) -> None:
    """Restart the world's server delivering webhooks (the test servers do not, by default)."""
    workdir = world.server.workdir
    world.server.stop()
    server = Server(workdir, env={**os.environ, **env})
    server.env["KEYVAULT_SERVE_WEBHOOKS"] = "1"
    world.server = server.start()


def first_attempt_error(world: World, engine) -> str | None:
    """The error of the first delivery once it has been attempted (a bounded poll)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            row = conn.execute(
                select(
                    WebhookDelivery.attempts, WebhookDelivery.last_error, WebhookDelivery.status
                ).order_by(WebhookDelivery.id)
            ).first()
        # attempts counts at the claim; the outcome (last_error, or delivered) is written after
        if row is not None and row.attempts >= 1 and (row.last_error or row.status != "pending"):
            return row.last_error
        with contextlib.suppress(subprocess.TimeoutExpired):  # the pause doubles as a check
            assert world.server.proc is not None
            world.server.proc.wait(timeout=0.1)
            raise AssertionError(f"the server exited: {world.server.log_tail()}")
    raise AssertionError(f"no delivery attempted within {TIMEOUT:g}s")


def test_served_webhooks_reach_private_addresses_only_when_allowed(served: World, engine):
    world = served
    receiver = CountingReceiver()
    try:
        expect(
            world.cli(
                "webhook", "add", "--allow-private-network", receiver.url, "--scope", "root:c"
            )
        )
        restart_delivering(world)
        world.import_key("c", "root")  # an event: secret.rotated
        error = first_attempt_error(world, engine)
        assert error is not None and "127.0.0.1" in error and "refused" in error
        assert not receiver.got.is_set()  # nothing was sent to it

        restart_delivering(world, KEYVAULT_ALLOW_PRIVATE_NETWORK="1")
        world.import_key("c", "root")
        assert receiver.got.wait(TIMEOUT), "no delivery with --allow-private-network"
    finally:
        receiver.close()


def test_serve_refuses_an_empty_metrics_token_file_in_one_line(cli, db_url, tmp_path: Path):
    expect(cli("init"))
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    result = cli("serve", "--port", "0", "--metrics-token-file", str(empty))
    one_error_line(result, 1, "metrics token file", "is empty")
