"""The event feed: what happened to the keys a token may read, with long polling.

A long-poll sleeps until ``state.changes`` fires: on PostgreSQL the listener's notification
of an event or a revision from any process (keyvault/http/revision_listener.py), then it
looks again at least every 5 s in case one was lost; while the listener is not connected,
and on SQLite (no NOTIFY; only a change this process saw wakes it), every 0.25 s.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy import func, select

from keyvault.db import transaction
from keyvault.errors import KeyvaultError
from keyvault.events import settled_feed
from keyvault.http.access_audit import AccessAudit, client_of
from keyvault.http.deps import State, audited_grant
from keyvault.http.schemas import EVENTS_ERRORS, EventOut, EventsOut
from keyvault.http.state import ServerState
from keyvault.models import Event
from keyvault.services.tokens import Grant

router = APIRouter(tags=["events"])
PAGE = 100  # events per answer
_SCAN = 500  # rows read per query (most may belong to other tokens' scopes)
_POLL_SECONDS = 0.25  # SQLite, or the listener not connected
_SLOW_POLL_SECONDS = 5.0  # the listener connected: only a lost notification needs it


# events.id is a 32-bit INTEGER on PostgreSQL: a larger ``after`` is invalid input, not a 503.
@router.get(
    "/v1/events", response_model=EventsOut, responses=EVENTS_ERRORS, operation_id="list_events"
)
async def events(
    request: Request,
    state: State,
    after: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    wait: Annotated[float, Query(ge=0, le=60)] = 0,
    tail: Annotated[bool, Query()] = False,
) -> EventsOut:
    """Events of the token's scopes after ``after``; with ``wait``, long-poll up to that many
    seconds. ``tail=true``: no events, only ``last_id``, the newest event's id (where a new
    follower starts, after reading its keys, instead of paging through the history)."""
    audit = AccessAudit(state.audit, "events", None, None, client_of(request.scope))
    # Authenticated here, after FastAPI validated the query (a bad query is a 400 first).
    grant = await audited_grant(request, state, audit)
    if tail:
        try:
            newest = await state.blocking(newest_event_id, state)
        except KeyvaultError as exc:
            raise await audit.refused(exc) from None
        await audit.record("ok")
        return EventsOut(events=[], last_id=newest)
    deadline = time.monotonic() + wait
    # A client that went away, or the server stopping, ends the wait at once: a long-poll
    # nobody reads would otherwise run to its deadline and hold up the server's shutdown.
    gone = asyncio.ensure_future(_disconnected(request)) if wait > 0 else None
    try:
        while True:
            # Armed before the query: an event recorded while it runs still wakes the wait.
            changed = state.changes.arm()
            try:
                try:
                    found, last = await state.blocking(events_after, state, grant, after)
                except KeyvaultError as exc:
                    raise await audit.refused(exc) from None
                if found or time.monotonic() >= deadline or _ended(state, gone):
                    await audit.record("ok")
                    return EventsOut(events=found, last_id=last)
                if last > after:  # rows of other scopes only: scan on at once, do not wait
                    after = last
                    continue
                listening = state.listener is not None and state.listener.connected
                poll = _SLOW_POLL_SECONDS if listening else _POLL_SECONDS
                timeout = min(poll, max(0.0, deadline - time.monotonic()))
                wake = {changed, *([gone] if gone else [])}
                await asyncio.wait(wake, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                state.changes.disarm(changed)
    finally:
        if gone is not None:
            gone.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (the request has no body left to read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _ended(state: ServerState, gone: asyncio.Future[None] | None) -> bool:
    """The client went away, or the server is stopping (``ServerState.stopping``)."""
    return state.stopping or (gone is not None and gone.done())


def events_after(state: ServerState, grant: Grant, after: int) -> tuple[list[EventOut], int]:
    """Up to ``PAGE`` events the grant may see after ``after``, and the id to continue from.

    Nothing is returned (and the cursor stays) while an event may still be in flight: an
    uncommitted lower id would otherwise be skipped for good (``events.settled_feed``)."""
    with transaction(state.factory) as session:
        if not settled_feed(session):
            return [], after
        rows = list(
            session.scalars(select(Event).where(Event.id > after).order_by(Event.id).limit(_SCAN))
        )
    last = rows[-1].id if rows else after
    found = [_event_out(e) for e in rows if grant.allows(e.cluster, e.scope)][:PAGE]
    if len(found) == PAGE:
        last = found[-1].id
    return found, last


def newest_event_id(state: ServerState) -> int:
    """The id of the newest event (0 for none)."""
    with transaction(state.factory) as session:
        return int(session.scalar(select(func.max(Event.id))) or 0)


def _event_out(e: Event) -> EventOut:
    return EventOut(
        id=e.id,
        type=e.type,
        cluster=e.cluster,
        scope=e.scope,
        payload=json.loads(e.payload),
        created_at=e.created_at.isoformat(),
    )
