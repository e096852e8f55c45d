"""One audited HTTP access: who (the token, once known), what (action and target), from
where (the peer address, or the proxy's X-Forwarded-For only when ``serve
--forwarded-allow-ips`` trusts it) and how it ended (``ok``, ``started`` or an error code).

Every request that reads or changes keys, or reads their history or events, writes one
record through the server's ``AuditWriter``; a rotation writes two: its intent
(``started``) before it acts and its outcome after.

This is the HTTP server's own small helper (the records go through the group-committing
writer); the CLI's audit records are ``keyvault.services.audit``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from keyvault.errors import KeyvaultError
from keyvault.http.audit_writer import AuditEntry, AuditUnavailable, AuditWriter
from keyvault.models import utcnow

log = logging.getLogger("keyvault.audit")
NO_TOKEN = "(none)"  # the token name of a request without a recognised token


@dataclass
class AccessAudit:
    """The audit record of one request, filled in as the request is served."""

    writer: AuditWriter
    action: str  # read, head, rotate, versions, events
    cluster: str | None
    scope: str | None
    client: str | None
    token_name: str = NO_TOKEN
    version: int | None = None
    # Event-loop time by which the request's database work, its record included, must be
    # done (``ServerState.deadline()``); None: each record gets the writer's whole budget.
    deadline: float | None = None

    def entry(self, outcome: str) -> AuditEntry:
        return AuditEntry(
            utcnow(), self.token_name, self.action, self.cluster, self.scope, self.version,
            self.client, outcome,
        )  # fmt: skip

    async def record(self, outcome: str) -> None:
        """Write the record and wait until it is committed; ``AuditUnavailable`` if not."""
        timeout = None
        if self.deadline is not None:  # what is left of the request's budget
            timeout = max(0.001, self.deadline - asyncio.get_running_loop().time())
        await self.writer.record(self.entry(outcome), timeout)

    async def refused(self, exc: KeyvaultError) -> KeyvaultError:
        """Audit a refused or failed request; the error to answer with.

        A refusal (4xx) whose record cannot be written is answered with the audit's 503, as a
        success would be. A server-side failure (5xx: the database away, a broken store) is
        queued without waiting: the database is probably what failed, and the answer must not
        wait a second budget for it.
        """
        # A revoked or expired token is named in the record.
        self.token_name = getattr(exc, "token_name", None) or self.token_name
        if isinstance(exc, AuditUnavailable):
            # Its record was not written (the writer drops a record whose request gave up
            # before its batch began): record the 503 the client gets instead, unwaited.
            self.writer.submit(self.entry(exc.code))
            return exc
        if exc.http_status >= 500:
            self.writer.submit(self.entry(exc.code))
            return exc
        try:
            await self.record(exc.code)
        except KeyvaultError as audit_failed:
            return audit_failed
        return exc

    async def outcome(self, outcome: str) -> bool:
        """Record the outcome of an act that already happened; never raises.

        The act cannot be undone, so its answer must reach the client whatever the audit
        does (a client told 503 after a rotation would retry and kill the key it never got).
        The intent record was committed before the act; a missing outcome is logged.
        """
        self.deadline = None  # the act took its time: the record gets a whole budget
        try:
            await self.record(outcome)
            return True
        except KeyvaultError as exc:
            log.error(
                "audit: the outcome %r of %s by token %r on %s %s was not recorded: %s",
                outcome, self.action, self.token_name, self.cluster, self.scope, exc,
            )  # fmt: skip
            return False


def client_of(scope: MutableMapping[str, Any]) -> str | None:
    """The client address of an ASGI scope (uvicorn sets it from X-Forwarded-For only for
    a proxy named by ``--forwarded-allow-ips``)."""
    client = scope.get("client")
    if isinstance(client, tuple | list) and client:
        return str(client[0])
    return None
