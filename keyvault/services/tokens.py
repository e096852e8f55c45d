"""Access tokens for the HTTP API: create (shown once), list, revoke, authenticate.

Tokens are 256-bit random strings; only their SHA-256 is stored, so a database
reader learns nothing usable. Each row carries a MAC under the master keyring
(``services.integrity``) over its hash, scopes, rights, expiry and revocation, so a
database writer can neither insert a token nor widen, extend or un-revoke one: a row
whose MAC fails is refused like an unknown token, and logged. A token carries scopes: ``root:CLUSTER``,
``app:CLUSTER/APPID`` or ``app:CLUSTER/*`` (grammar and ``Grant`` in ``keyvault.scope``),
and optionally the right to rotate.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.errors import Conflict, InvalidInput, NotFound, Unauthorized
from keyvault.models import AccessToken, utcnow
from keyvault.scope import (
    DEFAULT_APPID_PATTERN,
    Grant,
    grant_of_scopes,
    parse_grant_scope,
    parse_grant_scopes,
)
from keyvault.services import integrity
from keyvault.services.clusters import get_cluster
from keyvault.services.secrets import bump_revision

TOKEN_PREFIX = "kvt_"
TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
log = logging.getLogger("keyvault.integrity")


def token_hash(token: str) -> str:
    """SHA-256 hex of a presented token (tokens are random: no slow hash needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def grant_of(row: AccessToken) -> Grant:
    """The Grant a token row carries."""
    return grant_of_scopes(row.name, json.loads(row.scopes), can_rotate=bool(row.can_rotate))


def create_token(
    session: Session,
    *,
    keyring: crypto.Keyring,
    name: str,
    scopes: list[str],
    can_rotate: bool = False,
    expires_in: timedelta | None = None,
    appid_pattern: str = DEFAULT_APPID_PATTERN,
) -> tuple[str, AccessToken]:
    """Create a token; return the token itself (shown once) and its row."""
    if not TOKEN_NAME.match(name):
        raise InvalidInput(
            f"invalid token name {name!r}", hint="use letters, digits, '.', '_' and '-'"
        )
    if not scopes:
        raise InvalidInput("a token needs at least one --scope", hint="e.g. --scope 'app:prod/*'")
    scopes = parse_grant_scopes(scopes, appid_pattern=appid_pattern)
    for text in scopes:
        get_cluster(session, name=parse_grant_scope(text, appid_pattern=appid_pattern).cluster)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    row = AccessToken(
        name=name,
        token_hash=token_hash(token),
        scopes=json.dumps(scopes),
        can_rotate=can_rotate,
        created_at=now,
        expires_at=now + expires_in if expires_in else None,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except SAIntegrityError:
        raise Conflict(
            f"a token named {name!r} already exists", hint="revoke it or choose another name"
        ) from None
    integrity.seal_row(session, row, keyring=keyring)
    bump_revision(session)
    return token, row


def list_tokens(session: Session) -> list[AccessToken]:
    """All tokens, by name (never their secret)."""
    return list(session.scalars(select(AccessToken).order_by(AccessToken.name)))


def revoke_token(session: Session, *, keyring: crypto.Keyring, name: str) -> AccessToken:
    """Revoke a token at once (every server sees it on its next request).

    A row failing its MAC is revoked and re-MACed too: revoking only takes rights away."""
    row = session.scalar(select(AccessToken).where(AccessToken.name == name))
    if row is None:
        raise NotFound(f"no token named {name!r}", hint="see `keyvault token list`")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        integrity.seal_row(session, row, keyring=keyring)
        bump_revision(session)
    session.flush()
    return row


def token_info(row: AccessToken, now: datetime | None = None) -> dict:
    """A JSON-ready description of a token (never the token)."""
    now = now or utcnow()
    status = (
        "revoked"
        if row.revoked_at
        else "expired"
        if row.expires_at and row.expires_at <= now
        else "active"
    )
    return {
        "name": row.name,
        "scopes": json.loads(row.scopes),
        "can_rotate": bool(row.can_rotate),
        "created_at": row.created_at.isoformat(),
        "expires_at": row.expires_at.isoformat() if row.expires_at else None,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
        "status": status,
    }


def check_token(
    row: AccessToken | None, presented_hash: str, now: datetime, *, keyring: crypto.Keyring
) -> Grant:
    """The grant of a looked-up token, or ``Unauthorized``; compares hashes in constant time.

    A row whose MAC fails (inserted, widened, extended or un-revoked by a database writer)
    is refused and logged as an integrity error naming the row; the caller audits the 401.
    """
    if row is None or not hmac.compare_digest(row.token_hash, presented_hash):
        raise Unauthorized(
            "unknown token",
            hint="send `Authorization: Bearer <token>` with a token from `keyvault token create`",
        )
    error = None
    why = integrity.failure(row, keyring=keyring)
    if why is not None:
        log.error("integrity check failed for %s: %s; refused", integrity.describe(row), why)
        error = Unauthorized(f"token {row.name!r} failed its integrity check")
    elif row.revoked_at is not None:
        error = Unauthorized(f"token {row.name!r} was revoked")
    elif row.expires_at is not None and row.expires_at <= now:
        error = Unauthorized(f"token {row.name!r} expired at {row.expires_at.isoformat()}")
    if error is not None:
        # The audit record names the refused token (an attribute errors.py does not declare).
        error.token_name = row.name
        raise error
    return grant_of(row)
