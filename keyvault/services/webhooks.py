"""Webhooks: registration, fan-out from the events outbox, signed delivery at least once.

Signing follows the Standard Webhooks specification: ``webhook-id`` (``msg_<event id>``,
stable across retries), ``webhook-timestamp`` (unix seconds at send time) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` keyed with the
``whsec_`` secret, which is stored sealed under the master key like keys are.

Fan-out (``enqueue_deliveries``) only flushes, like every service. Delivery
(``deliver_due``) commits on purpose, because a delivery spans the database and the
network: per delivery, one transaction claims the row (``FOR UPDATE SKIP LOCKED``
on PostgreSQL; it counts the attempt and leases the row by moving ``next_attempt_at``),
the request is sent outside any transaction, and a second transaction records the
outcome. A crash between the two leaves the row due again when the lease ends, so a
message may arrive twice (receivers deduplicate on ``webhook-id``), never zero times.
2xx is delivered; anything else or an exception is retried after an exponential
backoff with full jitter (1 s doubling, capped at 10 min), and dead-lettered after
``max_attempts`` (12).

A webhook is owed the events of its scopes (``rotation.*`` and ``secret.*``) created
from its own creation on; there is no cursor column. Progress is the newest event
already owed to it; events up to ``FANOUT_LOOKBACK`` older than that one are checked
again, so an event whose transaction committed after a later one (PostgreSQL
sequences) is still fanned out. Concurrent fan-outs are harmless: the unique
(webhook, event) pair makes a second insert a no-op.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import and_, exists, false, func, or_, select, update
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.config import DEFAULT_APPID_PATTERN
from keyvault.errors import InvalidInput, KeyvaultError, NotFound
from keyvault.models import Event, Webhook, WebhookDelivery, utcnow
from keyvault.services.clusters import get_cluster
from keyvault.services.tokens import Grant, parse_scopes

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
MAX_URL_LENGTH = 1024
EVENT_TYPE_PREFIXES = ("rotation.", "secret.")
DEFAULT_MAX_ATTEMPTS = 12
BACKOFF_BASE = 1.0
BACKOFF_CAP = 600.0
DEFAULT_TIMEOUT = 10.0
# A claimed row is due again after this long if its sender never records an outcome.
LEASE = timedelta(seconds=120)
# Out-of-order commits (PostgreSQL sequences) are caught this far behind the watermark.
FANOUT_LOOKBACK = timedelta(hours=1)
FANOUT_BATCH = 1000
REMOVED_REASON = "webhook removed"
MAX_ERROR_LENGTH = 500
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

Sender = Callable[[str, bytes, dict], int]
Clock = Callable[[], datetime]


# --- secrets ----------------------------------------------------------------------------


def generate_secret() -> str:
    """A new signing secret in Standard Webhooks form: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def parse_secret(text: str) -> bytes:
    """The key bytes of a ``whsec_<base64>`` secret (24 to 64 bytes), or ``InvalidInput``."""
    text = text.strip()
    if not text.startswith(SECRET_PREFIX):
        raise InvalidInput(
            "the webhook secret is not in whsec_<base64> form",
            hint="omit --secret-file to have keyvault generate one",
        )
    try:
        raw = base64.b64decode(text[len(SECRET_PREFIX) :], validate=True)
    except ValueError:
        raise InvalidInput("the webhook secret is not valid base64 after whsec_") from None
    if not MIN_SECRET_BYTES <= len(raw) <= MAX_SECRET_BYTES:
        raise InvalidInput(
            f"the webhook secret holds {len(raw)} bytes; it must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES}",
            hint="omit --secret-file to have keyvault generate one",
        )
    return raw


def read_secret_file(path: Path) -> str:
    """Read a secret file that is a regular file, owned by the running user, without group/other access."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise InvalidInput(f"cannot read the secret file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput(f"the secret file {path} is not a regular file")
    if st.st_uid != os.geteuid():
        raise InvalidInput(
            f"the secret file {path} is owned by uid {st.st_uid}, not by the running user",
            hint=f"run `chown {os.geteuid()} {path}` and `chmod 600 {path}`",
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise InvalidInput(
            f"the secret file {path} has mode {stat.S_IMODE(st.st_mode):04o}, must be 0600",
            hint=f"run `chmod 600 {path}`",
        )
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read the secret file {path}: {exc}") from None


def webhook_aad(webhook_id: int, url: str) -> bytes:
    """Associated data binding a sealed signing secret to its webhook row."""
    return f"keyvault/v1/webhook|{webhook_id}|{url}".encode()


def webhook_secret(keyring: crypto.Keyring, hook: Webhook) -> bytes:
    """Unseal a webhook's signing secret; ``IntegrityError`` names the webhook if the row was altered."""
    sealed = crypto.Sealed(hook.secret_ciphertext, hook.secret_wrapped_key, hook.master_key_id)
    return crypto.unseal(
        keyring, sealed, webhook_aad(hook.id, hook.url), what=f"webhook {hook.id} secret"
    )


