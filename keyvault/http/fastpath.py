"""The hot path, as plain ASGI: GET the current key of a scope.

It runs before FastAPI's routing and validation because this one request is
what consumers make thousands of times a second; FastAPI still declares the
same routes (keyvault.http.app) so they appear in /openapi.json.
"""

from __future__ import annotations

import json
import logging
import re
import time

from keyvault.errors import KeyvaultError
from keyvault.http.errors import error_status
from keyvault.http.metrics import Metrics
from keyvault.http.state import ServerState, require_scope
from keyvault.models import utcnow
from keyvault.services.audit import AuditEntry

log = logging.getLogger("keyvault.http")
KEY_PATH = re.compile(r"^/v1/clusters/([^/]{1,64})/(?:(root)|apps/([^/]{1,64}))$")
_JSON = (b"content-type", b"application/json")


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def _send(send, status: int, body: bytes = b"", headers: list | None = None) -> None:
    hdrs = [_JSON, (b"content-length", str(len(body)).encode())] + (headers or [])
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


class FastKeyPath:
    """ASGI middleware answering ``GET /v1/clusters/{c}/root|apps/{a}`` itself."""

    def __init__(self, app, *, state_getter, metrics: Metrics) -> None:
        self.app = app
        self.state_getter = state_getter
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "GET":
            return await self.app(scope, receive, send)
        match = KEY_PATH.match(scope["path"])
        if match is None:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = await self._serve(scope, send, match)
        self.metrics.observe(
            "GET /v1/clusters/{cluster}/key", status, time.perf_counter() - started
        )

    async def _serve(self, scope, send, match) -> int:
        state: ServerState = self.state_getter()
        cluster = match.group(1)
        key_scope = "root" if match.group(2) else f"app:{match.group(3)}"
        client = scope["client"][0] if scope.get("client") else None
        token_name, version, outcome = "(none)", None, "error"
        try:
            state.ensure_fresh()
            grant = state.authenticate(_header(scope, b"authorization"))
            token_name = grant.name
            require_scope(grant, cluster, key_scope)
            entry = state.key_entry(cluster, key_scope)
            version = entry.version
            if _header(scope, b"if-none-match") == entry.etag:
                outcome, status, body = "not_modified", 304, b""
            else:
                outcome, status, body = "ok", 200, entry.body
            await state.audit.record(
                AuditEntry(
                    utcnow(), token_name, "read", cluster, key_scope, version, client, outcome
                )
            )
            if status == 304:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 304,
                        "headers": [(b"etag", entry.etag.encode())],
                    }
                )
                await send({"type": "http.response.body", "body": b""})
            else:
                await _send(
                    send,
                    200,
                    body,
                    [(b"etag", entry.etag.encode()), (b"cache-control", b"no-store")],
                )
            return status
        except KeyvaultError as exc:
            status = error_status(exc)
            token_name = getattr(
                exc, "token_name", token_name
            )  # a revoked or expired token is named
            if outcome != "not_modified" and status != 503:
                # Refused reads are audited too; an audit failure is the 503 itself.
                try:
                    await state.audit.record(
                        AuditEntry(
                            utcnow(),
                            token_name,
                            "read",
                            cluster,
                            key_scope,
                            version,
                            client,
                            exc.code,
                        )
                    )
                except KeyvaultError:
                    status, exc = 503, exc
            body = json.dumps(
                {"error": exc.code if status != 503 else "unavailable", "detail": str(exc)}
            ).encode()
            headers = [(b"www-authenticate", b"Bearer")] if status == 401 else []
            await _send(send, status, body, headers)
            return status
        except Exception:
            log.exception("unexpected error on the key read of %s in %s", key_scope, cluster)
            await _send(
                send, 503, json.dumps({"error": "unavailable", "detail": "internal error"}).encode()
            )
            return 503
