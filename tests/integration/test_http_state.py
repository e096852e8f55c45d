"""The server's caches under concurrent database threads, in process on SQLite and PostgreSQL.

Key and token lookups run in a pool of database threads, so a cache fill can race a commit:
a request that read the revision before a rotation's commit loads the old key, and must
not leave it in the cache after another request saw the new revision (the old key is dead
at TA). The race is made deterministic by a ``ServerState`` whose key load waits for the
test between reading the key and caching it (a fake by injection).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from keyvault.config import load_settings
from keyvault.http.state import KeyEntry, ServerState
from tests.support.cli import Cli, expect
from tests.support.leak_guard import new_key
from tests.support.timeouts import TIMEOUT


class _PausedLoad(ServerState):
    """Its first key load stops after reading the key, until ``release`` is set."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loaded, self.release = threading.Event(), threading.Event()

    def _load(self, cluster: str, scope: str) -> KeyEntry | None:
        entry = super()._load(cluster, scope)
        if not self.loaded.is_set():
            self.loaded.set()
            assert self.release.wait(TIMEOUT)
        return entry


def _import(cli: Cli) -> None:
    expect(cli("import", "--cluster", "c", "--root", input=new_key() + "\n"))


def test_a_key_loaded_before_a_commit_is_not_cached_after_it(cli: Cli, db_url: str):
    expect(cli("init"))
    expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))
    _import(cli)  # v1
    state = _PausedLoad(load_settings(actor="http"))
    slow = ThreadPoolExecutor(1)
    try:

        def slow_request() -> KeyEntry:
            state.ensure_fresh()  # reads the revision before the commit below
            return state.key_entry("c", "root")

        pending = slow.submit(slow_request)
        assert state.loaded.wait(TIMEOUT)  # it has read v1 and not cached it yet
        _import(cli)  # v2 committed; v1 is dead at TA from now on
        state.ensure_fresh()  # another request sees the new revision
        state.release.set()
        assert pending.result(TIMEOUT).version == 1  # right for a request before the commit
        assert state.key_entry("c", "root").version == 2  # never the stale v1 from the cache
        state.ensure_fresh()
        assert state.key_entry("c", "root").version == 2
    finally:
        state.release.set()
        slow.shutdown(wait=True)
        state.close()
