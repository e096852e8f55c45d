"""The deliveries outbox: which events each webhook is owed, their bodies, and the listing.

A webhook is owed the events of its scopes (``rotation.*`` and ``secret.*``) created from
its own creation on; there is no cursor column. Progress is the newest event already owed
to it; events up to ``FANOUT_LOOKBACK`` older than that one are checked again, so an event
whose transaction committed after a later one (PostgreSQL sequences) is still fanned out.
Concurrent fan-outs are harmless: the unique (webhook, event) pair makes a second insert
a no-op. Fan-out only flushes, like every service.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Insert, and_, exists, false, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from keyvault.models import Event, Webhook, WebhookDelivery
from keyvault.scope import Grant
from keyvault.services.webhooks.endpoints import hook_grant, list_webhooks

EVENT_TYPE_PREFIXES = ("rotation.", "secret.")
# Out-of-order commits (PostgreSQL sequences) are caught this far behind the watermark.
FANOUT_LOOKBACK = timedelta(hours=1)
FANOUT_BATCH = 1000
# What a payload may carry: metadata only, never a key or free text.
PAYLOAD_FIELDS = (
    "cluster",
    "scope",
    "old_version",
    "new_version",
    "old_fingerprint",
    "new_fingerprint",
    "fingerprint",
    "rotation_id",
    "at",
    "source",
    "state",
    "return_code",
)


def _event_filter(grant: Grant) -> ColumnElement[bool]:
    """A SQL condition on events equal to ``grant.allows(cluster, scope)``."""
    terms = [and_(Event.cluster == c, Event.scope == "root") for c in sorted(grant.roots)]
    for cluster, appid in sorted(grant.apps):
        if appid == "*":
            terms.append(
                and_(Event.cluster == cluster, Event.scope.startswith("app:", autoescape=True))
            )
        else:
            terms.append(and_(Event.cluster == cluster, Event.scope == f"app:{appid}"))
    return or_(*terms) if terms else false()


def _deliverable_type() -> ColumnElement[bool]:
    return or_(*(Event.type.startswith(p, autoescape=True) for p in EVENT_TYPE_PREFIXES))


def _owed_window(session: Session, hook: Webhook) -> ColumnElement[bool]:
    """Events new enough to be owed to ``hook``: from its creation, near its newest delivery."""
    mark = session.execute(
        select(Event.id, Event.created_at).where(
            Event.id
            == select(func.max(WebhookDelivery.event_id))
            .where(WebhookDelivery.webhook_id == hook.id)
            .scalar_subquery()
        )
    ).first()
    window = Event.created_at >= hook.created_at
    if mark is None:
        return window
    return and_(
        window, or_(Event.id > mark.id, Event.created_at >= mark.created_at - FANOUT_LOOKBACK)
    )


def _new_deliveries(session: Session, hook: Webhook, now: datetime) -> list[dict[str, Any]]:
    """Rows for the events ``hook`` is owed and has no delivery of yet (at most a batch)."""
    grant = hook_grant(hook)
    owed = exists().where(
        WebhookDelivery.webhook_id == hook.id, WebhookDelivery.event_id == Event.id
    )
    events = session.execute(
        select(Event.id, Event.cluster, Event.scope)
        .where(_owed_window(session, hook), _deliverable_type(), _event_filter(grant), ~owed)
        .order_by(Event.id)
        .limit(FANOUT_BATCH)
    ).all()
    return [
        {
            "webhook_id": hook.id,
            "event_id": e.id,
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        for e in events
        if grant.allows(e.cluster, e.scope)
    ]


def enqueue_deliveries(session: Session, *, now: datetime) -> int:
    """Create a pending delivery of each new event for each active webhook whose scopes cover it."""
    created = 0
    for hook in list_webhooks(session):
        rows = _new_deliveries(session, hook, now)
        if rows:
            created += _insert_ignoring_duplicates(session, rows)
    session.flush()
    return created


def _insert_ignoring_duplicates(session: Session, rows: list[dict[str, Any]]) -> int:
    """Insert ``rows``; a (webhook, event) pair that exists already is skipped, not an error."""
    stmt: Insert
    if session.get_bind().dialect.name == "postgresql":
        pg_stmt = pg_insert(WebhookDelivery).values(rows)
        stmt = pg_stmt.on_conflict_do_nothing(index_elements=["webhook_id", "event_id"])
    else:
        lite_stmt = sqlite_insert(WebhookDelivery).values(rows)
        stmt = lite_stmt.on_conflict_do_nothing(index_elements=["webhook_id", "event_id"])
    return len(session.execute(stmt.returning(WebhookDelivery.id)).all())


def event_payload(event: Event) -> dict[str, Any]:
    """The webhook body of an event: its type, time and allow-listed metadata (never a key)."""
    try:
        stored = json.loads(event.payload or "{}")
    except ValueError:
        stored = {}
    data = (
        {name: stored[name] for name in PAYLOAD_FIELDS if name in stored}
        if isinstance(stored, dict)
        else {}
    )
    data.update(event_id=event.id, cluster=event.cluster, scope=event.scope)
    data.setdefault("at", event.created_at.isoformat())
    return {"type": event.type, "timestamp": event.created_at.isoformat(), "data": data}


def _delivery_info(row: WebhookDelivery, event: Event, hook: Webhook) -> dict[str, Any]:
    return {
        "id": row.id,
        "webhook_id": row.webhook_id,
        "url": hook.url,
        "event_id": row.event_id,
        "type": event.type,
        "cluster": event.cluster,
        "scope": event.scope,
        "status": row.status,
        "attempts": row.attempts,
        "last_status": row.last_status,
        "last_error": row.last_error,
        "next_attempt_at": row.next_attempt_at.isoformat() if row.status == "pending" else None,
        "created_at": row.created_at.isoformat(),
        "delivered_at": row.delivered_at.isoformat() if row.delivered_at else None,
    }


def deliveries(
    session: Session, *, failed_only: bool = False, limit: int = 100, webhook_id: int | None = None
) -> list[dict[str, Any]]:
    """Deliveries, newest first, as dicts; ``failed_only``: dead or last attempt failed."""
    stmt = (
        select(WebhookDelivery, Event, Webhook)
        .join(Event, Event.id == WebhookDelivery.event_id)
        .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
        .order_by(WebhookDelivery.id.desc())
        .limit(limit)
    )
    if failed_only:
        stmt = stmt.where(
            or_(
                WebhookDelivery.status == "dead",
                and_(WebhookDelivery.status == "pending", WebhookDelivery.last_error.is_not(None)),
            )
        )
    if webhook_id is not None:
        stmt = stmt.where(WebhookDelivery.webhook_id == webhook_id)
    return [_delivery_info(row, event, hook) for row, event, hook in session.execute(stmt)]
