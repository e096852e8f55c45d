"""The consumer tracker and the propagation service on a real database (SQLite and PostgreSQL).

The tracker is driven directly (``seen`` with ASGI scopes, ``flush`` in the test's thread):
what is written, when nothing is written (a steady consumer), the per-token cap in memory
and in the table, hostile names, and ``claim_propagated`` racing itself across threads.
"""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import func, select, text

from keyvault.db import session_factory, transaction
from keyvault.http.consumer_tracker import ConsumerTracker, consumer_name
from keyvault.models import AccessToken, Cluster, ConsumerRead, Event, Rotation, utcnow
from keyvault.services.propagation import (
    PROPAGATED_EVENT,
    claim_propagated,
    list_consumers,
    propagation_of,
)


def request(consumer: bytes | None = None) -> dict:
    headers = [(b"host", b"x")] + ([(b"x-keyvault-consumer", consumer)] if consumer else [])
    return {"headers": headers}


def rows(engine) -> list[tuple]:
    with engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                text(
                    "SELECT token_name, consumer, cluster, scope, version FROM consumer_reads"
                    " ORDER BY token_name, consumer, cluster, scope"
                )
            )
        ]


def test_consumer_names_follow_the_shared_grammar():
    assert consumer_name(request(b"billing-1.prod:eu@x_y"), "10.0.0.1") == "billing-1.prod:eu@x_y"
    assert consumer_name(request(), "10.0.0.1") == "10.0.0.1"
    for bad in (b"a b", b"x" * 65, b"\x1b[2J", b"", "caf\u00e9".encode(), b"a/b"):
        assert consumer_name(request(bad), "10.0.0.1") == "10.0.0.1"
    assert consumer_name(request(), None) == "unknown"


def test_a_steady_consumer_is_written_once_and_a_new_version_at_once(engine):
    tracker = ConsumerTracker(engine)
    for _ in range(50):
        tracker.seen(request(b"svc-a"), "tok", "127.0.0.1", "c", "app:a1", 1)
    tracker.seen(request(b"svc-b"), "tok", "127.0.0.1", "c", "root", 3)
    assert tracker.flush() == 2
    assert rows(engine) == [("tok", "svc-a", "c", "app:a1", 1), ("tok", "svc-b", "c", "root", 3)]
    for _ in range(50):  # the steady state: memory only
        tracker.seen(request(b"svc-a"), "tok", "127.0.0.1", "c", "app:a1", 1)
    assert tracker.flush() == 0
    tracker.seen(request(b"svc-a"), "tok", "127.0.0.1", "c", "app:a1", 2)
    assert tracker.flush() == 1
    assert rows(engine)[0] == ("tok", "svc-a", "c", "app:a1", 2)


def test_an_older_read_flushed_late_does_not_undo_a_newer_one(engine):
    late, fresh = ConsumerTracker(engine), ConsumerTracker(engine)
    late.seen(request(b"svc"), "tok", None, "c", "root", 1)  # read first, written last
    fresh.seen(request(b"svc"), "tok", None, "c", "root", 2)
    fresh.flush()
    late.flush()
    assert rows(engine) == [("tok", "svc", "c", "root", 2)]


