"""The consumer tracker's writer thread retries a failed write by itself (SQLite and PostgreSQL):
a consumer that keeps reading the same version marks nothing new, so without a retry its
entry would never be written and the rotation would never count as propagated."""

from __future__ import annotations

import threading
import time

from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

from keyvault.db import session_factory
from keyvault.http.consumer_tracker import ConsumerTracker
from tests.support.timeouts import TIMEOUT


def _request(consumer: bytes) -> dict:
    return {"headers": [(b"x-keyvault-consumer", consumer)]}


def _versions(engine) -> list[int]:
    with engine.connect() as conn:
        return [v for (v,) in conn.execute(text("SELECT version FROM consumer_reads"))]


def test_a_failed_write_is_retried_without_a_new_read(engine):
    failed = threading.Event()

    # Injected fault: the first upsert fails as a locked database does; later ones go through.
    def locked_once(conn, cursor, statement, parameters, context, executemany):
        if "INSERT INTO consumer_reads" in statement and not failed.is_set():
            failed.set()
            raise OperationalError(statement, {}, Exception("database is locked"))

    event.listen(engine, "before_cursor_execute", locked_once)
    tracker = ConsumerTracker(engine, flush_delay=0).start()
    try:
        tracker.seen(_request(b"svc"), "tok", "127.0.0.1", "c", "app:a1", 1)
        assert failed.wait(TIMEOUT), "the write never ran"
        for _ in range(3):  # the same version again: nothing new to mark
            tracker.seen(_request(b"svc"), "tok", "127.0.0.1", "c", "app:a1", 1)
        deadline = time.monotonic() + TIMEOUT
        while _versions(engine) != [1]:
            assert time.monotonic() < deadline, "the failed write was never retried"
            time.sleep(0.05)  # a poll interval, not a synchronisation
    finally:
        tracker.stop()
        event.remove(engine, "before_cursor_execute", locked_once)


def test_idle_entries_leave_memory_and_free_their_tokens_cap(engine):
    from keyvault.db import transaction
    from keyvault.services.propagation import RETENTION, forget_consumers

    tracker = ConsumerTracker(engine, max_per_token=1)
    tracker.seen(_request(b"one-off"), "tok", "127.0.0.1", "c", "app:a1", 1)
    assert tracker.flush() == 1
    tracker.seen(_request(b"new"), "tok", "127.0.0.1", "c", "app:a1", 1)
    assert tracker.flush() == 0  # the cap: not tracked
    with transaction(session_factory(engine)) as session:  # `keyvault consumers forget`
        forget_consumers(session, token="tok", consumer="one-off")
    assert tracker.evict_idle(time.time()) == 0  # read just now: stays
    assert tracker.evict_idle(time.time() + RETENTION.total_seconds() + 1) == 1
    tracker.seen(_request(b"new"), "tok", "127.0.0.1", "c", "app:a1", 1)
    assert tracker.flush() == 1 and _versions(engine) == [1]
