"""The lease decisions of services/leases.py on SQLite and PostgreSQL, with an injected clock
(the database's ``now`` stands in for it) and an injected monotonic clock (the holder's own
bound): take, renew, refuse, expire, take over, fence, release; and two keepers racing.

Nothing sleeps: time moves only when a test moves it.
"""

from __future__ import annotations

import contextlib
import threading
from datetime import timedelta

import pytest

from keyvault.db import session_factory, transaction
from keyvault.models import WEBHOOK_LEASE
from keyvault.services import leases
from tests.support.clock import Clock

TTL = timedelta(seconds=15)
NAME = WEBHOOK_LEASE


class Monotonic:
    """A monotonic clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def factory(engine):
    return session_factory(engine)


def keeper(factory, clock, holder: str, mono=None, **kwargs) -> leases.LeaseKeeper:
    return leases.LeaseKeeper(
        factory, name=NAME, holder=holder, ttl=TTL, clock=clock, monotonic=mono or Monotonic(),
        **kwargs,
    )  # fmt: skip


def row(factory) -> leases.LeaseInfo:
    with transaction(factory) as s:
        info = leases.read(s, NAME)
    assert info is not None
    return info


def test_one_holder_renews_others_wait_for_expiry_then_take_over(factory):
    clock = Clock()
    taken: list[tuple[str, str | None]] = []
    a = keeper(factory, clock, "a", on_taken=lambda info, prev: taken.append(("a", prev)))
    b = keeper(factory, clock, "b", on_taken=lambda info, prev: taken.append(("b", prev)))
    assert a.step() and a.held()
    first = row(factory)
    assert (first.holder, first.acquired_at, first.expires_at) == ("a", clock.now, clock.now + TTL)
    assert not b.step() and not b.held() and b.info == first  # b sees who holds it

    clock.advance(10)
    assert a.step()  # a renewal: same epoch, same acquired_at, later expiry
    renewed = row(factory)
    assert (renewed.epoch, renewed.acquired_at) == (first.epoch, first.acquired_at)
    assert renewed.expires_at == clock.now + TTL
    clock.advance(TTL - timedelta(microseconds=1))
    assert not b.step()  # not yet expired

    clock.advance(timedelta(microseconds=1))  # a died: its lease ran out
    assert b.step() and b.held()
    took = row(factory)
    assert took.holder == "b" and took.epoch == first.epoch + 1 and took.acquired_at == clock.now
    assert taken == [("a", None), ("b", "a")]
    assert not a.step() and not a.held()  # a (back from a pause) finds it taken: fenced
    with transaction(factory) as s:
        assert not leases.release(s, name=NAME, holder="a")  # not a's to give back
        assert not leases.holds(s, name=NAME, holder="a", now=clock.now)
        assert leases.holds(s, name=NAME, holder="b", now=clock.now)


def test_the_holder_stops_believing_before_the_database_expiry(factory):
    clock, mono = Clock(), Monotonic()
    a = keeper(factory, clock, "a", mono)
    assert a.step()
    mono.t += TTL.total_seconds() * 0.8 - 0.001
    assert a.held()
    mono.t += 0.001  # no renewal for 4/5 of the ttl: a stops acting on its own
    assert not a.held()
    with transaction(factory) as s:
        assert not a.fence(s)
    assert a.step() and a.held()  # renewed: acting again


def test_a_failed_renewal_fences_at_once(factory):
    clock = Clock()
    a = keeper(factory, clock, "a")
    assert a.step() and a.held()

    def broken():
        raise RuntimeError("database unreachable")

    a.factory = broken
    assert not a.step() and not a.held()
    assert not a.confirm()


def test_a_released_lease_is_taken_at_once_and_confirm_reads_the_row(factory):
    clock = Clock()
    a, b = keeper(factory, clock, "a"), keeper(factory, clock, "b")
    assert a.step() and a.confirm()
    with transaction(factory) as s:  # another runner's clean stop, seen from the row
        assert leases.release(s, name=NAME, holder="a")
    assert a.held() and not a.confirm()  # the row is what counts
    assert b.step() and row(factory).holder == "b"


def test_racing_keepers_never_hold_it_together(factory):
    clock = Clock()
    keepers = [keeper(factory, clock, f"k{i}") for i in range(4)]
    results: dict[str, list[bool]] = {k.holder: [] for k in keepers}
    barrier = threading.Barrier(len(keepers))

    def race(k: leases.LeaseKeeper) -> None:
        for _ in range(10):
            barrier.wait(timeout=30)
            results[k.holder].append(k.step())
            barrier.wait(timeout=30)

    threads = [threading.Thread(target=race, args=(k,)) for k in keepers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    rounds = list(zip(*results.values(), strict=True))
    assert all(sum(r) <= 1 for r in rounds), rounds
    assert sum(r[0] or r[1] or r[2] or r[3] for r in rounds) == len(rounds)  # someone holds it
    assert len({h for h, got in results.items() if any(got)}) == 1  # never expired: one holder


# PostgreSQL only: SQLite has no row locks, and no server to end a session.
@pytest.mark.parametrize("blank_database", ["postgres"], indirect=True)
def test_a_holder_stalled_inside_a_fenced_transaction_does_not_block_the_takeover(factory, engine):
    """PostgreSQL: the fence share-locks the lease row until its transaction ends. A holder
    that stops inside that transaction (power loss, a partition, SIGSTOP) leaves its session
    idle in transaction, for hours until TCP keepalive notices; the next holder's takeover
    must not wait on that lock: the server ends such a session once it has been idle for a
    fifth of the TTL (the fence's own margin). A hang guard only: nothing here is timed."""
    assert engine.dialect.name == "postgresql"
    clock = Clock()
    a, b = keeper(factory, clock, "a"), keeper(factory, clock, "b")
    assert a.step()
    stalled = factory()
    assert a.fence(stalled)  # ... and A stops here, its transaction open
    clock.advance(TTL)
    took: list[bool] = []
    taker = threading.Thread(target=lambda: took.append(b.step()), daemon=True)
    taker.start()
    taker.join(timeout=120)  # a hang guard, far above the expected few seconds
    try:
        assert took == [True], "the takeover waited on the stalled holder's lock"
    finally:
        with contextlib.suppress(Exception):
            stalled.rollback()
        stalled.close()
        taker.join(timeout=30)