def test_hostile_names_are_bounded_in_memory_and_in_the_table(engine, caplog):
    tracker = ConsumerTracker(engine, max_per_token=5)
    for i in range(50):
        tracker.seen(request(f"random-{i}".encode()), "hostile", None, "c", "root", 1)
    tracker.seen(request(b"\x1b]0;pwned\x07"), "hostile", "10.9.9.9", "c", "root", 1)
    tracker.seen(request(b"y" * 5000), "hostile", "10.9.9.9", "c", "root", 1)
    tracker.seen(request(b"ok"), "other", None, "c", "root", 1)  # another token is not starved
    assert len(tracker._entries) == 6  # 5 of the hostile token, 1 of the other
    assert "not tracked" in caplog.text
    tracker.flush()
    assert [r[1] for r in rows(engine) if r[0] == "hostile"] == [f"random-{i}" for i in range(5)]
    # A restarted server (a new map) cannot add more rows for the token: the table is capped too.
    restarted = ConsumerTracker(engine, max_per_token=5)
    restarted.seen(request(b"random-0"), "hostile", None, "c", "root", 2)  # a known one: updated
    for i in range(100, 110):
        restarted.seen(request(f"random-{i}".encode()), "hostile", None, "c", "root", 1)
    restarted.flush()
    hostile = [r for r in rows(engine) if r[0] == "hostile"]
    assert len(hostile) == 5 and ("hostile", "random-0", "c", "root", 2) in hostile


def _rotation(engine, *, new_version: int) -> str:
    """A completed rotation of c/root to ``new_version`` (its key need not exist here)."""
    now = utcnow()
    factory = session_factory(engine)
    with transaction(factory) as s:
        cluster = Cluster(name="c", open_api_url="http://127.0.0.1:9", key_pattern=".+")
        cluster.created_at = now
        s.add(cluster)
        # The readers' token: a consumer of a token that no longer exists is not known.
        s.add(AccessToken(name="tok", token_hash="0" * 64, scopes="[]", created_at=now))
        s.flush()
        s.add(
            Rotation(
                id="rot1", cluster_id=cluster.id, scope="root", state="completed",
                host_label="h", actor="t", created_at=now, updated_at=now,
                old_version=new_version - 1, new_version=new_version,
            )
        )  # fmt: skip
    return "rot1"


def test_propagation_figures_and_one_claim_among_racing_processes(engine):
    rid = _rotation(engine, new_version=2)
    tracker = ConsumerTracker(engine)
    tracker.seen(request(b"a"), "tok", None, "c", "root", 2)
    tracker.seen(request(b"b"), "tok", None, "c", "root", 1)
    tracker.flush()
    factory = session_factory(engine)
    with transaction(factory) as s:
        figures = propagation_of(s, s.get(Rotation, rid))
        assert (figures.consumers, figures.updated, figures.complete) == (2, 1, False)
        assert [x["consumer"] for x in figures.stale] == ["b"]
        # no current version stored for c/root here: every consumer counts as stale
        assert all(r["stale"] for r in list_consumers(s, cluster="c"))
    tracker.seen(request(b"b"), "tok", None, "c", "root", 2)
    tracker.flush()  # no key stored: latest_rotation finds none, the server records nothing
    with transaction(factory) as s:
        figures = propagation_of(s, s.get(Rotation, rid))
    assert figures.complete and figures.consumers == 2

    # Eight processes notice at once (each with its own engine): exactly one records it.
    from keyvault.db import make_engine

    start, claimed, errors = threading.Barrier(8), [], []

    def claim() -> None:
        own = make_engine(engine.url.render_as_string(hide_password=False))
        try:
            start.wait(30)
            with transaction(session_factory(own)) as s:
                claimed.append(claim_propagated(s, figures))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and sorted(claimed) == [False] * 7 + [True]
    with transaction(factory) as s:
        assert (
            s.scalar(select(func.count()).select_from(Event).where(Event.type == PROPAGATED_EVENT))
            == 1
        )
        assert s.get(Rotation, rid).propagated_at is not None


def test_rows_older_than_the_retention_are_pruned(engine):
    old = utcnow() - timedelta(days=31)
    with transaction(session_factory(engine)) as s:
        s.add(
            ConsumerRead(
                token_name="t", consumer="gone", cluster="c", scope="root", version=1,
                version_seen_at=old, last_read_at=old,
            )
        )  # fmt: skip
    tracker = ConsumerTracker(engine)
    tracker.seen(request(b"here"), "t", None, "c", "root", 1)
    tracker.flush()
    assert [r[1] for r in rows(engine)] == ["here"]
