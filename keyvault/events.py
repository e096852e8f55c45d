"""Recording an event: the one way a change enters the ``events`` outbox.

An event is written in the same transaction as the change it announces, so a
consumer (the events feed, webhooks) sees it exactly when the change is visible.
Payloads carry fingerprints and ids, never keys.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

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
