"""Failover of consumers across two real ``keyvault serve`` replicas on one database
(PostgreSQL, and SQLite: two processes on one file on one machine).

A replica is killed with SIGKILL (no graceful shutdown, its port refuses at once); the
consumer given both addresses must read the current key through the other one, including
a key imported after the kill. ``Client``, ``on_rotate`` and ``keyvault agent`` are each
taken through a kill of the replica they use and, after it is back, of the other one; the
``Client`` also through a replica that hangs (SIGSTOP).
Every wait is a bounded poll of observable state (a file, a queue, an answer).
"""

from __future__ import annotations

import queue
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyvault_client import Client, Rotation
from tests.support.consumers import Consumer, read, token_file, wait_until
from tests.support.failover import kill9, read_key, replica_pair, restart, stop_all
from tests.support.http import Server, World
from tests.support.timeouts import TIMEOUT


@pytest.fixture
def replicas(served: World) -> Iterator[list[Server]]:
    pair = replica_pair(served)
    try:
        yield pair
    finally:
        stop_all(pair)


def client(world: World, servers: list[Server], token: str = "app-all") -> Client:
    return Client(
        [s.url for s in servers], world.tokens[token], retries=1, backoff=0.05, max_backoff=0.5
    )


def current(world: World, info, scope: str) -> bool:
    return info.version == world.versions[("c", scope)] and info.key == world.keys[("c", scope)]


def test_both_replicas_serve_the_same_current_key(served: World, replicas):
    world = served
    version = world.import_key("c", "app:a1")
    for server in replicas:
        assert read_key(world, server.url, "app-all", "c", "app:a1") == (200, True)
    assert version == 2


def test_client_reads_through_the_other_replica_after_a_kill9(served: World, replicas):
    world = served
    kv = client(world, replicas)
    first = kv.get_app("c", "a1")
    ok = current(world, first, "app:a1")
    assert ok and kv.url == replicas[0].url
    kill9(replicas[0])
    world.import_key("c", "app:a1")  # committed after the kill: only replica 1 can serve it
    after = kv.get_app("c", "a1")
    ok = current(world, after, "app:a1") and not after.stale
    assert ok and after.version == first.version + 1
    assert kv.url == replicas[1].url  # and it stays there
    restart(replicas[0])
    kill9(replicas[1])  # now the one it uses dies: back to the first address
    world.import_key("c", "app:a1")
    back = kv.get_app("c", "a1")
    ok = current(world, back, "app:a1")
    assert ok and kv.url == replicas[0].url


def test_client_revalidates_by_etag_on_the_other_replica(served: World, replicas):
    # The ETag is the version: a key cached from one replica is a 304 on the other.
    world = served
    kv = client(world, replicas, "root-c")
    first = kv.get_root("c")
    kill9(replicas[0])
    again = kv.get_root("c")
    assert again is first  # the cached KeyInfo itself: the answer was a 304
    assert kv.url == replicas[1].url


def test_on_rotate_continues_through_a_replica_kill9(served: World, replicas):
    world = served
    kv = client(world, replicas)
    kv.get_app("c", "a1")
    rotations: queue.Queue[Rotation] = queue.Queue()
    watcher = kv.on_rotate(rotations.put, wait=5)
    try:
        world.import_key("c", "app:a1")
        assert _next(rotations).version == world.versions[("c", "app:a1")]
        kill9(replicas[0])  # the replica holding the long-poll
        world.import_key("c", "app:a1")
        got = _next(rotations)
        ok = got.version == world.versions[("c", "app:a1")] and current(world, got.key, "app:a1")
        assert ok and watcher.error is None
        restart(replicas[0])
        kill9(replicas[1])
        world.import_key("c", "app:a1")
        got = _next(rotations)
        ok = got.version == world.versions[("c", "app:a1")] and current(world, got.key, "app:a1")
        assert ok and watcher.error is None
    finally:
        kv.close()
        watcher.stop(TIMEOUT)
    assert rotations.empty()  # one Rotation per change, none twice


def _next(rotations: queue.Queue[Rotation]) -> Rotation:
    try:
        return rotations.get(timeout=TIMEOUT)  # a bound only a hang reaches
    except queue.Empty:
        pytest.fail(f"no rotation within {TIMEOUT:g}s", pytrace=False)


def test_agent_keeps_its_file_current_across_replica_kills(served: World, replicas, tmp_path: Path):
    world = served
    target = tmp_path / "ta.key"
    options = [a for s in replicas for a in ("--addr", s.url)]
    proc = Consumer.start(
        tmp_path, "agent", *options, "--token-file", str(token_file(world, tmp_path)),
        "--cluster", "c", "--appid", "a1", "--file", str(target), "--wait", "5",
    )  # fmt: skip

    def holds() -> bool:
        return read(target) == world.keys[("c", "app:a1")] + "\n"

    try:
        wait_until(holds, "the first key file", proc)
        kill9(replicas[0])
        world.import_key("c", "app:a1")
        wait_until(holds, "the key imported after replica 0 was killed", proc)
        restart(replicas[0])
        kill9(replicas[1])
        world.import_key("c", "app:a1")
        wait_until(holds, "the key imported after replica 1 was killed", proc)
    finally:
        status = proc.stop()
    assert status == 0, proc.log()
    assert not world.holds_key(read(proc.stderr)), "a key in the agent's output"


def test_client_moves_on_from_a_replica_that_hangs(served: World, replicas):
    # SIGSTOP: the port still accepts connections (the kernel's backlog) but nothing
    # answers, as with a machine that vanished without a reset. One timeout, then the other.
    world = served
    kv = Client([s.url for s in replicas], world.tokens["app-all"], timeout=1, retries=0)
    kv.get_app("c", "a1")
    proc = replicas[0].proc
    assert proc is not None and kv.url == replicas[0].url
    proc.send_signal(signal.SIGSTOP)
    try:
        world.import_key("c", "app:a1")
        info = kv.get_app("c", "a1")
        ok = current(world, info, "app:a1")
        assert ok and kv.url == replicas[1].url
    finally:
        proc.send_signal(signal.SIGCONT)
