"""Outgoing HTTP: the one helper behind every request keyvault makes.

Used by the consumer client of keyvault's own API (``keyvault_client``, re-exported as
``keyvault.client``), and, through ``keyvault.httpclient`` (which re-exports this module), by
the TA Open API client (``keyvault.ta``) and webhook delivery (``keyvault.services.webhooks``).
It lives in the client distribution so consumers get it without the server stack. Every
request here:

- goes straight to the URL's host: no proxy from the environment, because TA keys travel
  in query strings and webhook bodies must not be seen by a proxy nobody configured;
- never follows a redirect: a 3xx is an answer like any other and the caller decides
  (following one could carry a key or a bearer token to another host);
- has a timeout on connecting and on every read, and reads at most ``max_bytes`` of the
  body (a misdirected URL that streams forever fails instead of filling memory);
- fails with one error class, ``HttpError``, whose message names the target by the
  ``shown`` text the caller chose (a redacted URL), never by the raw URL, and passes
  any text from the network through the caller's ``scrub``.

Standard library only (``http.client``), so importing it costs little; one connection per
request, closed before returning, so nothing leaks between threads or requests.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urlsplit

from keyvault_client.errors import KeyvaultError

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
_CHUNK = 65536


class HttpError(KeyvaultError):
    """The request could not be completed: no connection, no answer in time, a broken or
    oversized answer. ``timed_out`` tells a timeout apart."""

    code = "http_error"

    def __init__(self, message: str, *, timed_out: bool = False, hint: str | None = None) -> None:
        self.timed_out = timed_out
        super().__init__(message, hint=hint)


@dataclass(frozen=True)
class Response:
    """A complete answer: status, reason, headers (case-insensitive lookup) and body."""

    status: int
    reason: str
    headers: http.client.HTTPMessage = field(repr=False)
    body: bytes = field(repr=False)

    def header(self, name: str, default: str = "") -> str:
        """The value of header ``name`` (case-insensitive), or ``default``."""
        value = self.headers.get(name)
        return default if value is None else str(value)

    def json(self) -> Any:
        """The body parsed as JSON; ``ValueError`` if it is not JSON."""
        return json.loads(self.body)


def _identity(text: str) -> str:
    return text


def ssl_context(verify: bool | str | ssl.SSLContext = True) -> ssl.SSLContext:
    """An SSL context: verified (default), unverified (``False``), a CA file path, or as given."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)


def _connection(
    url: str, timeout: float, context: ssl.SSLContext | None
) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("an http(s) URL with a host is required")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host, port = parts.hostname, parts.port
    if parts.scheme == "https":
        return http.client.HTTPSConnection(
            host, port, timeout=timeout, context=context or ssl_context()
        ), target
    return http.client.HTTPConnection(host, port, timeout=timeout), target


def _read_body(
    response: http.client.HTTPResponse,
    max_bytes: int,
    truncate: bool,
    fail: Callable[[str], NoReturn],
) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size <= max_bytes:
        chunk = response.read(min(_CHUNK, max_bytes + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    body = b"".join(chunks)
    if size > max_bytes:
        if not truncate:
            fail(f"answered more than {max_bytes} bytes")
        body = body[:max_bytes]
    return body


def request(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    truncate: bool = False,
    what: str = "the server",
    shown: str | None = None,
    scrub: Callable[[str], str] = _identity,
    context: ssl.SSLContext | None = None,
    peer_allowed: Callable[[str], bool] | None = None,
) -> Response:
    """Send one request and return the whole answer, whatever its status.

    ``what`` names the peer in messages ("the TA Open API"), ``shown`` the target (default:
    the URL without its query). ``truncate`` cuts a body over ``max_bytes`` instead of failing.
    Raises ``HttpError`` when no complete answer arrives; a 4xx/5xx/3xx is a ``Response``.
    ``peer_allowed`` checks the address actually connected to, before anything is sent (no
    second DNS lookup could answer differently).
    """
    if shown is None:
        parts = urlsplit(url)  # never user:password@ nor the query (it may hold a key)
        port = f":{parts.port}" if parts.port else ""
        shown = f"{parts.scheme}://{parts.hostname}{port}{parts.path}"

    def fail(problem: str, *, timed_out: bool = False) -> NoReturn:
        raise HttpError(f"{what} at {shown} {problem}", timed_out=timed_out) from None

    conn, target = _connection(url, timeout, context)
    try:
        try:
            conn.connect()
        except TimeoutError:
            fail(f"did not accept a connection within {timeout:g}s", timed_out=True)
        except OSError as exc:
            raise HttpError(f"cannot reach {what} at {shown}: {scrub(_reason(exc))}") from None
        if peer_allowed is not None:
            _check_peer(conn, peer_allowed, fail)
        try:
            conn.request(method, target, body=body, headers=dict(headers or {}))
            answer = conn.getresponse()
            data = _read_body(answer, max_bytes, truncate, fail)
        except TimeoutError:
            raise HttpError(
                f"{what} {shown} did not answer within {timeout:g}s", timed_out=True
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            fail(f"failed mid-exchange: {type(exc).__name__}: {scrub(_reason(exc))}")
        return Response(answer.status, answer.reason or "", answer.headers, data)
    finally:
        conn.close()


def _check_peer(
    conn: http.client.HTTPConnection,
    peer_allowed: Callable[[str], bool],
    fail: Callable[[str], NoReturn],
) -> None:
    peer = str(conn.sock.getpeername()[0]) if conn.sock is not None else ""
    if not peer_allowed(peer):
        fail(f"is at {peer}, a loopback, link-local, private or reserved address: refused")


def _reason(exc: BaseException) -> str:
    return " ".join(str(getattr(exc, "strerror", None) or exc or type(exc).__name__).split())
