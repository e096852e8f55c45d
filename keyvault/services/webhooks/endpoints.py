"""Webhook endpoints: register, list, describe and remove the URLs that are notified.

A webhook holds an http(s) URL, its scopes (the grant grammar of ``keyvault.scope``:
``root:CLUSTER``, ``app:CLUSTER/APPID``, ``app:CLUSTER/*``) and its sealed signing
secret. Removing one keeps the row (its deliveries stay listable) and dead-letters
what it was still owed.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.errors import InvalidInput, NotFound
from keyvault.models import Webhook, WebhookDelivery, utcnow
from keyvault.scope import DEFAULT_APPID_PATTERN, Grant, grant_of_scopes, parse_grant_scopes
from keyvault.services import integrity
from keyvault.services.clusters import get_cluster
from keyvault.services.webhooks.destinations import check_destination
from keyvault.services.webhooks.signing import generate_secret, parse_secret, seal_secret

MAX_URL_LENGTH = 1024
REMOVED_REASON = "webhook removed"


def hook_grant(hook: Webhook) -> Grant:
    """What events a webhook receives."""
    return grant_of_scopes("webhook", json.loads(hook.scopes))


def validate_webhook_url(url: str) -> str:
    """An http(s) URL with a host and without credentials or fragment."""
    try:
        parts = urlsplit(url)
        valid = (parts.port is None or parts.port > 0) and (
            parts.scheme in ("http", "https")
            and bool(parts.hostname)
            and parts.username is None
            and parts.password is None
            and not parts.fragment
        )
    except ValueError:
        valid = False
    if (
        not valid
        or len(url) > MAX_URL_LENGTH
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
    allow_private_network: bool = False,
) -> tuple[Webhook, str]:
    """Register a webhook; return it and its signing secret (generated unless given).

    Unless ``allow_private_network``, a URL whose host resolves to a loopback, link-local,
    private or reserved address is refused (``destinations.check_destination``).
    """
    url = validate_webhook_url(url)
    check_destination(url, allow_private_network=allow_private_network)
    if not scopes:
        raise InvalidInput("a webhook needs at least one --scope", hint="e.g. --scope 'app:prod/*'")
    scopes = parse_grant_scopes(scopes, appid_pattern=appid_pattern)
    for cluster in sorted(grant_of_scopes("webhook", scopes).clusters):
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
    seal_secret(keyring, hook, raw)
    integrity.seal_row(session, hook, keyring=keyring)
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


def webhook_info(hook: Webhook, counts: dict[str, int] | None = None) -> dict[str, Any]:
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


def remove_webhook(session: Session, *, keyring: crypto.Keyring, webhook_id: int) -> Webhook:
    """Stop a webhook: no new deliveries; its pending ones are dead-lettered as "webhook removed"."""
    hook = get_webhook(session, webhook_id=webhook_id)
    if hook.removed_at is None:
        hook.removed_at = utcnow()
        integrity.seal_row(session, hook, keyring=keyring)
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == hook.id, WebhookDelivery.status == "pending")
        .values(status="dead", last_error=REMOVED_REASON)
        .execution_options(synchronize_session=False)
    )
    session.flush()
    return hook
