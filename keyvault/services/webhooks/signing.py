"""Webhook signing secrets and signatures (Standard Webhooks).

A secret is ``whsec_`` + base64 of 24 to 64 random bytes; keyvault stores it sealed under
the master key, bound to its webhook row (``webhook_aad``), like keys are. A request
carries ``webhook-id`` (``msg_<event id>``, stable across retries), ``webhook-timestamp``
(unix seconds at send time) and ``webhook-signature: v1,<base64 HMAC-SHA256 of
"id.timestamp.body">``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.errors import InvalidInput
from keyvault.models import Webhook

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
USER_AGENT = "keyvault-webhooks/1"
_GENERATE_HINT = "omit --secret-file to have keyvault generate one"


def generate_secret() -> str:
    """A new signing secret in Standard Webhooks form: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def parse_secret(text: str) -> bytes:
    """The key bytes of a ``whsec_<base64>`` secret (24 to 64 bytes), or ``InvalidInput``."""
    text = text.strip()
    if not text.startswith(SECRET_PREFIX):
        raise InvalidInput("the webhook secret is not in whsec_<base64> form", hint=_GENERATE_HINT)
    try:
        raw = base64.b64decode(text[len(SECRET_PREFIX) :], validate=True)
    except ValueError:
        raise InvalidInput("the webhook secret is not valid base64 after whsec_") from None
    if not MIN_SECRET_BYTES <= len(raw) <= MAX_SECRET_BYTES:
        raise InvalidInput(
            f"the webhook secret holds {len(raw)} bytes; it must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES}",
            hint=_GENERATE_HINT,
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


def seal_secret(keyring: crypto.Keyring, hook: Webhook, raw: bytes) -> None:
    """Store ``raw`` sealed in ``hook`` (which must have its id already)."""
    sealed = crypto.seal(keyring, raw, webhook_aad(hook.id, hook.url))
    hook.secret_ciphertext, hook.secret_wrapped_key = sealed.ciphertext, sealed.wrapped_key
    hook.master_key_id = sealed.master_key_id


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


def message_id(event_id: int) -> str:
    """The ``webhook-id`` of an event: the same for every attempt."""
    return f"msg_{event_id}"


def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256>`` of ``{id}.{timestamp}.{body}``."""
    mac = hmac.new(secret, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one signed request."""
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }
