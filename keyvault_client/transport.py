"""How the client talks HTTP: one callable, ``transport(Request) -> Response``.

The default, ``HttpTransport``, sends the request with ``keyvault_client.httpclient``
(standard library, no environment proxy, no redirect, bounded answers). Tests and
embedders inject their own callable (``Client(transport=...)``): it returns a
``Response`` for any answer, whatever its status, and raises ``TransportError`` when
there is no answer (refused, timed out, broken), which makes the client fail over to
its next address and retry.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from keyvault_client import httpclient

TransportError = httpclient.HttpError
# A key answer is a few hundred bytes, an events page a few tens of KiB.
MAX_ANSWER_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Request:
    """One request to one keyvault address. ``headers`` carries the bearer token: never shown."""

    method: str
    url: str
    headers: Mapping[str, str] = field(repr=False)
    timeout: float


@dataclass(frozen=True)
class Response:
    """A complete answer. Header names are looked up case-insensitively."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    body: bytes = field(default=b"", repr=False)
    reason: str = ""

    def header(self, name: str, default: str = "") -> str:
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return str(value)
        return default

    def json(self) -> Any:
        """The body parsed as JSON; ``ValueError`` if it is not JSON."""
        return json.loads(self.body)


Transport = Callable[[Request], Response]


class HttpTransport:
    """The default transport: ``keyvault_client.httpclient``, one connection per request."""

    def __init__(self, verify: bool | str | ssl.SSLContext = True) -> None:
        self._verify = verify
        self._context: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return "HttpTransport()"

    def __call__(self, request: Request) -> Response:
        context = None
        if request.url.startswith("https:"):
            if self._context is None:
                self._context = httpclient.ssl_context(self._verify)
            context = self._context
        secret = request.headers.get("Authorization", "").partition(" ")[2]

        def scrub(text: str) -> str:
            return text.replace(secret, "***") if secret else text

        answer = httpclient.request(
            request.method,
            request.url,
            headers=request.headers,
            timeout=request.timeout,
            max_bytes=MAX_ANSWER_BYTES,
            what="keyvault",
            scrub=scrub,
            context=context,
        )
        headers = {str(k): str(v) for k, v in answer.headers.items()}
        return Response(answer.status, headers, answer.body, answer.reason)
