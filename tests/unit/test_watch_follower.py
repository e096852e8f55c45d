"""The rotation follower (keyvault_client.watch.Follower) with an injected client: transient
failures (429, a redirect, a malformed body, no answer) are retried and keep the feed
position (the history is never paged again after an outage; every key is revalidated), and
only 401/403/404 end it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from keyvault_client.client import KeyInfo
from keyvault_client.errors import Forbidden, KeyvaultError, NotFound, Unauthorized, Unavailable
from keyvault_client.watch import Follower

SCOPE = ("c", "app:a1")


class FakeClient:
    """Answers ``events`` from a script: each entry a result or an exception to raise."""

    url = "http://kv.invalid"

    def __init__(self, script: list[object], versions: list[int]) -> None:
        self.script = script
        self.versions = versions
        self.calls: list[int] = []  # the ``after`` of every events() call
        self.gets = 0
        self.stop = threading.Event()

    def cached(self, cluster: str, scope: str) -> None:
        return None

    def held(self) -> list[tuple[str, str]]:
        return [SCOPE]

    def delay(self, attempt: int) -> float:
        return 0.0  # no pause: the test scripts the answers

    def get(self, cluster: str, scope: str, *, max_stale: float | None = None) -> KeyInfo:
        version = self.versions[min(self.gets, len(self.versions) - 1)]
        self.gets += 1
        return KeyInfo(cluster, scope, version, "fp", "2026-01-01", key="k", etag=f'"v{version}"')

    def events(
        self, after: int, wait: float = 0.0, *, tail: bool = False
    ) -> tuple[list[dict[str, object]], int]:
        # ``tail`` is answered from the script like a page (an empty one is the tail's id).
        self.calls.append(after)
        if not self.script:
            self.stop.set()
            return [], after
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        assert isinstance(step, tuple)
        return step


def follow(client: FakeClient, after: int | None = None) -> list[int]:
    follower = Follower(client, [SCOPE], wait=0.0, after=after, stop=client.stop)  # type: ignore[arg-type]
    return [rotation.version for rotation in follower.run()]


@pytest.mark.parametrize(
    "failure",
    [
        KeyvaultError("keyvault GET /v1/events answered HTTP 429 (rate_limited)"),
        KeyvaultError("keyvault GET /v1/events answered HTTP 302 (Found)"),
        KeyvaultError("keyvault answered GET /v1/events with a malformed body"),
        Unavailable("no answer"),
    ],
    ids=["429", "3xx", "malformed", "unavailable"],
)
def test_a_transient_failure_is_retried_keeping_the_position(failure: KeyvaultError) -> None:
    # Start: one empty page gives the newest id (40); then a failure; then the feed goes on.
    client = FakeClient([([], 40), failure, ([], 40)], versions=[1, 2])
    assert follow(client) == [1, 2]  # the start, then revalidation after the failure
    assert client.calls == [0, 40, 40, 40], "the position was lost after the failure"


def test_a_reconnect_does_not_page_the_history_again() -> None:
    outage: list[object] = [Unavailable("down")] * 3
    client = FakeClient([*outage, ([], 7000)], versions=[3])
    assert follow(client, after=7000) == [3]
    assert client.calls == [7000] * 5 and 0 not in client.calls


@pytest.mark.parametrize("fatal", [Unauthorized, Forbidden, NotFound])
def test_a_refused_token_or_a_gone_scope_ends_the_follower(
    fatal: Callable[[str], KeyvaultError],
) -> None:
    client = FakeClient([([], 5), fatal("refused")], versions=[1])
    with pytest.raises(fatal):  # type: ignore[call-overload]
        follow(client)
