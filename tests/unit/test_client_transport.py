"""keyvault_client.Client with an injected transport (no server): failover across addresses,
retries with capped jittered backoff, stale-if-error within max_stale, ETag revalidation,
environment defaults, the consumer header, and watch() catching up after an outage.

The transport is a small in-memory keyvault (``Vault``): keys per scope with ETags, an event
feed, and per-address behaviour (answer, refuse the connection, or answer 5xx).
"""

from __future__ import annotations

import json
import logging
import random
import socket
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import pytest

from keyvault_client import Client, Request, Response
from keyvault_client.errors import (
    Forbidden,
    InvalidInput,
    KeyvaultError,
    PreconditionFailed,
    Unavailable,
)
from keyvault_client.transport import TransportError

A, B = "http://kv-a:8200", "http://kv-b:8200"
TOKEN = "kvt_" + "Tq4P" * 11
KEY1, KEY2, KEY3 = ("K1" + "a" * 62), ("K2" + "b" * 62), ("K3" + "c" * 62)


@dataclass
class Vault:
    """keyvault as a transport: ``down`` addresses refuse, ``status`` makes one answer that."""

    keys: dict = field(default_factory=lambda: {("c", "app:a1"): (1, KEY1)})
    events: list = field(default_factory=list)
    down: set = field(default_factory=set)
    status: dict = field(default_factory=dict)  # address -> list of statuses to answer first
    seen: list = field(default_factory=list)  # (address, method, path, headers)
    budget: int = 10_000  # calls before the test is considered hung

    def rotate(self, cluster: str, scope: str, key: str) -> int:
        version = self.keys[(cluster, scope)][0] + 1
        self.keys[(cluster, scope)] = (version, key)
        self.events.append(
            {
                "id": len(self.events) + 1,
                "type": "secret.rotated",
                "cluster": cluster,
                "scope": scope,
            }
        )
        return version

    def __call__(self, request: Request) -> Response:
        self.budget -= 1
        assert self.budget > 0, "the client looped without end"
        parts = urlsplit(request.url)
        address = f"{parts.scheme}://{parts.netloc}"
        self.seen.append((address, request.method, parts.path, dict(request.headers)))
        if address in self.down:
            raise TransportError(f"cannot reach keyvault at {address}: Connection refused")
        queued = self.status.get(address)
        if queued:
            return Response(queued.pop(0), {}, b'{"error": "unavailable"}')
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return Response(401, {}, b'{"error": "unauthorized"}')
        if parts.path == "/v1/events":
            after = int(parse_qs(parts.query)["after"][0])
            found = [e for e in self.events if e["id"] > after][:100]
            last = found[-1]["id"] if found else max([after] + [e["id"] for e in self.events])
            return Response(200, {}, json.dumps({"events": found, "last_id": last}).encode())
        return self._key(parts.path, request.headers.get("If-None-Match"))

    def _key(self, path: str, if_none_match: str | None) -> Response:
        _, _, _, cluster, kind, *rest = path.split("/")
        scope = "root" if kind == "root" else f"app:{rest[0]}"
        if (cluster, scope) not in self.keys:
            return Response(403, {}, b'{"error": "forbidden", "detail": "not your scope"}')
        version, key = self.keys[(cluster, scope)]
        etag = f'"v{version}"'
        if if_none_match == etag:
            return Response(304, {"ETag": etag})
        body = {
            "cluster": cluster,
            "scope": scope,
            "version": version,
            "fingerprint": f"fp{version}",
            "created_at": "2026-01-01T00:00:00+00:00",
            "key": key,
        }
        return Response(200, {"etag": etag}, json.dumps(body).encode())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(vault: Vault, urls=(A, B), **kwargs) -> tuple[Client, list[float]]:
    sleeps: list[float] = []
    kwargs.setdefault("rng", random.Random(7))
    client = Client(list(urls), TOKEN, transport=vault, sleep=sleeps.append, **kwargs)
    return client, sleeps


def test_fails_over_to_the_next_address_and_sticks_to_it():
    vault = Vault(down={A})
    kv, sleeps = make(vault)
    ok = kv.get_app("c", "a1").key == KEY1
    assert ok and kv.url == B and sleeps == []
    vault.seen.clear()
    kv.get_app("c", "a1")
    assert [s[0] for s in vault.seen] == [B]  # the working one first, no detour via A


