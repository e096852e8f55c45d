"""The hot path, as plain ASGI: GET (and HEAD) the current key of a scope.

It runs before FastAPI's routing and validation because this one request is what
consumers make thousands of times a second; the same routes are declared in
routers/keys.py so that they appear in /openapi.json (``FAST_ROUTES`` lists them; a test
keeps both in line). Errors are answered by the one error surface (errors.error_response),
exactly as the routes answer them, in the same order: the APPID is validated first (400,
not audited, as on every route), then the token, the scope and the key (each audited).

``If-None-Match`` follows RFC 9110 (keyvault.http.headers): weak comparison, lists, ``*``;
a malformed value is ignored (the key is sent). ``HEAD`` answers the headers of the GET
(``ETag``, ``Content-Length``) without the body: it reveals the version, never the key, and
is audited as its own action ``head`` (not ``read``: no key left the server).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from keyvault.errors import KeyvaultError
from keyvault.http.access_audit import AccessAudit, client_of
from keyvault.http.consumer_tracker import ConsumerTracker
from keyvault.http.errors import error_response, send_error
from keyvault.http.headers import lists_tag, none_match
from keyvault.http.middleware import ROUTE_KEY
from keyvault.http.state import KeyEntry, ServerState, require_scope
from keyvault.scope import app_scope, root_scope

# Any APPID after apps/ (up to the next slash): a malformed one is answered 400 here, with
# the body every other route gives it (scope.app_scope), not passed on to routing.
KEY_PATH = re.compile(r"^/v1/clusters/([^/]{1,64})/(?:(root)|apps/([^/]+))$")
ROOT_ROUTE = "/v1/clusters/{cluster}/root"
APP_ROUTE = "/v1/clusters/{cluster}/apps/{appid}"
METHODS = ("GET", "HEAD")
FAST_ROUTES = frozenset((method, route) for method in METHODS for route in (ROOT_ROUTE, APP_ROUTE))
HEAD_ACTION = "head"  # the audit action of a HEAD: the version was shown, not the key
_JSON = (b"content-type", b"application/json")
_ALLOW = {"Allow": ", ".join(METHODS)}


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _header_lines(scope: Scope, name: bytes) -> list[str]:
    """Every line of a list header (RFC 9110 §5.3: sent twice, it is one list)."""
    return [value.decode("latin-1") for key, value in scope["headers"] if key == name]


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
        match = KEY_PATH.match(scope["path"]) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        scope[ROUTE_KEY] = ROOT_ROUTE if match.group(2) else APP_ROUTE
        if scope["method"] not in METHODS:  # routing would name only the first route's method
            await send_error(send, error_response(HTTPException(405, headers=_ALLOW)))
            return
        await self._serve(scope, send, match)

    async def _serve(self, scope: Scope, send: Send, match: re.Match[str]) -> None:
        state = self.state()
        head = scope["method"] == "HEAD"
        try:
            key_scope = (
                root_scope()
                if match.group(2)
                else app_scope(match.group(3), state.settings.appid_pattern)
            )
        except KeyvaultError as exc:  # as the routes: validated before authenticated, not audited
            await send_error(send, error_response(exc))
            return
        read = AccessAudit(
            state.audit,
            HEAD_ACTION if head else "read",
            match.group(1),
            str(key_scope),
            client_of(scope),
            deadline=state.deadline(),  # one budget for the lookups and the record together
        )
        try:
            # From memory when all of it is there (PostgreSQL, listening; ServerState.cached_read);
            # else the revision probe, the token and the key come from the database: in a
            # thread, within the budget (a locked table delays this request, not the event loop).
            entry = self._cached_entry(state, scope, read)
            if entry is None:
                entry = await state.blocking(
                    self._authorized_entry, state, scope, read, deadline=read.deadline
                )
            conditions = _header_lines(scope, b"if-none-match")
            holds = True  # a 200 hands over this version
            if none_match(conditions, entry.etag):
                await read.record("not_modified")
                await _send_not_modified(send, entry)
                holds = lists_tag(conditions, entry.etag)  # not for `*`: it names no version
            else:
                await read.record("ok")
                await _send_key(send, entry, head=head)
            # memory only: no I/O on the hot path; a HEAD shows the version, not the key
            if holds and not head and (tracker := self.consumers()) is not None:
                tracker.seen(
                    scope, read.token_name, read.client, read.cluster, read.scope, entry.version
                )
        except KeyvaultError as exc:
            await send_error(send, error_response(await read.refused(exc)))
        except Exception as exc:  # noqa: BLE001 - a bug: answered (500) and logged by error_response
            await send_error(send, error_response(exc))

    @staticmethod
    def _cached_entry(state: ServerState, scope: Scope, read: AccessAudit) -> KeyEntry | None:
        """On the event loop, no I/O: the key if the token and the key are in memory."""
        assert read.cluster is not None and read.scope is not None  # set from the path
        found = state.cached_read(_header(scope, b"authorization"), read.cluster, read.scope)
        if found is None:
            return None
        grant, entry = found
        read.token_name, read.version = grant.name, entry.version
        return entry

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


async def _send_key(send: Send, entry: KeyEntry, *, head: bool = False) -> None:
    """The key (for HEAD: the same headers, no body; the key is never handed to the server)."""
    headers = [
        _JSON,
        (b"content-length", str(len(entry.body)).encode()),
        (b"etag", entry.etag.encode()),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else entry.body})


async def _send_not_modified(send: Send, entry: KeyEntry) -> None:
    # RFC 9110 §15.4.5: a 304 carries the ETag and Cache-Control a 200 would have.
    headers = [(b"etag", entry.etag.encode()), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": 304, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
