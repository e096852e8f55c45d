"""The hot path, as plain ASGI: GET the current key of a scope.

It runs before FastAPI's routing and validation because this one request is what
consumers make thousands of times a second; the same routes are declared in
routers/keys.py so that they appear in /openapi.json. Errors are answered by the one
error surface (errors.error_response), exactly as the routes answer them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from keyvault.errors import KeyvaultError
from keyvault.http.audit_writer import AuditEntry
from keyvault.http.errors import error_response, send_error
from keyvault.http.middleware import ROUTE_KEY
from keyvault.http.state import KeyEntry, ServerState, require_scope
from keyvault.models import utcnow

KEY_PATH = re.compile(r"^/v1/clusters/([^/]{1,64})/(?:(root)|apps/([^/]{1,64}))$")
ROOT_ROUTE = "/v1/clusters/{cluster}/root"
APP_ROUTE = "/v1/clusters/{cluster}/apps/{appid}"
_JSON = (b"content-type", b"application/json")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


@dataclass
class _Read:
    """One key read, as it will be audited."""

    cluster: str
    scope: str
    client: str | None
    token_name: str = "(none)"  # until a token is recognised
    version: int | None = None

    def audit(self, outcome: str) -> AuditEntry:
        return AuditEntry(
            utcnow(), self.token_name, "read", self.cluster, self.scope, self.version,
            self.client, outcome,
        )  # fmt: skip


class FastKeyPath:
    """ASGI middleware answering ``GET /v1/clusters/{c}/root|apps/{a}`` itself."""

    def __init__(self, app: ASGIApp, *, state: Callable[[], ServerState]) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = (
            KEY_PATH.match(scope["path"])
            if scope["type"] == "http" and scope["method"] == "GET"
            else None
        )
        if match is None:
            await self.app(scope, receive, send)
            return
        scope[ROUTE_KEY] = ROOT_ROUTE if match.group(2) else APP_ROUTE
        client = scope.get("client")
        read = _Read(
            cluster=match.group(1),
            scope="root" if match.group(2) else f"app:{match.group(3)}",
            client=client[0] if client else None,
        )
        await self._serve(scope, send, read)

    async def _serve(self, scope: Scope, send: Send, read: _Read) -> None:
        state = self.state()
        try:
            entry = self._authorized_entry(state, scope, read)
            if _header(scope, b"if-none-match") == entry.etag:
                await state.audit.record(read.audit("not_modified"))
                await _send_not_modified(send, entry)
            else:
                await state.audit.record(read.audit("ok"))
                await _send_key(send, entry)
        except KeyvaultError as exc:
            await send_error(send, error_response(await self._audit_refusal(state, read, exc)))
        except Exception as exc:  # noqa: BLE001 - a bug: answered (500) and logged by error_response
            await send_error(send, error_response(exc))

    @staticmethod
    def _authorized_entry(state: ServerState, scope: Scope, read: _Read) -> KeyEntry:
        state.ensure_fresh()
        grant = state.authenticate(_header(scope, b"authorization"))
        read.token_name = grant.name
        require_scope(grant, read.cluster, read.scope)
        entry = state.key_entry(read.cluster, read.scope)
        read.version = entry.version
        return entry

    @staticmethod
    async def _audit_refusal(state: ServerState, read: _Read, exc: KeyvaultError) -> KeyvaultError:
        """Audit a refused read; the error to answer with (the audit's own, if it fails)."""
        if exc.http_status == 503:  # the database is away (or the audit failed): nothing to write
            return exc
        # A revoked or expired token is named in the record.
        read.token_name = getattr(exc, "token_name", None) or read.token_name
        try:
            await state.audit.record(read.audit(exc.code))
        except KeyvaultError as audit_failed:
            return audit_failed
        return exc


async def _send_key(send: Send, entry: KeyEntry) -> None:
    headers = [
        _JSON,
        (b"content-length", str(len(entry.body)).encode()),
        (b"etag", entry.etag.encode()),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": entry.body})


async def _send_not_modified(send: Send, entry: KeyEntry) -> None:
    headers = [(b"etag", entry.etag.encode())]
    await send({"type": "http.response.start", "status": 304, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
