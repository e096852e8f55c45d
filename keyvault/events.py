"""Recording an event: the one way a change enters the ``events`` outbox.

An event is written in the same transaction as the change it announces, so a
consumer (the events feed, webhooks) sees it exactly when the change is visible.
Payloads carry fingerprints and ids, never keys.

Ids and commits can disagree on PostgreSQL: a sequence hands out 6 to one transaction and 7
to another that commits first, so a reader of ``id > N`` sees 7 while 6 is still invisible,
and a cursor moved to 7 would skip 6 for good. So every writer holds a shared advisory lock
from its first event until it commits (``record_event``), and a reader that wants to move a
cursor first asks ``settled_feed``: its exclusive try-lock succeeds only while no transaction
holds an uncommitted event, and until the reader commits no new one can be inserted, so every
id the reader sees is final and none below it can appear later. SQLite serialises writers
(ids are committed in order): nothing to do there.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from keyvault.models import Event, utcnow


def record_event(
    session: Session,
    *,
    kind: str,
    cluster: str,
    scope: str,
    payload: dict[str, Any],
    at: datetime | None = None,
) -> Event:
    """Add an event to ``session``'s transaction (flushed, so its id is known)."""
    if _postgresql(session):
        session.execute(text("SELECT pg_advisory_xact_lock_shared(:a, :b)"), _FEED_LOCK)
    event = Event(
        type=kind,
        cluster=cluster,
        scope=scope,
        payload=json.dumps(payload, sort_keys=True, default=str),
        created_at=at or utcnow(),
    )
    session.add(event)
    session.flush()
    return event


# The two-key advisory lock space (apart from hashtext() single keys): "kv", the event feed.
_FEED_LOCK = {"a": 0x6B76, "b": 1}


def _postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def settled_feed(session: Session) -> bool:
    """True if every event id ``session`` can see from now on is final: no lower id can
    commit later. PostgreSQL: no transaction holds an uncommitted event, and none can insert
    one until ``session``'s transaction ends (keep it short); False while one does. SQLite:
    always (writers are serialised, ids commit in order)."""
    if not _postgresql(session):
        return True
    return bool(session.scalar(text("SELECT pg_try_advisory_xact_lock(:a, :b)"), _FEED_LOCK))