def rewrap_webhook_secrets(session: Session, *, keyring: crypto.Keyring, to: str) -> int:
    """Re-wrap every webhook secret's data key under master key ``to`` (for master-key rotation)."""
    count = 0
    for hook in session.scalars(select(Webhook).with_for_update()):
        sealed = crypto.Sealed(hook.secret_ciphertext, hook.secret_wrapped_key, hook.master_key_id)
        moved = crypto.rewrap(
            keyring, sealed, webhook_aad(hook.id, hook.url), to=to, what=f"webhook {hook.id} secret"
        )
        hook.secret_wrapped_key, hook.master_key_id = moved.wrapped_key, moved.master_key_id
        count += 1
    session.flush()
    return count


# --- scopes -------------------------------------------------------------------------------


def grant_of_scopes(scopes: Iterable[str]) -> Grant:
    """The Grant of validated scope strings (``root:C``, ``app:C/APPID``, ``app:C/*``)."""
    roots, apps = set(), set()
    for text in scopes:
        kind, _, rest = text.partition(":")
        if kind == "root":
            roots.add(rest)
        else:
            cluster, _, appid = rest.partition("/")
            apps.add((cluster, appid))
    return Grant(name="webhook", roots=frozenset(roots), apps=frozenset(apps), can_rotate=False)


def hook_grant(hook: Webhook) -> Grant:
    """What events a webhook receives."""
    return grant_of_scopes(json.loads(hook.scopes))


def _event_filter(grant: Grant):
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


# --- registration ---------------------------------------------------------------------------


def validate_webhook_url(url: str) -> str:
    """An http(s) URL with a host and without credentials or fragment."""
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if (
        len(url) > MAX_URL_LENGTH
        or not port_ok
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.password is not None
        or parts.fragment
        or any(c.isspace() or not c.isprintable() for c in url)
    ):
        raise InvalidInput(
            f"invalid webhook URL {url[:120]!r}",
            hint="give an http(s) URL with a host, e.g. https://svc.internal/hooks/keyvault "
            "(no user:password@, no #fragment)",
        )
    return url


def add_webhook(
    session: Session,
    *,
    keyring: crypto.Keyring,
    url: str,
    scopes: list[str],
    secret: str | None = None,
    appid_pattern: str = DEFAULT_APPID_PATTERN,
) -> tuple[Webhook, str]:
    """Register a webhook; return it and its signing secret (generated unless given)."""
    url = validate_webhook_url(url)
    if not scopes:
        raise InvalidInput("a webhook needs at least one --scope", hint="e.g. --scope 'app:prod/*'")
    scopes = parse_scopes(list(scopes), appid_pattern=appid_pattern)
    grant = grant_of_scopes(scopes)
    for cluster in sorted(grant.roots | {c for c, _ in grant.apps}):
        get_cluster(session, name=cluster)
    secret = generate_secret() if secret is None else secret.strip()
    raw = parse_secret(secret)
    hook = Webhook(
        url=url,
        scopes=json.dumps(scopes),
        secret_ciphertext=b"",
        secret_wrapped_key=b"",
        master_key_id=keyring.active,
        created_at=utcnow(),
    )
    session.add(hook)
    session.flush()  # the id is part of the secret's associated data
    sealed = crypto.seal(keyring, raw, webhook_aad(hook.id, url))
    hook.secret_ciphertext, hook.secret_wrapped_key = sealed.ciphertext, sealed.wrapped_key
    hook.master_key_id = sealed.master_key_id
    session.flush()
    return hook, secret


def get_webhook(session: Session, *, webhook_id: int) -> Webhook:
    """A webhook by id, or ``NotFound``."""
    hook = session.get(Webhook, webhook_id)
    if hook is None:
        raise NotFound(f"no webhook with id {webhook_id}", hint="see `keyvault webhook list`")
    return hook


def list_webhooks(session: Session, *, include_removed: bool = False) -> list[Webhook]:
    """Webhooks by id (never their secret)."""
    stmt = select(Webhook).order_by(Webhook.id)
    if not include_removed:
        stmt = stmt.where(Webhook.removed_at.is_(None))
    return list(session.scalars(stmt))


