"""Delivering webhooks: claim a due delivery, send it signed, record the outcome.

Delivery commits on purpose, because it spans the database and the network (the
documented exception to "services only flush"): per delivery, one transaction claims
the row (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; it counts the attempt and leases the
row by moving ``next_attempt_at``), the request is sent outside any transaction, and a
second transaction records the outcome. A crash between the two leaves the row due again
when the lease ends, so a message may arrive twice (receivers deduplicate on
``webhook-id``), never zero times. 2xx is delivered; anything else or an exception is
retried after an exponential backoff with full jitter (1 s doubling, capped at 10 min),
and dead-lettered after ``max_attempts`` (12).

``run_deliveries`` is the whole job of `keyvault webhook deliver` (fan out, deliver,
repeat until nothing is due or the time is up); the server's worker runs one round a tick.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from keyvault import crypto, httpclient
from keyvault.db import transaction
from keyvault.errors import InvalidInput, KeyvaultError
from keyvault.models import Event, Webhook, WebhookDelivery, utcnow
from keyvault.services import integrity
from keyvault.services.webhooks.destinations import is_public
from keyvault.services.webhooks.outbox import enqueue_deliveries, event_payload
from keyvault.services.webhooks.signing import message_id, signed_headers, webhook_secret

log = logging.getLogger("keyvault.services.webhooks")

DEFAULT_MAX_ATTEMPTS = 12
BACKOFF_BASE = 1.0
BACKOFF_CAP = 600.0
DEFAULT_TIMEOUT = 10.0
# A claimed row is due again after this long if its sender never records an outcome.
LEASE = timedelta(seconds=120)
MAX_ERROR_LENGTH = 500
# A receiver's answer is read (so the connection ends cleanly) but not kept beyond this.
MAX_ANSWER_BYTES = 65536

Sender = Callable[[str, bytes, Mapping[str, str]], int]
Clock = Callable[[], datetime]
SessionFactory = sessionmaker[Session]


def backoff_delay(
    attempts: int,
    *,
    rand: Callable[[], float] = random.random,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_CAP,
) -> timedelta:
    """Full jitter: uniform in [0, min(cap, base * 2^(attempts-1))) seconds."""
    ceiling = min(cap, base * (2 ** min(max(attempts - 1, 0), 32)))
    return timedelta(seconds=rand() * ceiling)


def http_send(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    allow_private_network: bool = False,
) -> int:
    """POST ``body`` and return the status; a redirect is not followed (it counts as a failure).

    Unless ``allow_private_network``, a receiver found at a non-public address is refused
    (``HttpError``) before anything is sent: see ``destinations``.
    """
    answer = httpclient.request(
        "POST",
        url,
        body=body,
        headers=headers,
        timeout=timeout,
        max_bytes=MAX_ANSWER_BYTES,
        truncate=True,
        what="the webhook receiver",
        peer_allowed=None if allow_private_network else is_public,
    )
    return answer.status


# The choice is the delivering process's (`webhook deliver` / `serve --allow-private-network`),
# not stored with the webhook: a URL allowed when added is checked again at every delivery.
def default_sender(
    timeout: float = DEFAULT_TIMEOUT, *, allow_private_network: bool = False
) -> Sender:
    """``http_send`` with a timeout, refusing non-public receivers unless allowed."""
    return lambda url, body, headers: http_send(
        url, body, headers, timeout=timeout, allow_private_network=allow_private_network
    )


@dataclass
class DeliveryReport:
    """What one or more delivery runs did."""

    attempted: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0
    ids: list[int] = field(default_factory=list)
    enqueued: int = 0  # deliveries created by fan-out (``run_deliveries`` only)

    def add(self, other: DeliveryReport) -> None:
        self.attempted += other.attempted
        self.delivered += other.delivered
        self.retrying += other.retrying
        self.dead += other.dead
        self.enqueued += other.enqueued
        self.ids.extend(other.ids)

    def as_dict(self) -> dict[str, int]:
        return {
            "attempted": self.attempted,
            "delivered": self.delivered,
            "retrying": self.retrying,
            "dead": self.dead,
        }


@dataclass(frozen=True)
class _Claim:
    """A delivery leased for one attempt; ``secret`` None: it cannot be signed (not attempted)."""

    delivery_id: int
    attempts: int
    url: str
    msg_id: str
    body: bytes = field(repr=False)
    secret: bytes | None = field(repr=False)


class _Secrets:
    """Unsealed signing secrets per webhook for one run; a failure is kept as its message."""

    def __init__(self, keyring: crypto.Keyring) -> None:
        self.keyring = keyring
        self._known: dict[int, bytes | str] = {}

    def get(self, hook: Webhook) -> bytes | str:
        if hook.id not in self._known:
            try:
                # The URL and scopes must be the operator's: nothing is sent to a moved webhook.
                integrity.check_row(hook, keyring=self.keyring)
                self._known[hook.id] = webhook_secret(self.keyring, hook)
            except KeyvaultError as exc:
                log.error("webhook %s cannot sign: %s", hook.id, exc)
                self._known[hook.id] = f"cannot sign: {exc}"
        return self._known[hook.id]


def _due_row(session: Session, now: datetime, skip: set[int]) -> WebhookDelivery | None:
    stmt = (
        select(WebhookDelivery)
        .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
        .where(
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= now,
            Webhook.removed_at.is_(None),
        )
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(1)
        .with_for_update(skip_locked=True, of=WebhookDelivery)
    )
    if skip:
        stmt = stmt.where(WebhookDelivery.id.not_in(skip))
    return session.scalar(stmt)


def _claim(
    session: Session, *, now: datetime, skip: set[int], secrets: _Secrets, by: str | None = None
) -> _Claim | None:
    """Lease the next due delivery (None: nothing is due); ``by``: the claiming lease holder."""
    row = _due_row(session, now, skip)
    if row is None:
        return None
    hook = session.get_one(Webhook, row.webhook_id)
    event = session.get_one(Event, row.event_id)
    secret = secrets.get(hook)
    row.next_attempt_at, row.claimed_by = now + LEASE, by
    skip.add(row.id)
    if isinstance(secret, str):
        # Not the receiver's fault: no attempt is counted; the row waits for a usable keyring.
        row.last_error = secret[:MAX_ERROR_LENGTH]
        session.flush()
        return _Claim(row.id, row.attempts, hook.url, message_id(event.id), b"", None)
    row.attempts += 1
    session.flush()
    body = json.dumps(event_payload(event), sort_keys=True, separators=(",", ":")).encode()
    return _Claim(row.id, row.attempts, hook.url, message_id(event.id), body, secret)


def release_claims(session: Session, *, holder: str, now: datetime) -> int:
    """After a takeover of the webhook lease: deliveries another holder claimed and never
    recorded (it died mid-attempt) are due now, not when their claim runs out."""
    found = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.status == "pending",
            WebhookDelivery.claimed_by.is_not(None),
            WebhookDelivery.claimed_by != holder,
        )
        .values(next_attempt_at=now, claimed_by=None)
    )
    return int(getattr(found, "rowcount", 0) or 0)


def _record(
    session: Session,
    claim: _Claim,
    *,
    now: datetime,
    status: int | None,
    error: str | None,
    max_attempts: int,
    rand: Callable[[], float],
) -> str:
    """Write an attempt's outcome; return "delivered", "retrying", "dead" or the row's status."""
    row = session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.id == claim.delivery_id).with_for_update()
    ).one()
    if error is None:
        if row.status != "delivered":
            row.status, row.delivered_at, row.last_status = "delivered", now, status
            row.claimed_by = None
        return "delivered"
    if row.status != "pending" or row.attempts != claim.attempts:
        return row.status  # removed meanwhile, or the lease ran out and another sender took over
    row.last_status, row.last_error, row.claimed_by = status, error[:MAX_ERROR_LENGTH], None
    if row.attempts >= max_attempts:
        row.status = "dead"
        return "dead"
    row.next_attempt_at = now + backoff_delay(row.attempts, rand=rand)
    return "retrying"


def _attempt(send: Sender, claim: _Claim, secret: bytes, ts: int) -> tuple[int | None, str | None]:
    """Send one signed request: (HTTP status or None, error text or None if delivered)."""
    try:
        status = int(
            send(claim.url, claim.body, signed_headers(secret, claim.msg_id, ts, claim.body))
        )
    except Exception as exc:  # noqa: BLE001 - any failure of the receiver is retried
        return None, f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return status, None if 200 <= status < 300 else f"HTTP {status}"


def _count(report: DeliveryReport, claim: _Claim, outcome: str, error: str | None) -> None:
    if outcome == "delivered":
        report.delivered += 1
    elif outcome == "dead":
        report.dead += 1
        log.warning(
            "webhook delivery %s dead-lettered after %s attempts: %s",
            claim.delivery_id,
            claim.attempts,
            error,
        )
    else:
        report.retrying += 1
        log.info(
            "webhook delivery %s failed (attempt %s): %s", claim.delivery_id, claim.attempts, error
        )


def deliver_due(
    session_factory: SessionFactory,
    *,
    keyring: crypto.Keyring,
    now: datetime | Clock,
    send: Sender | None = None,
    limit: int = 100,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    rand: Callable[[], float] = random.random,
    timestamp: Callable[[], float] = time.time,
    should_stop: Callable[[], bool] | None = None,
    skip: set[int] | None = None,
    fence: Callable[[Session], bool] | None = None,
    claimed_by: str | None = None,
) -> DeliveryReport:
    """Send up to ``limit`` due deliveries, each claimed and recorded in its own transaction.

    ``now`` (a datetime or a clock) decides what is due and when a retry is; ``timestamp``
    is the wall clock signed into webhook-timestamp (receivers compare it with theirs).
    Ids in ``skip`` are not attempted and every claimed id joins it, so a caller looping
    over runs tries each delivery at most once. ``fence`` (the webhook lease) is asked in
    each claim's transaction: False claims nothing more. ``claimed_by`` marks the claims.
    """
    if max_attempts < 1:
        raise InvalidInput("max attempts must be at least 1")
    clock: Clock = now if callable(now) else (lambda: now)
    send = send or default_sender()
    skip = set() if skip is None else skip
    secrets = _Secrets(keyring)
    report = DeliveryReport()
    while report.attempted < limit and not (should_stop and should_stop()):
        with transaction(session_factory) as session:
            if fence is not None and not fence(session):
                break
            claim = _claim(session, now=clock(), skip=skip, secrets=secrets, by=claimed_by)
        if claim is None:
            break
        if claim.secret is None:
            continue
        report.attempted += 1
        report.ids.append(claim.delivery_id)
        status, error = _attempt(send, claim, claim.secret, int(timestamp()))
        with transaction(session_factory) as session:
            outcome = _record(
                session,
                claim,
                now=clock(),
                status=status,
                error=error,
                max_attempts=max_attempts,
                rand=rand,
            )
        _count(report, claim, outcome, error)
    return report


def run_deliveries(
    session_factory: SessionFactory,
    *,
    keyring: crypto.Keyring,
    once: bool = True,
    max_seconds: float = 55.0,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    send: Sender | None = None,
    clock: Clock = utcnow,
    monotonic: Callable[[], float] = time.monotonic,
) -> DeliveryReport:
    """Fan out new events and deliver what is due: one round, or (``once=False``) rounds until
    nothing is due or ``max_seconds`` passed (no delivery starts after that). Each delivery is
    tried at most once per call. ``report.enqueued`` counts the deliveries fan-out created.
    """
    end = monotonic() + max_seconds

    def should_stop() -> bool:
        return monotonic() >= end

    total = DeliveryReport()
    tried: set[int] = set()
    while True:
        with transaction(session_factory) as session:
            total.enqueued += enqueue_deliveries(session, now=clock())
        report = deliver_due(
            session_factory,
            keyring=keyring,
            now=clock,
            send=send,
            max_attempts=max_attempts,
            should_stop=should_stop,
            skip=tried,
        )
        total.add(report)
        if once or report.attempted == 0 or should_stop():
            return total


def summary(report: DeliveryReport) -> dict[str, Any]:
    """The JSON shape of `keyvault webhook deliver`."""
    return {"enqueued": report.enqueued, **report.as_dict()}