def test_a_5xx_answer_fails_over_too_and_a_500_is_not_retried():
    vault = Vault(status={A: [500]})
    kv, sleeps = make(vault)
    assert kv.get_app("c", "a1").version == 1 and kv.url == B
    vault = Vault(status={A: [500], B: [502]})
    kv, sleeps = make(vault)
    with pytest.raises(Unavailable) as info:
        kv.get_app("c", "a1")
    assert sleeps == [] and "no keyvault address answered (2 tried)" in str(info.value)
    assert info.value.http_status == 502


def test_connection_errors_and_503_are_retried_with_capped_jittered_backoff():
    vault = Vault(down={A, B})
    kv, sleeps = make(vault, retries=6, backoff=0.5, max_backoff=2.0)
    with pytest.raises(Unavailable):
        kv.get_app("c", "a1")
    assert len(vault.seen) == 14 and len(sleeps) == 6  # 7 rounds over 2 addresses
    caps = [0.5, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert all(cap / 2 <= s <= cap for s, cap in zip(sleeps, caps, strict=True)), sleeps
    assert len(set(sleeps[2:])) > 1  # jittered: not all the same at the cap

    vault = Vault(status={A: [503, 503]})
    kv, sleeps = make(vault, urls=(A,), retries=2)
    assert kv.get_app("c", "a1").version == 1 and len(sleeps) == 2


@pytest.mark.parametrize(
    ("status", "error"), [(400, InvalidInput), (403, Forbidden), (412, PreconditionFailed)]
)
def test_client_errors_map_to_their_classes_and_do_not_fail_over(status, error):
    vault = Vault(status={A: [status]})
    kv, sleeps = make(vault)
    with pytest.raises(error) as info:
        kv.get_app("c", "a1")
    assert info.value.http_status == status and sleeps == []
    assert [seen[0] for seen in vault.seen] == [A]  # a 4xx is an answer: B is not asked


def test_etag_revalidation_answers_from_memory():
    vault = Vault()
    kv, _ = make(vault, urls=(A,))
    first = kv.get_app("c", "a1")
    again = kv.get_app("c", "a1")
    assert again is first
    assert [s[3].get("If-None-Match") for s in vault.seen] == [None, '"v1"']
    vault.rotate("c", "app:a1", KEY2)
    newer = kv.get_app("c", "a1")
    ok = newer.key == KEY2
    assert ok and newer.version == 2 and not newer.stale


def test_stale_if_error_serves_the_last_key_within_max_stale():
    vault = Vault()
    clock = Clock()
    kv, _ = make(vault, urls=(A,), retries=0, clock=clock, max_stale=60)
    kv.get_app("c", "a1")
    vault.down.add(A)
    clock.now += 59
    stale = kv.get_app("c", "a1")
    ok = stale.key == KEY1
    assert ok and stale.stale and stale.version == 1
    with pytest.raises(Unavailable):  # the caller may ask for fresh only
        kv.get_app("c", "a1", max_stale=0)
    clock.now += 2  # 61 s since keyvault last confirmed it
    with pytest.raises(Unavailable):
        kv.get_app("c", "a1")
    vault.down.clear()
    fresh = kv.get_app("c", "a1")
    assert not fresh.stale
    # Never for an answer that is authoritative: a 403 is not an outage.
    vault.keys.clear()
    with pytest.raises(Forbidden):
        kv.get_app("c", "a1")


def test_without_max_stale_an_outage_is_an_error():
    vault = Vault()
    kv, _ = make(vault, urls=(A,), retries=0)
    kv.get_app("c", "a1")
    vault.down.add(A)
    with pytest.raises(Unavailable) as info:
        kv.get_app("c", "a1")
    assert isinstance(info.value, KeyvaultError) and TOKEN not in str(info.value)


def test_environment_defaults_are_read_when_the_client_is_made(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("KEYVAULT_ADDR", f"{A}, {B}/")
    monkeypatch.delenv("KEYVAULT_TOKEN", raising=False)
    monkeypatch.setenv("KEYVAULT_TOKEN_FILE", str(token_file))
    vault = Vault()
    kv = Client(transport=vault)
    assert kv.urls == [A, B] and kv.get_app("c", "a1").version == 1
    monkeypatch.setenv("KEYVAULT_TOKEN", TOKEN)  # KEYVAULT_TOKEN first, then the file
    monkeypatch.setenv("KEYVAULT_TOKEN_FILE", str(tmp_path / "missing"))
    assert Client(transport=vault).get_app("c", "a1").version == 1
    monkeypatch.delenv("KEYVAULT_ADDR")
    with pytest.raises(InvalidInput, match="no keyvault address"):
        Client(transport=vault)
    with pytest.raises(InvalidInput, match="cannot read the token file"):
        Client(A, token_file=str(tmp_path / "missing"), transport=vault)


def test_consumer_header_defaults_to_the_host_name():
    vault = Vault()
    make(vault, urls=(A,))[0].get_app("c", "a1")
    make(vault, urls=(A,), consumer="web-1@pod:7")[0].get_app("c", "a1")
    names = [s[3]["X-Keyvault-Consumer"] for s in vault.seen]
    assert names[0] == socket.gethostname()[:64] and names[1] == "web-1@pod:7"
    with pytest.raises(InvalidInput, match="invalid consumer name"):
        Client(A, TOKEN, consumer="has space", transport=vault)


def test_watch_yields_rotations_by_event_and_revalidates_after_an_outage():
    vault = Vault()
    vault.keys[("c", "root")] = (5, KEY1)
    kv, sleeps = make(vault, urls=(A,), retries=0, backoff=0.0)
    kv.get_app("c", "a1")
    kv.get_root("c")
    changes = kv.watch(wait=0)
    vault.rotate("c", "app:a1", KEY2)  # before the watch starts: found by revalidation
    first = next(changes)
    ok = first.key.key == KEY2
    assert ok and (first.scope, first.version, first.previous_version) == ("app:a1", 2, 1)
    assert first.event_id is None
    vault.rotate("c", "app:a1", KEY3)  # while it follows the feed: found by its event
    by_event = next(changes)
    assert (by_event.version, by_event.previous_version, by_event.event_id) == (3, 2, 2)
    # An outage, and a rotation keyvault commits meanwhile without an event reaching us
    # (a restored feed): found by revalidation once keyvault answers again.
    vault.down.add(A)
    vault.budget = 200
    calls = len(vault.seen)

    def heal_later(request: Request) -> Response:
        if len(vault.seen) > calls + 5:
            vault.down.clear()
            vault.keys[("c", "root")] = (6, KEY3)
        return vault(request)

    kv._transport = heal_later
    second = next(changes)
    ok = second.key.key == KEY3
    assert ok and (second.scope, second.version, second.event_id) == ("root", 6, None)
    assert sleeps == [] and kv.cached("c", "root").version == 6


def test_on_rotate_calls_back_from_a_thread():
    import threading

    vault = Vault()
    kv, _ = make(vault, urls=(A,), retries=0)
    kv.get_app("c", "a1")
    got: list = []
    done = threading.Event()

    def callback(rotation) -> None:
        got.append(rotation.version)
        done.set()

    watcher = kv.on_rotate(callback, wait=0)
    vault.rotate("c", "app:a1", KEY2)
    assert done.wait(60)
    watcher.stop(timeout=60)
    assert got[:1] == [2] and not watcher.thread.is_alive()


def test_keys_and_token_stay_out_of_repr_errors_and_logs(caplog):
    caplog.set_level(logging.DEBUG, logger="keyvault_client")
    vault = Vault()
    kv, _ = make(vault, urls=(A,), retries=1, max_stale=60)
    info = kv.get_app("c", "a1")
    vault.down.add(A)
    stale = kv.get_app("c", "a1")
    vault.status[A] = [503]
    vault.down.clear()
    vault.keys.clear()
    with pytest.raises(KeyvaultError) as error:
        kv.get_app("c", "zz")
    shown = " ".join([repr(info), repr(stale), repr(kv), str(error.value), caplog.text])
    assert KEY1 not in shown and TOKEN not in shown
    assert "stale=True" in repr(stale)
