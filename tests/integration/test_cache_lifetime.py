"""The server's caches do not trust the revision counter alone (issue 10, a database writer).

A writer without the master key can rewind or freeze the one-row ``revision`` counter: a
server that had a token or key cached at that revision would keep serving it. Each cache
entry is therefore also stamped with its ``CACHE_LIFETIME`` period: once that passes, the
row is read again (its MAC and revocation checked), whatever the counter says. The clock is
injected: no test waits for time to pass.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from keyvault.config import load_settings
from keyvault.db import make_engine
from keyvault.errors import Unauthorized
from keyvault.http.state import CACHE_LIFETIME, ServerState
from tests.support.cli import expect
from tests.support.http import World


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _counter(db_url: str, value: int | None = None) -> int:
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            if value is not None:
                conn.execute(text("UPDATE revision SET value = :v WHERE id = 1"), {"v": value})
            return int(conn.execute(text("SELECT value FROM revision WHERE id = 1")).scalar_one())
    finally:
        engine.dispose()


@pytest.fixture
def state(served: World, env: dict):
    clock = Clock()
    # recheck=0 and no listener started: the counter is read on every request, as on SQLite.
    server_state = ServerState(load_settings(env, actor="test"), recheck=0, clock=clock)
    try:
        yield server_state, clock
    finally:
        server_state.close()


def test_a_rewound_counter_serves_a_revoked_token_for_one_cache_lifetime_at_most(
    served: World, state, db_url: str
):
    server, clock = state
    header = f"Bearer {served.tokens['app-a1']}"
    server.ensure_fresh()
    assert server.authenticate(header).name == "app-a1"  # cached now
    before = _counter(db_url)
    expect(served.cli("token", "revoke", "app-a1", "--yes"))
    assert _counter(db_url) > before
    _counter(db_url, before)  # the writer puts the counter back: no change seen

    server.ensure_fresh()
    # Within the same period the cache still answers (the bound is the lifetime, not zero).
    assert server.authenticate(header).name == "app-a1"
    clock.now += CACHE_LIFETIME
    server.ensure_fresh()
    with pytest.raises(Unauthorized):
        server.authenticate(header)


def test_a_frozen_counter_does_not_keep_an_old_key(served: World, state, db_url: str):
    server, clock = state
    server.ensure_fresh()
    old = server.key_entry("c", "app:a1")
    frozen = _counter(db_url)
    served.import_key("c", "app:a1")  # a new version, committed by another process
    _counter(db_url, frozen)

    server.ensure_fresh()
    assert server.key_entry("c", "app:a1").version == old.version  # same period: cached
    clock.now += CACHE_LIFETIME
    server.ensure_fresh()
    assert server.key_entry("c", "app:a1").version == old.version + 1
