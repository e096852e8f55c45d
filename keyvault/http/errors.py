"""Every error becomes an HTTP answer here and nowhere else: the routes, the key-read fast
path and the request middleware all call :func:`error_response`.

The status comes from the error tree (``KeyvaultError.http_status``): 4xx for the client's
mistakes, 502 when a host or TA behind keyvault failed, 503 only when keyvault itself cannot
serve (database, configuration, master key), and 500 for a bug: an exception keyvault did not
expect. A bug must never be a 503, which makes a load balancer eject a healthy node.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.types import Send

from keyvault import logs
from keyvault.errors import DatabaseDriverError, KeyvaultError

log = logging.getLogger("keyvault.http")
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    414: "uri_too_long",
    431: "headers_too_large",
}
_DETAIL_LIMIT = 500
_DATABASE_DETAIL = "the database is unavailable; retry later"


@dataclass(frozen=True)
class ErrorResponse:
    """An error as HTTP: status, JSON body ``{error, detail, request_id}`` and headers.

    An error about a rotation also names its ``rotation_id``.
    """

    status: int
    body: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)


def error_response(exc: BaseException) -> ErrorResponse:
    """The answer to ``exc``; an unexpected exception is logged (with its traceback) as a bug."""
    headers: dict[str, str] = {}
    if isinstance(exc, KeyvaultError):
        status, code, detail = _keyvault_status(exc), exc.code, _public_detail(exc)
    elif isinstance(exc, RequestValidationError):
        status, code, detail = 400, "invalid_input", _validation_detail(exc)
    elif isinstance(exc, HTTPException):  # routing: unknown path, method not allowed
        status, code, detail = (
            exc.status_code,
            _HTTP_CODES.get(exc.status_code, "error"),
            str(exc.detail),
        )
        headers.update(exc.headers or {})  # e.g. Allow on a 405
    else:
        log.error("bug: unexpected %s while serving a request", type(exc).__name__, exc_info=exc)
        status, code, detail = 500, "internal_error", f"internal error ({type(exc).__name__})"
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    body = {"error": code, "detail": detail}
    rotation_id = getattr(exc, "rotation_id", None)
    if isinstance(rotation_id, str):  # the client can ask what became of it (a retry could not)
        body["rotation_id"] = rotation_id
    rid = logs.request_id.get()
    if rid is not None:
        body["request_id"] = rid
    return ErrorResponse(status, body, headers)


def _public_detail(exc: KeyvaultError) -> str:
    # A driver's message names the database's host, port and name: for the log, not for
    # whoever sent the request.
    if isinstance(exc, DatabaseDriverError):
        log.warning("database error while serving a request: %s", exc)
        return _DATABASE_DETAIL
    return str(exc)


def _keyvault_status(exc: KeyvaultError) -> int:
    # An error class with a status outside 4xx/5xx would be a bug in the error tree itself.
    return exc.http_status if 400 <= exc.http_status <= 599 else 500


def _validation_detail(exc: RequestValidationError) -> str:
    detail = "; ".join(
        f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
    )
    return detail[:_DETAIL_LIMIT]


async def send_error(send: Send, error: ErrorResponse) -> None:
    """Send ``error`` as a complete JSON response on a plain ASGI ``send``."""
    body = json.dumps(error.body, separators=(",", ":")).encode()  # as JSONResponse
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in error.headers.items()
        ),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
