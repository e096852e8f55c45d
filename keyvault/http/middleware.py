"""Around every request: its id, its metrics and its access log line, and the last resort
for an exception nothing else answered (a bug: 500, never a 503).

The id is the client's ``X-Request-ID`` when it is sane (1-128 visible ASCII characters),
else a new one. It is set in :data:`keyvault.logs.request_id` while the request is served
(every log record carries it), echoed in the ``X-Request-ID`` response header and put in
error bodies, so a caller's report leads to the server's log lines.

The access line names the route *template* (``/v1/clusters/{cluster}/apps/{appid}``), never
the raw path, and never a header: no token and no key is logged.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
import uuid

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keyvault import logs
from keyvault.http.errors import error_response, send_error
from keyvault.http.metrics import Metrics

ACCESS_LOGGER = "keyvault.http.access"
access_log = logging.getLogger(ACCESS_LOGGER)
log = logging.getLogger("keyvault.http")
ROUTE_KEY = "keyvault.route"  # set in the ASGI scope by handlers that bypass routing
UNMATCHED = "unmatched"
_SANE_ID = re.compile(rb"[\x21-\x7e]{1,128}")
# The server (h11) refuses a head it is still reading past 16 KiB; one that arrived whole in
# a single read is measured here. Tokens, ids and paths are short.
MAX_TARGET_BYTES = 4 * 1024
MAX_HEADER_BYTES = 16 * 1024
_PREFIX = uuid.uuid4().hex[:12]  # another process (worker, replica): another prefix
_COUNTER = itertools.count(1)


def request_id_of(scope: Scope) -> str:
    """The client's X-Request-ID if it is sane, else a new id."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if _SANE_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return new_request_id()


def new_request_id() -> str:
    """A process-unique id: a random prefix per process and a counter (no syscall per request)."""
    return f"{_PREFIX}-{next(_COUNTER):x}"


def route_of(scope: Scope) -> str:
    """The route template that served the request (bounded label values for metrics)."""
    if ROUTE_KEY in scope:
        return str(scope[ROUTE_KEY])
    return str(getattr(scope.get("route"), "path", UNMATCHED))


class RequestContext:
    """ASGI middleware: request id, metrics, access log, and bugs answered as 500."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(scope)
        token = logs.request_id.set(rid)
        started = time.perf_counter()
        response = _ResponseWatch(send, rid)
        try:
            _check_head(scope)
            await self.app(scope, receive, response.send)
        except Exception as exc:
            if response.status is None:
                await send_error(response.send, error_response(exc))
            else:  # too late to answer: the response has begun
                log.error("bug: %s after the response began", type(exc).__name__, exc_info=exc)
        finally:
            if response.status is not None:  # None: cancelled (the client went away) unanswered
                self._finish(scope, response.status, time.perf_counter() - started)
            logs.request_id.reset(token)

    def _finish(self, scope: Scope, status: int, seconds: float) -> None:
        method, route = scope["method"], route_of(scope)
        self.metrics.observe(method, route, status, seconds)
        if access_log.isEnabledFor(logging.INFO):
            client = scope.get("client")
            access_log.info(
                "%s %s %d %.1fms",
                method,
                route,
                status,
                seconds * 1000,
                extra={
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "client": client[0] if client else "-",
                },
            )


def _check_head(scope: Scope) -> None:
    """``HTTPException`` 414/431 if the request target or the headers are over the limits."""
    target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    if target > MAX_TARGET_BYTES:
        raise HTTPException(414, f"the request target is over {MAX_TARGET_BYTES} bytes")
    if sum(len(name) + len(value) for name, value in scope["headers"]) > MAX_HEADER_BYTES:
        raise HTTPException(431, f"the request headers are over {MAX_HEADER_BYTES} bytes")


class _ResponseWatch:
    """Wraps ``send``: notes the status and adds the X-Request-ID header."""

    def __init__(self, send: Send, rid: str) -> None:
        self._send = send
        self._header = (b"x-request-id", rid.encode("ascii"))
        self.status: int | None = None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            message = {**message, "headers": [*message.get("headers", ()), self._header]}
        await self._send(message)