def delivery_counts(session: Session) -> dict[int, dict[str, int]]:
    """Deliveries per webhook and status."""
    counts: dict[int, dict[str, int]] = {}
    stmt = select(WebhookDelivery.webhook_id, WebhookDelivery.status, func.count()).group_by(
        WebhookDelivery.webhook_id, WebhookDelivery.status
    )
    for hook_id, status, n in session.execute(stmt):
        counts.setdefault(hook_id, {})[status] = n
    return counts


def webhook_info(hook: Webhook, counts: dict[str, int] | None = None) -> dict:
    """A JSON-ready description of a webhook (never its secret)."""
    counts = counts or {}
    return {
        "id": hook.id,
        "url": hook.url,
        "scopes": json.loads(hook.scopes),
        "status": "removed" if hook.removed_at else "active",
        "created_at": hook.created_at.isoformat(),
        "removed_at": hook.removed_at.isoformat() if hook.removed_at else None,
        "master_key_id": hook.master_key_id,
        "pending": counts.get("pending", 0),
        "delivered": counts.get("delivered", 0),
        "dead": counts.get("dead", 0),
    }


def remove_webhook(session: Session, *, webhook_id: int) -> Webhook:
    """Stop a webhook: no new deliveries; its pending ones are dead-lettered as "webhook removed"."""
    hook = get_webhook(session, webhook_id=webhook_id)
    now = utcnow()
    if hook.removed_at is None:
        hook.removed_at = now
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == hook.id, WebhookDelivery.status == "pending")
        .values(status="dead", last_error=REMOVED_REASON)
        .execution_options(synchronize_session=False)
    )
    session.flush()
    return hook


# --- fan-out --------------------------------------------------------------------------------


def _deliverable_type():
    return or_(*(Event.type.startswith(p, autoescape=True) for p in EVENT_TYPE_PREFIXES))


