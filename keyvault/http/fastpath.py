"""The hot path, as plain ASGI: GET the current key of a scope.

It runs before FastAPI's routing and validation because this one request is what
consumers make thousands of times a second; the same routes are declared in
routers/keys.py so that they appear in /openapi.json. Errors are answered by the one
error surface (errors.error_response), exactly as the routes answer them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from keyvault.errors import KeyvaultError
from keyvault.http.access_audit import AccessAudit, client_of
from keyvault.http.consumer_tracker import ConsumerTracker
from keyvault.http.errors import error_response, send_error
from keyvault.http.middleware import ROUTE_KEY
from keyvault.http.state import KeyEntry, ServerState, require_scope

KEY_PATH = re.compile(r"^/v1/clusters/([^/]{1,64})/(?:(root)|apps/([^/]{1,64}))$")
ROOT_ROUTE = "/v1/clusters/{cluster}/root"
APP_ROUTE = "/v1/clusters/{cluster}/apps/{appid}"
_JSON = (b"content-type", b"application/json")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class FastKeyPath:
    """ASGI middleware answering ``GET /v1/clusters/{c}/root|apps/{a}`` itself."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        state: Callable[[], ServerState],
        consumers: Callable[[], ConsumerTracker | None] = lambda: None,
    ) -> None:
        self.app = app
        self.state = state
        self.consumers = consumers  # who read which version (http/consumer_tracker.py)

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
        await self._serve(scope, send, match)

    async def _serve(self, scope: Scope, send: Send, match: re.Match[str]) -> None:
        state = self.state()
        read = AccessAudit(
            state.audit,
            "read",
            match.group(1),
            "root" if match.group(2) else f"app:{match.group(3)}",
            client_of(scope),
            deadline=state.deadline(),  # one budget for the lookups and the record together
        )
        try:
            # The revision probe, the token and the key come from the database: in a thread,
            # within the budget (a locked table delays this request, not the event loop).
            entry = await state.blocking(
                self._authorized_entry, state, scope, read, deadline=read.deadline
            )
            if _header(scope, b"if-none-match") == entry.etag:
                await read.record("not_modified")
                await _send_not_modified(send, entry)
            else:
                await read.record("ok")
                await _send_key(send, entry)
            if (tracker := self.consumers()) is not None:  # memory only: no I/O on the hot path
                tracker.seen(
                    scope, read.token_name, read.client, read.cluster, read.scope, entry.version
                )
        except KeyvaultError as exc:
            await send_error(send, error_response(await read.refused(exc)))
        except Exception as exc:  # noqa: BLE001 - a bug: answered (500) and logged by error_response
            await send_error(send, error_response(exc))

    @staticmethod
    def _authorized_entry(state: ServerState, scope: Scope, read: AccessAudit) -> KeyEntry:
        """In a database thread: the key, once the token is known and allowed to read it."""
        state.ensure_fresh()
        grant = state.authenticate(_header(scope, b"authorization"))
        read.token_name = grant.name
        assert read.cluster is not None and read.scope is not None  # set from the path
        require_scope(grant, read.cluster, read.scope)
        entry = state.key_entry(read.cluster, read.scope)
        read.version = entry.version
        return entry


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
