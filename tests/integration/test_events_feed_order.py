"""/v1/events' query on a real database: an event whose transaction commits after a later
one's (PostgreSQL sequences) is still delivered. Two real sessions, as in production:
session 1 inserts event N+1 and has not committed, session 2 inserts N+2 and commits."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from keyvault.db import session_factory
from keyvault.events import record_event
from keyvault.http.routers.events import events_after
from keyvault.scope import Grant

GRANT = Grant(name="t", roots=frozenset({"c"}), apps=frozenset(), can_rotate=False)


@dataclass
class _State:
    """What events_after reads of the server's state: its session factory."""

    factory: sessionmaker[Session]


def _record(session: Session, n: int) -> int:
    return record_event(
        session, kind="secret.rotated", cluster="c", scope="root", payload={"n": n}
    ).id


def test_an_event_committed_out_of_order_is_still_delivered(engine):
    factory = session_factory(engine)
    state = _State(factory)
    with factory() as setup, setup.begin():
        first = _record(setup, 0)
    assert [e.id for e in events_after(state, GRANT, 0)[0]] == [first]  # type: ignore[arg-type]
    slow, fast = factory(), factory()
    try:
        slow.begin()
        early = _record(slow, 1)  # not committed yet
        if engine.dialect.name == "postgresql":
            with fast.begin():
                late = _record(fast, 2)  # a higher id, committed first
            assert late > early
            found, last = events_after(state, GRANT, first)  # type: ignore[arg-type]
            # Was [late] and last=late: `early` then never came.
            assert (found, last) == ([], first)  # wait: `early` may still commit
        slow.commit()
        if engine.dialect.name != "postgresql":  # SQLite: one writer at a time
            with fast.begin():
                late = _record(fast, 2)
        found, last = events_after(state, GRANT, first)  # type: ignore[arg-type]
        assert [e.id for e in found] == [early, late] and last == late
    finally:
        slow.close()
        fast.close()