def enqueue_deliveries(session: Session, *, now: datetime) -> int:
    """Create a pending delivery of each new event for each active webhook whose scopes cover it."""
    created = 0
    for hook in list_webhooks(session):
        grant = hook_grant(hook)
        mark = session.execute(
            select(Event.id, Event.created_at).where(
                Event.id
                == select(func.max(WebhookDelivery.event_id))
                .where(WebhookDelivery.webhook_id == hook.id)
                .scalar_subquery()
            )
        ).first()
        window = Event.created_at >= hook.created_at
        if mark is not None:
            window = and_(
                window,
                or_(Event.id > mark.id, Event.created_at >= mark.created_at - FANOUT_LOOKBACK),
            )
        owed = exists().where(
            WebhookDelivery.webhook_id == hook.id, WebhookDelivery.event_id == Event.id
        )
        events = session.execute(
            select(Event.id, Event.cluster, Event.scope)
            .where(window, _deliverable_type(), _event_filter(grant), ~owed)
            .order_by(Event.id)
            .limit(FANOUT_BATCH)
        ).all()
        rows = [
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
        if rows:
            created += _insert_ignoring_duplicates(session, rows)
    session.flush()
    return created


def _insert_ignoring_duplicates(session: Session, rows: list[dict]) -> int:
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    stmt = (
        insert(WebhookDelivery)
        .values(rows)
        .on_conflict_do_nothing(index_elements=["webhook_id", "event_id"])
        .returning(WebhookDelivery.id)
    )
    return len(session.execute(stmt).all())


# --- payload and signing --------------------------------------------------------------------


def event_payload(event: Event) -> dict:
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


def message_id(event_id: int) -> str:
    """The ``webhook-id`` of an event: the same for every attempt."""
    return f"msg_{event_id}"


def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256>`` of ``{id}.{timestamp}.{body}``."""
    mac = hmac.new(secret, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> dict:
    """The headers of one signed request."""
    return {
        "content-type": "application/json",
        "user-agent": "keyvault-webhooks/1",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


# --- delivery -------------------------------------------------------------------------------


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


def http_send(url: str, body: bytes, headers: dict, *, timeout: float = DEFAULT_TIMEOUT) -> int:
    """POST ``body`` and return the status; redirects are not followed (they count as failures)."""
    import urllib.error
    import urllib.request

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with opener.open(request, timeout=timeout) as response:
            response.read(65536)
            return response.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


def default_sender(timeout: float = DEFAULT_TIMEOUT) -> Sender:
    """``http_send`` with a timeout."""
    return lambda url, body, headers: http_send(url, body, headers, timeout=timeout)


@dataclass
class DeliveryReport:
    """What one ``deliver_due`` run did."""

    attempted: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0
    ids: list[int] = field(default_factory=list)

    def add(self, other: DeliveryReport) -> None:
        self.attempted += other.attempted
        self.delivered += other.delivered
        self.retrying += other.retrying
        self.dead += other.dead
        self.ids.extend(other.ids)

    def as_dict(self) -> dict:
        return {
            "attempted": self.attempted,
            "delivered": self.delivered,
            "retrying": self.retrying,
            "dead": self.dead,
        }


@dataclass(frozen=True)
class _Claim:
    delivery_id: int
    attempts: int
    url: str
    msg_id: str
    body: bytes
    secret: bytes = field(repr=False)


_UNSIGNABLE = object()


def _clock(now: datetime | Clock) -> Clock:
    return now if callable(now) else (lambda: now)


def _claim(
    session: Session,
    *,
    keyring: crypto.Keyring,
    now: datetime,
    skip: set[int],
    secrets_cache: dict[int, bytes | str],
) -> _Claim | object | None:
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
    row = session.scalar(stmt)
    if row is None:
        return None
    hook = session.get(Webhook, row.webhook_id)
    event = session.get(Event, row.event_id)
    if hook.id not in secrets_cache:
        try:
            secrets_cache[hook.id] = webhook_secret(keyring, hook)
        except KeyvaultError as exc:
            log.error("webhook %s cannot sign: %s", hook.id, exc)
            secrets_cache[hook.id] = f"cannot sign: {exc}"
    if isinstance(secrets_cache[hook.id], str):
        # Not the receiver's fault: no attempt is counted; the row waits for a usable keyring.
        row.last_error = secrets_cache[hook.id][:MAX_ERROR_LENGTH]
        row.next_attempt_at = now + LEASE
        session.flush()
        skip.add(row.id)
        return _UNSIGNABLE
    row.attempts += 1
    row.next_attempt_at = now + LEASE
    session.flush()
    body = json.dumps(event_payload(event), sort_keys=True, separators=(",", ":")).encode()
    return _Claim(
        delivery_id=row.id,
        attempts=row.attempts,
        url=hook.url,
        msg_id=message_id(event.id),
        body=body,
        secret=secrets_cache[hook.id],
    )


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
    row = session.scalar(
        select(WebhookDelivery).where(WebhookDelivery.id == claim.delivery_id).with_for_update()
    )
    if error is None:
        if row.status != "delivered":
            row.status, row.delivered_at, row.last_status = "delivered", now, status
        return "delivered"
    if row.status != "pending" or row.attempts != claim.attempts:
        return row.status  # removed meanwhile, or the lease ran out and another sender took over
    row.last_status, row.last_error = status, error[:MAX_ERROR_LENGTH]
    if row.attempts >= max_attempts:
        row.status = "dead"
        return "dead"
    row.next_attempt_at = now + backoff_delay(row.attempts, rand=rand)
    return "retrying"


def deliver_due(
    session_factory,
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
) -> DeliveryReport:
    """Send up to ``limit`` due deliveries, each claimed and recorded in its own transaction."""
    # ``now`` (a datetime or a clock) decides what is due and when a retry is; ``timestamp``
    # is the wall clock signed into webhook-timestamp (receivers compare it with theirs).
    # Ids in ``skip`` are not attempted and every attempted id joins it, so a caller
    # looping over runs tries each delivery at most once.
    from keyvault.db import transaction

    if max_attempts < 1:
        raise InvalidInput("max attempts must be at least 1")
    clock = _clock(now)
    send = send or default_sender()
    skip = set() if skip is None else skip
    cache: dict[int, bytes | str] = {}
    report = DeliveryReport()
    while report.attempted < limit and not (should_stop and should_stop()):
        with transaction(session_factory) as session:
            claim = _claim(session, keyring=keyring, now=clock(), skip=skip, secrets_cache=cache)
        if claim is None:
            break
        if claim is _UNSIGNABLE:
            continue
        skip.add(claim.delivery_id)
        report.attempted += 1
        report.ids.append(claim.delivery_id)
        ts = int(timestamp())
        status, error = None, None
        try:
            status = int(
                send(
                    claim.url,
                    claim.body,
                    signed_headers(claim.secret, claim.msg_id, ts, claim.body),
                )
            )
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except Exception as exc:  # noqa: BLE001 - any failure of the receiver is retried
            error = f"{type(exc).__name__}: {exc}".replace("\n", " ")
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
                "webhook delivery %s failed (attempt %s): %s",
                claim.delivery_id,
                claim.attempts,
                error,
            )
    return report


def deliveries(
    session: Session, *, failed_only: bool = False, limit: int = 100, webhook_id: int | None = None
) -> list[dict]:
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
    out = []
    for row, event, hook in session.execute(stmt):
        out.append(
            {
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
                "next_attempt_at": row.next_attempt_at.isoformat()
                if row.status == "pending"
                else None,
                "created_at": row.created_at.isoformat(),
                "delivered_at": row.delivered_at.isoformat() if row.delivered_at else None,
            }
        )
    return out
