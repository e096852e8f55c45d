"""Webhooks: registration, fan-out from the events outbox, signed delivery at least once.

The package, by responsibility:

- ``signing``    signing secrets (generated, parsed, sealed under the master key, re-wrapped)
                 and the Standard Webhooks signature headers;
- ``endpoints``  registering, listing and removing webhooks;
- ``destinations`` public receivers only (loopback, link-local, private refused unless
                 the operator allows private networks), at add time and at delivery;
- ``outbox``     fan-out: which events each webhook is owed (pending deliveries), the
                 body of an event, the deliveries listing;
- ``delivery``   claiming a due delivery, sending it, recording the outcome with retries,
                 backoff and dead-lettering; ``run_deliveries`` is `keyvault webhook deliver`.

The server's background deliverer is ``keyvault.services.webhook_worker``. Everything a
caller needs is importable from here (``from keyvault.services import webhooks``).
"""

from keyvault.services.webhooks.delivery import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT,
    LEASE,
    MAX_ERROR_LENGTH,
    Clock,
    DeliveryReport,
    Sender,
    SessionFactory,
    backoff_delay,
    default_sender,
    deliver_due,
    http_send,
    release_claims,
    run_deliveries,
    summary,
)
from keyvault.services.webhooks.destinations import check_destination, is_public
from keyvault.services.webhooks.endpoints import (
    MAX_URL_LENGTH,
    REMOVED_REASON,
    add_webhook,
    delivery_counts,
    get_webhook,
    hook_grant,
    list_webhooks,
    remove_webhook,
    validate_webhook_url,
    webhook_info,
)
from keyvault.services.webhooks.outbox import (
    EVENT_TYPE_PREFIXES,
    FANOUT_BATCH,
    FANOUT_LOOKBACK,
    PAYLOAD_FIELDS,
    deliveries,
    enqueue_deliveries,
    event_payload,
)
from keyvault.services.webhooks.signing import (
    MAX_SECRET_BYTES,
    MIN_SECRET_BYTES,
    SECRET_BYTES,
    SECRET_PREFIX,
    generate_secret,
    message_id,
    parse_secret,
    read_secret_file,
    rewrap_webhook_secrets,
    sign,
    signed_headers,
    webhook_aad,
    webhook_secret,
)

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_TIMEOUT",
    "EVENT_TYPE_PREFIXES",
    "FANOUT_BATCH",
    "FANOUT_LOOKBACK",
    "LEASE",
    "MAX_ERROR_LENGTH",
    "MAX_SECRET_BYTES",
    "MAX_URL_LENGTH",
    "MIN_SECRET_BYTES",
    "PAYLOAD_FIELDS",
    "REMOVED_REASON",
    "SECRET_BYTES",
    "SECRET_PREFIX",
    "Clock",
    "DeliveryReport",
    "Sender",
    "SessionFactory",
    "add_webhook",
    "backoff_delay",
    "check_destination",
    "default_sender",
    "deliver_due",
    "deliveries",
    "delivery_counts",
    "enqueue_deliveries",
    "event_payload",
    "generate_secret",
    "get_webhook",
    "hook_grant",
    "http_send",
    "is_public",
    "list_webhooks",
    "message_id",
    "parse_secret",
    "read_secret_file",
    "release_claims",
    "remove_webhook",
    "rewrap_webhook_secrets",
    "run_deliveries",
    "sign",
    "signed_headers",
    "summary",
    "validate_webhook_url",
    "webhook_aad",
    "webhook_info",
    "webhook_secret",
]
