"""A long-poll on ``GET /v1/events`` ends with its reason to exist: when its client goes away
(a killed `keyvault run` or agent), and when `keyvault serve` is told to stop. Neither waits
for the poll's own deadline, which used to hold the server's shutdown up to ``wait`` seconds.

Each poll asks for the longest wait (60 s) while no event comes: before the fix the poll ends
only at that deadline, so "it ended before its deadline" is the behaviour checked, with the
shared TIMEOUT as the only bound on the wait.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

from prometheus_client.parser import text_string_to_metric_families

from tests.support.consumers import wait_until
from tests.support.http import World
from tests.support.timeouts import TIMEOUT

WAIT = 60  # the longest wait /v1/events accepts
EVENTS = "/v1/events"


def polls_answered(world: World) -> int:
    """How many /v1/events requests the server has answered (its own request counter)."""
    with world.http() as http:
        body = http.get("/metrics").raise_for_status().text
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.name == "keyvault_http_requests_total" and sample.labels["route"] == EVENTS
        )
    )


def newest(world: World) -> int:
    """The newest event's id: a poll after it waits (no event comes in these tests)."""
    with world.http("app-a1") as http:
        return int(http.get(EVENTS, params={"tail": "true"}).raise_for_status().json()["last_id"])


def settle(world: World) -> None:
    """A request answered on another connection after the poll was sent: the server has read
    the poll by then (one event loop, the poll's bytes arrived first)."""
    with world.http() as http:
        assert http.get("/healthz").status_code == 200


def open_poll(world: World, token: str, after: int) -> socket.socket:
    """A long-poll sent (whole) on a new connection, and read by the server; the caller
    reads the answer or closes the socket."""
    s = socket.create_connection(("127.0.0.1", world.server.port), timeout=TIMEOUT)
    s.sendall(
        f"GET {EVENTS}?after={after}&wait={WAIT} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    settle(world)
    return s


def test_a_long_poll_whose_client_went_away_ends(served: World):
    world = served
    token, after = world.tokens["app-a1"], newest(world)
    answered = polls_answered(world)  # the tail request above counts too
    started = time.monotonic()
    open_poll(world, token, after).close()
    # The client is gone: the server ends the poll (and counts it) without waiting it out.
    wait_until(lambda: polls_answered(world) > answered, "the abandoned poll ended")
    assert time.monotonic() - started < WAIT, "the poll ran to its deadline"


def test_serve_stops_at_once_with_a_long_poll_open(served: World):
    world = served
    proc = world.server.proc
    assert proc is not None
    started = time.monotonic()
    with open_poll(world, world.tokens["app-a1"], newest(world)) as poll:
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            status = None
        answer = b""
        while chunk := poll.recv(65536):  # the server closes the connection after it
            answer += chunk
    # uvicorn ends by re-raising the signal it caught, once it has shut down gracefully.
    assert status == -signal.SIGTERM, world.server.log_tail()
    assert time.monotonic() - started < WAIT, "serve waited for the poll's deadline"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert json.loads(body)["events"] == [], body
