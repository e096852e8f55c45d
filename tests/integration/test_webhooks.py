"""Webhooks on SQLite and PostgreSQL, delivered over real HTTP to a receiver on 127.0.0.1
that verifies every request with the public ``standardwebhooks`` package.

Time is injected: retries become due by advancing a fake clock, never by sleeping.
Only ``webhook-timestamp`` uses the wall clock, because receivers check it against theirs.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import delete, select
from standardwebhooks.webhooks import Webhook as Verifier

from keyvault.config import load_settings
from keyvault.db import make_engine, session_factory, transaction
from keyvault.errors import InvalidInput, NotFound
from keyvault.models import Event, Webhook, WebhookDelivery
from keyvault.scope import app_scope
from keyvault.services import webhooks
from keyvault.services.store import open_keyring
from keyvault.services.webhook_worker import WebhookWorker
from tests.support.cli import Cli, describe, expect
from tests.support.clock import Clock
from tests.support.leak_guard import new_key
from tests.support.timeouts import TIMEOUT

CLUSTER = "c"
WAIT = TIMEOUT  # an upper bound for waiting on a thread, never an assertion about time
# The receivers listen on 127.0.0.1: delivering to them needs the operator's explicit choice.
LOCAL_SENDER = webhooks.default_sender(allow_private_network=True)


# --- a real receiver -----------------------------------------------------------------------------


class Receiver:
    """An HTTP server on 127.0.0.1 that verifies each request with ``standardwebhooks``.

    ``policy(msg_id, attempt)`` gives the status to answer. Every request, whatever the
    answer, must carry a valid signature; the ones answered 2xx are "received".
    """

    def __init__(self, policy=None, port: int = 0) -> None:
        self.policy = policy or (lambda msg_id, attempt: 204)
        self.port = port
        self.secret: str | None = None
        self.attempts: Counter = Counter()
        self.received: dict[str, list[dict]] = {}
        self.bodies: list[bytes] = []
        self.headers: list[dict] = []
        self.unverified: list[str] = []
        self.cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/keyvault"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = receiver.handle(body, headers)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(WAIT)
            self._server = None

    def handle(self, body: bytes, headers: dict) -> int:
        with self.cond:
            self.bodies.append(body)
            self.headers.append(headers)
            try:
                payload = Verifier(self.secret).verify(body, headers)
            except Exception as exc:  # noqa: BLE001 - recorded, then asserted empty
                self.unverified.append(f"{type(exc).__name__}: {exc}")
                self.cond.notify_all()
                return 400
            msg_id = headers["webhook-id"]
            self.attempts[msg_id] += 1
            status = self.policy(msg_id, self.attempts[msg_id])
            if 200 <= status < 300:
                self.received.setdefault(msg_id, []).append(payload)
            self.cond.notify_all()
            return status

    def wait_for(self, predicate) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self), timeout=WAIT)

    def event_ids(self) -> set[int]:
        return {int(m.removeprefix("msg_")) for m in self.received}


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(policy=None, port: int = 0, start: bool = True) -> Receiver:
        receiver = Receiver(policy, port)
        made.append(receiver)
        return receiver.start() if start else receiver

    yield make
    for receiver in made:
        receiver.stop()


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the store ---------------------------------------------------------------------------------


class Store:
    """An initialised keyvault with cluster ``c``; events come from the real services."""

    def __init__(self, cli: Cli, db_url: str) -> None:
        self.cli = cli
        self.settings = load_settings()
        self.engine = make_engine(db_url)
        self.factory = session_factory(self.engine)
        self.keys: list[str] = []

    def keyring(self):
        with transaction(self.factory) as s:
            return open_keyring(s, settings=self.settings)

    def add_hook(self, receiver: Receiver, *scopes: str, secret: str | None = None) -> int:
        with transaction(self.factory) as s:
            hook, text = webhooks.add_webhook(
                s,
                keyring=open_keyring(s, settings=self.settings),
                url=receiver.url,
                scopes=list(scopes),
                secret=secret,
                allow_private_network=True,  # the receivers listen on 127.0.0.1
            )
        receiver.secret = text
        return hook.id

    def import_key(self, scope: str) -> str:
        key = new_key()
        self.keys.append(key)
        args = ["--root"] if scope == "root" else ["--appid", scope.removeprefix("app:")]
        expect(self.cli("import", "--cluster", CLUSTER, *args, input=key + "\n"))
        return key

    def enqueue(self, clock) -> int:
        with transaction(self.factory) as s:
            return webhooks.enqueue_deliveries(s, now=clock())

    def deliver(self, clock, **kwargs) -> webhooks.DeliveryReport:
        self.enqueue(clock)
        kwargs.setdefault("rand", lambda: 0.5)
        kwargs.setdefault("send", LOCAL_SENDER)
        return webhooks.deliver_due(self.factory, keyring=self.keyring(), now=clock, **kwargs)

    def deliveries(self, **kwargs) -> list[dict]:
        with transaction(self.factory) as s:
            return webhooks.deliveries(s, **kwargs)

    def event_ids(self, scope: str | None = None) -> set[int]:
        with transaction(self.factory) as s:
            stmt = select(Event.id)
            if scope is not None:
                stmt = stmt.where(Event.scope == scope)
            return set(s.scalars(stmt))

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture
def kv(cli, db_url):
    expect(cli("init"))
    expect(cli("cluster", "add", CLUSTER, "--open-api-url", "http://127.0.0.1:9"))
    store = Store(cli, db_url)
    yield store
    store.close()


def assert_no_key(store: Store, bodies: list[bytes]) -> None:
    leaked = sum(1 for body in bodies for key in store.keys if key.encode() in body)
    assert leaked == 0, f"{leaked} webhook bodies carry a stored key"


# --- signing, secrets, URLs (no database) ------------------------------------------------------


def test_signature_verifies_with_standardwebhooks_and_fails_when_tampered():
    secret = webhooks.generate_secret()
    assert secret.startswith("whsec_") and len(webhooks.parse_secret(secret)) == 32
    body = b'{"type":"secret.rotated"}'
    now = int(datetime.now(UTC).timestamp())
    headers = webhooks.signed_headers(webhooks.parse_secret(secret), "msg_7", now, body)
    assert headers["webhook-signature"].startswith("v1,")
    assert Verifier(secret).verify(body, headers) == {"type": "secret.rotated"}
    from standardwebhooks.webhooks import WebhookVerificationError

    with pytest.raises(WebhookVerificationError):
        Verifier(secret).verify(body.replace(b"rotated", b"created"), headers)
    with pytest.raises(WebhookVerificationError):
        Verifier(webhooks.generate_secret()).verify(body, headers)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "whsec_",
        "whsec_!!!notbase64",
        "whsec_" + "QUFB" * 4,
        "whsec_" + "QUFB" * 30,
        "WHSEC_" + "QUFB" * 10,
    ],
)
def test_malformed_secrets_are_refused(text):
    with pytest.raises(InvalidInput):
        webhooks.parse_secret(text)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://h/x",
        "http://",
        "https:///path",
        "h:80",
        "http://u:p@h/x",
        "http://h/x#frag",
        "http://h/ x",
        "http://h:99999/",
        "javascript:alert(1)",
        "http://h/" + "a" * 1100,
    ],
)
def test_bad_urls_are_refused(url):
    with pytest.raises(InvalidInput):
        webhooks.validate_webhook_url(url)


def test_backoff_is_exponential_full_jitter_and_capped():
    top = lambda: 1 - 1e-12  # noqa: E731
    assert webhooks.backoff_delay(1, rand=top) <= timedelta(seconds=1)
    assert webhooks.backoff_delay(4, rand=top) <= timedelta(seconds=8)
    assert webhooks.backoff_delay(4, rand=top) > timedelta(seconds=7.9)
    assert webhooks.backoff_delay(30, rand=top) <= timedelta(minutes=10)
    assert webhooks.backoff_delay(30, rand=top) > timedelta(minutes=9.9)
    assert webhooks.backoff_delay(500, rand=lambda: 0.5) == timedelta(minutes=5)
    assert webhooks.backoff_delay(3, rand=lambda: 0.0) == timedelta(0)


def test_payload_keeps_only_allow_listed_metadata():
    at = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    stored = {
        "cluster": CLUSTER,
        "scope": "app:a1",
        "old_version": 1,
        "new_version": 2,
        "old_fingerprint": "a" * 16,
        "new_fingerprint": "b" * 16,
        "rotation_id": "r1",
        "key": "K" * 64,
        "ciphertext": "x",
        "error": "free text",
        "host": "ta@h:22",
        "actor": "alice",
    }
    event = Event(
        id=9,
        type="secret.rotated",
        cluster=CLUSTER,
        scope="app:a1",
        payload=json.dumps(stored),
        created_at=at,
    )
    payload = webhooks.event_payload(event)
    assert payload["type"] == "secret.rotated" and payload["timestamp"] == at.isoformat()
    assert payload["data"] == {
        "event_id": 9,
        "cluster": CLUSTER,
        "scope": "app:a1",
        "old_version": 1,
        "new_version": 2,
        "old_fingerprint": "a" * 16,
        "new_fingerprint": "b" * 16,
        "rotation_id": "r1",
        "at": at.isoformat(),
    }


# --- delivery -------------------------------------------------------------------------------------


def test_events_reach_only_the_webhooks_whose_scopes_cover_them(kv, receivers):
    only_a1, all_apps, root = receivers(), receivers(), receivers()
    kv.add_hook(only_a1, f"app:{CLUSTER}/a1")
    kv.add_hook(all_apps, f"app:{CLUSTER}/*")
    kv.add_hook(root, f"root:{CLUSTER}")
    for scope in ("root", "app:a1", "app:a1", "app:a2", "root"):
        kv.import_key(scope)
    clock = Clock()
    report = kv.deliver(clock)
    assert (report.attempted, report.delivered) == (2 + 3 + 2, 7)

    assert only_a1.event_ids() == kv.event_ids("app:a1")
    assert all_apps.event_ids() == kv.event_ids("app:a1") | kv.event_ids("app:a2")
    assert root.event_ids() == kv.event_ids("root")
    for receiver in (only_a1, all_apps, root):
        assert receiver.unverified == []
        assert all(n == 1 for n in receiver.attempts.values())
        assert_no_key(kv, receiver.bodies)
        assert all(h["content-type"] == "application/json" for h in receiver.headers)

    created, rotated = (only_a1.received[f"msg_{i}"][0] for i in sorted(only_a1.event_ids()))
    assert created["type"] == "secret.created" and rotated["type"] == "secret.rotated"
    data = rotated["data"]
    assert (data["cluster"], data["scope"], data["old_version"], data["new_version"]) == (
        CLUSTER,
        "app:a1",
        1,
        2,
    )
    assert data["old_fingerprint"] == created["data"]["new_fingerprint"] != data["new_fingerprint"]
    assert set(data) <= {"event_id", *webhooks.PAYLOAD_FIELDS}
    assert rotated["timestamp"] and data["at"]

    # Nothing is sent twice; fan-out is idempotent.
    assert kv.enqueue(clock) == 0
    assert kv.deliver(clock).attempted == 0


def test_a_receiver_failing_its_first_attempts_gets_every_event(kv, receivers):
    flaky = receivers(policy=lambda msg_id, attempt: 500 if attempt <= 3 else 200)
    kv.add_hook(flaky, f"app:{CLUSTER}/*")
    for scope in ("app:a1", "app:a1", "app:a2"):
        kv.import_key(scope)
    clock = Clock()
    first = kv.deliver(clock, rand=lambda: 0.5)
    assert (first.attempted, first.retrying) == (3, 3)
    rows = kv.deliveries()
    assert {r["attempts"] for r in rows} == {1} and {r["last_status"] for r in rows} == {500}
    # Backoff: 0.5 (the injected jitter) * 1 s; not due before that.
    assert {r["next_attempt_at"] for r in rows} == {(clock() + timedelta(seconds=0.5)).isoformat()}
    assert kv.deliver(clock).attempted == 0
    clock.advance(0.5)
    assert kv.deliver(clock).attempted == 3  # attempt 2 fails, next after 0.5 * 2 s
    clock.advance(0.9)
    assert kv.deliver(clock).attempted == 0
    clock.advance(0.1)
    assert kv.deliver(clock).attempted == 3  # attempt 3 fails
    assert {r["status"] for r in kv.deliveries(failed_only=True)} == {"pending"}
    clock.advance(2)
    assert kv.deliver(clock).delivered == 3  # attempt 4 succeeds

    assert flaky.unverified == []
    assert flaky.event_ids() == kv.event_ids()
    assert set(flaky.attempts.values()) == {4}
    rows = kv.deliveries()
    assert {(r["status"], r["attempts"], r["last_status"]) for r in rows} == {("delivered", 4, 200)}
    assert kv.deliveries(failed_only=True) == []
    # The webhook-id is stable across retries; the timestamp is signed per attempt.
    ids = Counter(h["webhook-id"] for h in flaky.headers)
    assert set(ids.values()) == {4}


def test_a_receiver_down_while_keyvault_restarts_gets_every_event(kv, receivers, db_url):
    port = closed_port()
    receiver = receivers(port=port, start=False)
    kv.add_hook(receiver, f"root:{CLUSTER}", f"app:{CLUSTER}/a1")
    kv.import_key("root")
    kv.import_key("app:a1")
    kv.import_key("app:a2")  # not in its scopes
    clock = Clock()

    first = WebhookWorker(
        kv.factory, settings=kv.settings, clock=clock, rand=lambda: 0.5, send=LOCAL_SENDER
    )
    report = first.tick()
    assert (report.attempted, report.retrying) == (2, 2)
    assert {r["last_error"].split(":")[0] for r in kv.deliveries()} == {"HttpError"}
    assert all("cannot reach the webhook receiver" in r["last_error"] for r in kv.deliveries())
    kv.close()  # keyvault goes away ...

    kv.import_key("root")  # ... an event is written meanwhile (by the CLI) ...
    restarted = Store(
        kv.cli, db_url
    )  # ... and keyvault comes back with new engines and a new worker
    try:
        second = WebhookWorker(
            restarted.factory,
            settings=restarted.settings,
            clock=clock,
            rand=lambda: 0.5,
            send=LOCAL_SENDER,
        )
        assert second.tick().attempted == 1  # the new event; the others wait for their backoff
        receiver.start()  # the receiver comes up on its old port
        assert receiver.port == port
        clock.advance(webhooks.BACKOFF_CAP)
        report = second.tick()
        assert (report.attempted, report.delivered) == (3, 3)
        assert receiver.unverified == []
        assert receiver.event_ids() == restarted.event_ids("root") | restarted.event_ids("app:a1")
        assert len(receiver.event_ids()) == 3
        assert {r["status"] for r in restarted.deliveries()} == {"delivered"}
        assert second.outcomes["delivered"] == 3
    finally:
        restarted.close()


def test_the_worker_thread_delivers_and_stops(kv, receivers):
    receiver = receivers()
    kv.add_hook(receiver, f"app:{CLUSTER}/a1")
    worker = WebhookWorker(kv.factory, settings=kv.settings, interval=0.05, send=LOCAL_SENDER)
    worker.start()
    try:
        kv.import_key("app:a1")
        assert receiver.wait_for(lambda r: len(r.received) == 1)
        kv.import_key("app:a1")
        assert receiver.wait_for(lambda r: len(r.received) == 2)
    finally:
        assert worker.stop() is True
    assert not worker.running
    assert receiver.unverified == [] and receiver.event_ids() == kv.event_ids("app:a1")


def test_dead_lettered_after_max_attempts(kv, receivers):
    down = receivers(policy=lambda msg_id, attempt: 503)
    hook_id = kv.add_hook(down, f"app:{CLUSTER}/a1")
    kv.import_key("app:a1")
    clock = Clock()
    for attempt in range(1, webhooks.DEFAULT_MAX_ATTEMPTS + 1):
        report = kv.deliver(clock)
        assert report.attempted == 1
        assert (report.dead == 1) == (attempt == webhooks.DEFAULT_MAX_ATTEMPTS)
        clock.advance(webhooks.BACKOFF_CAP)
    assert kv.deliver(clock).attempted == 0  # dead letters are not retried
    (row,) = kv.deliveries(failed_only=True, webhook_id=hook_id)
    assert (row["status"], row["attempts"], row["last_status"], row["last_error"]) == (
        "dead",
        webhooks.DEFAULT_MAX_ATTEMPTS,
        503,
        "HTTP 503",
    )
    assert down.attempts[f"msg_{row['event_id']}"] == webhooks.DEFAULT_MAX_ATTEMPTS
    assert down.unverified == []


def test_an_exception_in_send_is_a_failed_attempt(kv, receivers):
    receiver = receivers()
    kv.add_hook(receiver, f"app:{CLUSTER}/a1")
    kv.import_key("app:a1")

    def broken(url, body, headers):
        raise TimeoutError("timed out")

    report = kv.deliver(Clock(), send=broken, max_attempts=1)
    assert report.dead == 1
    (row,) = kv.deliveries(failed_only=True)
    assert row["last_error"] == "TimeoutError: timed out" and row["last_status"] is None


def test_concurrent_deliverers_send_each_message_once(kv, receivers):
    receiver = receivers()
    kv.add_hook(receiver, f"app:{CLUSTER}/*")
    for i in range(12):
        kv.import_key(f"app:a{i % 4}")
    clock = Clock()
    kv.enqueue(clock)
    keyring = kv.keyring()
    barrier = threading.Barrier(3)
    reports, errors = [], []

    def run():
        try:
            barrier.wait(WAIT)
            reports.append(
                webhooks.deliver_due(kv.factory, keyring=keyring, now=clock, send=LOCAL_SENDER)
            )
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert errors == []
    assert sum(r.delivered for r in reports) == 12
    assert receiver.event_ids() == kv.event_ids() and set(receiver.attempts.values()) == {1}


def test_new_webhooks_start_from_their_creation_and_out_of_order_commits_are_caught(kv, receivers):
    kv.import_key("app:a1")
    receiver = receivers()
    hook_id = kv.add_hook(receiver, f"app:{CLUSTER}/a1")
    clock = Clock()
    assert kv.enqueue(clock) == 0  # the event before the webhook is not owed to it
    kv.import_key("app:a1")
    kv.import_key("app:a1")
    assert kv.enqueue(clock) == 2
    # An event that committed after a later one (PostgreSQL sequences) is still fanned out.
    late = min(kv.event_ids()) + 1
    with transaction(kv.factory) as s:
        s.execute(delete(WebhookDelivery).where(WebhookDelivery.event_id == late))
    assert kv.enqueue(clock) == 1
    assert kv.deliver(clock).delivered == 2
    assert len(receiver.event_ids()) == 2
    assert {r["event_id"] for r in kv.deliveries(webhook_id=hook_id)} == kv.event_ids() - {
        min(kv.event_ids())
    }


def test_remove_dead_letters_pending_deliveries_and_stops_fan_out(kv, receivers):
    receiver = receivers(policy=lambda msg_id, attempt: 500)
    hook_id = kv.add_hook(receiver, f"app:{CLUSTER}/a1")
    kv.import_key("app:a1")
    clock = Clock()
    kv.deliver(clock)
    keyring = kv.keyring()
    with transaction(kv.factory) as s:
        webhooks.remove_webhook(s, keyring=keyring, webhook_id=hook_id)
    kv.import_key("app:a1")
    clock.advance(webhooks.BACKOFF_CAP)
    assert kv.deliver(clock).attempted == 0
    (row,) = kv.deliveries()
    assert (row["status"], row["last_error"]) == ("dead", "webhook removed")
    with transaction(kv.factory) as s:
        assert webhooks.list_webhooks(s) == []
        assert [h.id for h in webhooks.list_webhooks(s, include_removed=True)] == [hook_id]
        with pytest.raises(NotFound):
            webhooks.remove_webhook(s, keyring=keyring, webhook_id=hook_id + 100)


def test_real_rotations_notify_with_rotation_ids_and_failures(kv, receivers, tmp_path):
    from keyvault.sandbox import state
    from keyvault.services.rotation import RotationService
    from keyvault.services.secrets import get_version, reveal
    from tests.support.cluster import add_emulated_cluster, install_ta_tool, local_connector

    ta = install_ta_tool(tmp_path / "ta", ["a1", "a2"])
    state_dir = ta.state_dir
    with transaction(kv.factory) as s:
        add_emulated_cluster(s, CLUSTER, ta, host="ta-a", exists=True)
    receiver = receivers()
    kv.add_hook(receiver, f"app:{CLUSTER}/*")
    service = RotationService(
        kv.factory, settings=kv.settings, connector=local_connector(tmp_path / "ta-home")
    )
    outcome = service.rotate(CLUSTER, app_scope("a1"), actor="t")
    outcome2 = service.rotate(CLUSTER, app_scope("a1"), actor="t")
    state.set_noise(state_dir, fail_apps=["a2"])
    with pytest.raises(Exception):  # noqa: B017,PT011
        service.rotate(CLUSTER, app_scope("a2"), actor="t")
    with transaction(kv.factory) as s:
        keyring = open_keyring(s, settings=kv.settings)
        kv.keys.extend(
            reveal(keyring, v)
            for v in [
                get_version(s, cluster_name=CLUSTER, scope=app_scope("a1"), number=n)
                for n in (1, 2)
            ]
        )
    assert kv.deliver(Clock()).delivered == 3
    payloads = [receiver.received[f"msg_{i}"][0] for i in sorted(receiver.event_ids())]
    assert [p["type"] for p in payloads] == ["secret.created", "secret.rotated", "rotation.failed"]
    assert payloads[0]["data"]["rotation_id"] == outcome.rotation_id
    assert payloads[1]["data"]["rotation_id"] == outcome2.rotation_id
    assert (payloads[1]["data"]["old_version"], payloads[1]["data"]["new_version"]) == (1, 2)
    assert payloads[2]["data"]["state"] == "failed" and "error" not in payloads[2]["data"]
    assert receiver.unverified == []
    assert_no_key(kv, receiver.bodies)


# --- secrets at rest ------------------------------------------------------------------------------


def test_signing_secrets_are_sealed_at_rest(kv, receivers, database):
    receiver = receivers()
    hook_id = kv.add_hook(receiver, f"root:{CLUSTER}")
    raw = webhooks.parse_secret(receiver.secret)
    keyring = kv.keyring()
    with transaction(kv.factory) as s:
        row = s.get(Webhook, hook_id)
        assert raw not in row.secret_ciphertext and raw not in row.secret_wrapped_key
        assert row.master_key_id == keyring.active
        # The sealed secret is bound to its row: moved to another id it does not open.
        assert webhooks.webhook_secret(keyring, row) == raw
        from keyvault.errors import IntegrityError

        moved = Webhook(
            id=row.id + 1,
            url=row.url,
            scopes=row.scopes,
            secret_ciphertext=row.secret_ciphertext,
            secret_wrapped_key=row.secret_wrapped_key,
            master_key_id=row.master_key_id,
            created_at=row.created_at,
        )
        with pytest.raises(IntegrityError):
            webhooks.webhook_secret(keyring, moved)
    if database.is_sqlite:
        kv.close()
        data = b"".join(
            Path(database.sqlite_path.as_posix() + suffix).read_bytes()
            for suffix in ("", "-wal")
            if Path(database.sqlite_path.as_posix() + suffix).exists()
        )
        assert receiver.secret.encode() not in data
        assert receiver.secret.removeprefix("whsec_").encode() not in data
        assert raw not in data


# --- CLI ------------------------------------------------------------------------------------------


@pytest.fixture
def store(cli: Cli):
    expect(cli("init"))
    expect(cli("cluster", "add", CLUSTER, "--open-api-url", "http://127.0.0.1:9"))
    return cli


def test_cli_add_prints_the_secret_once_and_never_again(store: Cli, receivers, database):
    receiver = receivers()
    result = expect(
        store(
            "webhook",
            "add",
            "--allow-private-network",
            receiver.url,
            "--scope",
            f"app:{CLUSTER}/a1",
            "--scope",
            f"root:{CLUSTER}",
        )
    )
    secrets = [w for w in result.stdout.split() if w.startswith("whsec_")]
    assert len(secrets) == 1 and result.stdout.count("whsec_") == 1
    assert "store this signing secret now" in result.stderr
    receiver.secret = secret = secrets[0]
    assert len(webhooks.parse_secret(secret)) >= 24

    for args in (
        ["webhook", "list"],
        ["webhook", "list", "--json"],
        ["webhook", "list", "--all"],
        ["webhook", "deliveries", "--json"],
    ):
        out = expect(store(*args))
        assert secret not in out.output and "whsec_" not in out.output
        assert secret.removeprefix("whsec_") not in out.output
    (listed,) = json.loads(expect(store("webhook", "list", "--json")).stdout)
    assert listed["url"] == receiver.url and listed["scopes"] == [
        f"app:{CLUSTER}/a1",
        f"root:{CLUSTER}",
    ]
    assert listed["status"] == "active"
    table = expect(store("webhook", "list")).stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "URL", "SCOPES"] and receiver.url in table[1]

    keys = [new_key(), new_key()]
    expect(store("import", "--cluster", CLUSTER, "--appid", "a1", input=keys[0] + "\n"))
    expect(
        store("import", "--cluster", CLUSTER, "--appid", "a2", input=keys[1] + "\n")
    )  # not in scope
    done = json.loads(
        expect(store("webhook", "deliver", "--allow-private-network", "--json")).stdout
    )
    assert done == {"enqueued": 1, "attempted": 1, "delivered": 1, "retrying": 0, "dead": 0}
    assert receiver.unverified == [] and len(receiver.received) == 1
    assert not any(k.encode() in b for k in keys for b in receiver.bodies)
    (payload,) = next(iter(receiver.received.values()))
    assert payload["data"]["scope"] == "app:a1"
    assert expect(
        store("webhook", "deliver", "--allow-private-network", "--loop")
    ).stdout.startswith("enqueued 0; attempted 0")
    if database.is_sqlite:
        data = database.sqlite_path.read_bytes()
        wal = Path(str(database.sqlite_path) + "-wal")
        data += wal.read_bytes() if wal.exists() else b""
        assert secret.encode() not in data and webhooks.parse_secret(secret) not in data


def test_cli_secret_file_must_be_private_and_well_formed(store: Cli, receivers, tmp_path):
    receiver = receivers()
    secret = webhooks.generate_secret()
    path = tmp_path / "hook.secret"
    path.write_text(secret + "\n")
    os.chmod(path, 0o644)
    add = ("webhook", "add", "--allow-private-network", receiver.url)
    add += ("--scope", f"root:{CLUSTER}", "--secret-file", str(path))
    refused = store(*add)
    assert refused.exit_code == 2, describe(refused)
    assert (
        "0644" in refused.stderr
        and f"chmod 600 {path}" in refused.stderr
        and secret not in refused.output
    )
    os.chmod(path, 0o600)
    added = expect(store(*add))
    assert "whsec_" not in added.output  # the operator already has it
    receiver.secret = secret
    expect(store("import", "--cluster", CLUSTER, "--root", input=new_key() + "\n"))
    assert (
        json.loads(expect(store("webhook", "deliver", "--allow-private-network", "--json")).stdout)[
            "delivered"
        ]
        == 1
    )
    assert receiver.unverified == [] and len(receiver.received) == 1

    path.write_text("not-a-secret\n")
    bad = store(
        "webhook",
        "add",
        "--allow-private-network",
        receiver.url,
        "--scope",
        f"root:{CLUSTER}",
        "--secret-file",
        str(path),
    )
    assert bad.exit_code == 2 and "whsec_" in bad.stderr, describe(bad)
    missing = store(
        "webhook",
        "add",
        receiver.url,
        "--scope",
        f"root:{CLUSTER}",
        "--secret-file",
        str(tmp_path / "nope"),
    )
    assert missing.exit_code == 2, describe(missing)


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["ftp://127.0.0.1/x", "--scope", f"root:{CLUSTER}"], 2, "invalid webhook URL"),
        (["http://127.0.0.1:1/x", "--scope", "everything"], 2, "invalid scope"),
        (["http://127.0.0.1:1/x", "--scope", f"app:{CLUSTER}/a b"], 2, "invalid"),
        (["http://127.0.0.1:1/x", "--scope", "root:nope"], 1, "no cluster"),
    ],
    ids=["scheme", "scope", "appid", "cluster"],
)
def test_cli_add_refuses_bad_input_with_one_line(store: Cli, args, code, fragment):
    result = store("webhook", "add", "--allow-private-network", *args)
    assert result.exit_code == code, describe(result)
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert fragment in result.stderr
    assert json.loads(expect(store("webhook", "list", "--json")).stdout) == []


def test_cli_dead_letters_are_listed_by_deliveries_failed_and_remove(store: Cli, receivers):
    receiver = receivers(policy=lambda msg_id, attempt: 500)
    out = expect(
        store(
            "webhook", "add", "--allow-private-network", receiver.url, "--scope", f"app:{CLUSTER}/*"
        )
    )
    receiver.secret = next(w for w in out.stdout.split() if w.startswith("whsec_"))
    hook_id = json.loads(expect(store("webhook", "list", "--json")).stdout)[0]["id"]
    expect(store("import", "--cluster", CLUSTER, "--appid", "a1", input=new_key() + "\n"))
    expect(store("import", "--cluster", CLUSTER, "--appid", "a2", input=new_key() + "\n"))
    assert (
        json.loads(
            expect(
                store(
                    "webhook", "deliver", "--allow-private-network", "--json", "--max-attempts", "1"
                )
            ).stdout
        )["dead"]
        == 2
    )
    assert receiver.unverified == [] and sum(receiver.attempts.values()) == 2

    failed = json.loads(expect(store("webhook", "deliveries", "--failed", "--json")).stdout)
    assert [(r["status"], r["attempts"], r["last_status"], r["webhook_id"]) for r in failed] == [
        ("dead", 1, 500, hook_id)
    ] * 2
    assert {r["scope"] for r in failed} == {"app:a1", "app:a2"}
    table = expect(store("webhook", "deliveries", "--failed")).stdout
    assert table.splitlines()[0].split()[:3] == ["ID", "WEBHOOK_ID", "EVENT_ID"] and "dead" in table

    # A pending delivery of a removed webhook is dead-lettered as "webhook removed".
    expect(store("import", "--cluster", CLUSTER, "--appid", "a1", input=new_key() + "\n"))
    with_pending = Store(store, load_settings().database_url)
    try:
        with_pending.enqueue(Clock())
    finally:
        with_pending.close()
    assert expect(store("webhook", "remove", str(hook_id), "--yes")).stdout.startswith(
        f"webhook {hook_id} removed"
    )
    failed = json.loads(expect(store("webhook", "deliveries", "--failed", "--json")).stdout)
    assert sorted(r["last_error"] for r in failed) == ["HTTP 500", "HTTP 500", "webhook removed"]
    assert json.loads(expect(store("webhook", "list", "--json")).stdout) == []
    assert (
        json.loads(expect(store("webhook", "list", "--all", "--json")).stdout)[0]["status"]
        == "removed"
    )
    missing = store("webhook", "remove", "999")
    assert missing.exit_code == 1 and "no webhook with id 999" in missing.stderr


def test_cli_deliver_is_bounded_in_time(store: Cli, receivers):
    receiver = receivers()
    out = expect(
        store(
            "webhook", "add", "--allow-private-network", receiver.url, "--scope", f"root:{CLUSTER}"
        )
    )
    receiver.secret = next(w for w in out.stdout.split() if w.startswith("whsec_"))
    expect(store("import", "--cluster", CLUSTER, "--root", input=new_key() + "\n"))
    # A bound already reached: the command returns without starting a delivery.
    done = json.loads(
        expect(
            store(
                "webhook",
                "deliver",
                "--allow-private-network",
                "--loop",
                "--max-seconds",
                "0.000001",
                "--json",
            )
        ).stdout
    )
    assert done["attempted"] == 0 and done["enqueued"] == 1
    assert (
        json.loads(
            expect(
                store("webhook", "deliver", "--allow-private-network", "--loop", "--json")
            ).stdout
        )["delivered"]
        == 1
    )


def _two_deliverers(kv, clock, *, lease_clock) -> tuple[WebhookWorker, WebhookWorker]:
    """Two webhook workers (replicas) on one store, competing for the delivery lease."""
    return tuple(  # type: ignore[return-value]
        WebhookWorker(
            kv.factory,
            settings=kv.settings,
            clock=clock,
            send=LOCAL_SENDER,
            lease_clock=lease_clock,
        )
        for _ in range(2)
    )


class _Died(BaseException):
    """A deliverer killed between sending and recording (nothing catches it)."""


def test_a_new_lease_holder_resends_what_the_dead_one_had_in_flight(kv, receivers):
    """The webhook lease (services/leases.py), with injected clocks: A claims a delivery and
    dies before recording it; B takes the expired lease, which makes A's claim due at once
    (not after the 2-minute claim), and sends it again with the same webhook-id. A, back,
    claims nothing: its fence fails."""
    receiver = receivers()
    kv.add_hook(receiver, f"app:{CLUSTER}/a1")
    kv.import_key("app:a1")
    clock = Clock()

    a, b = _two_deliverers(kv, clock, lease_clock=clock)
    assert a.lease.step()
    kv.enqueue(clock)
    sent: list[str] = []

    def dies_after_sending(url, body, headers):
        sent.append(headers["webhook-id"])
        raise _Died

    with pytest.raises(_Died):
        webhooks.deliver_due(
            kv.factory, keyring=kv.keyring(), now=clock, send=dies_after_sending,
            fence=a.lease.fence, claimed_by=a.lease.holder,
        )  # fmt: skip
    (row,) = kv.deliveries()
    assert row["status"] == "pending" and row["attempts"] == 1
    assert not b.lease.step()  # A's lease still runs
    clock.advance(a.lease.ttl)
    assert b.lease.step()  # expired: B takes it over, and A's claim with it
    report = b.tick(fenced=True)
    assert (report.attempted, report.delivered) == (1, 1)
    assert list(receiver.received) == sent  # the same webhook-id, once more
    assert not a.lease.step() and a.tick(fenced=True).attempted == 0
    assert [r["status"] for r in kv.deliveries()] == ["delivered"]


def test_a_takeover_makes_the_dead_holders_claim_due_by_the_deliverers_clock(kv, receivers):
    """The lease compares the database's clock (PostgreSQL's now()), the deliveries this
    replica's own. With the database's clock 10 minutes ahead, a delivery the dead holder had
    in flight must still be due at once after a takeover, not 10 minutes later (nor after the
    2-minute claim): the release writes the deliverer's time, the one its due check reads."""
    receiver = receivers()
    kv.add_hook(receiver, f"app:{CLUSTER}/a1")
    kv.import_key("app:a1")
    local = Clock()
    database = Clock(local.now + timedelta(minutes=10))

    a, b = _two_deliverers(kv, local, lease_clock=database)
    assert a.lease.step()
    kv.enqueue(local)

    def dies_after_sending(url, body, headers):
        raise _Died

    with pytest.raises(_Died):
        webhooks.deliver_due(
            kv.factory, keyring=kv.keyring(), now=local, send=dies_after_sending,
            fence=a.lease.fence, claimed_by=a.lease.holder,
        )  # fmt: skip
    local.advance(a.lease.ttl)
    database.advance(a.lease.ttl)
    assert b.lease.step()
    report = b.tick(fenced=True)
    assert (report.attempted, report.delivered) == (1, 1)
