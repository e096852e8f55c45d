"""Consumer client of keyvault's HTTP API: fetch current keys, keep them fresh, call TA with them.

    from keyvault.client import Client

    with Client("http://127.0.0.1:8200", token) as kv:
        info = kv.get_app("prod", "APP1")            # KeyInfo; repr() hides the key
        data = kv.call_ta("prod", appid="APP1", api_path="open/list-event-meta",
                          params={"projectId": 1}, ta_base_url="http://ta2:8992")

Every ``get_root``/``get_app`` asks the server, sending the cached version's ETag in
``If-None-Match``: a 304 answers from memory (no key on the wire), a 200 replaces the cached
entry. So a rotation committed by any process is seen at the next call, while a steady key
costs one small round trip. ``call_ta`` goes further: when TA refuses the key (it was rotated
between our read and TA's check), it drops the cached entry, fetches again and retries once.

Errors are ``keyvault.errors`` classes mapped from the server's answer: 400 InvalidInput,
401 Unauthorized, 403 Forbidden, 404 NotFound, 409 Conflict, anything else (503, a proxy's
502, garbage, no connection) KeyvaultError. The error keeps the server's ``error`` code in
``.code``, the status in ``.http_status`` and its ``detail``. Neither the token nor a key is
ever part of a repr or an error message.

Requests go through ``keyvault.httpclient`` (standard library; one connection per request,
no environment proxy, no redirect followed, bounded answers), so ``import keyvault.client``
stays light and a Client is safe to share between threads.
"""

from __future__ import annotations

import re
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from keyvault import __version__, httpclient
from keyvault.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    KeyvaultError,
    NotFound,
    TaApiError,
    Unauthorized,
)
from keyvault.ta import TaClient, is_key_rejected

__all__ = ["Client", "KeyInfo"]

_ERRORS: dict[int, type[KeyvaultError]] = {
    400: InvalidInput,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
}
_SEGMENT = re.compile(r"[^/\s]+")
_FIELDS = ("cluster", "scope", "version", "fingerprint", "created_at", "key")
_USER_AGENT = f"keyvault-client/{__version__}"
# A key answer is a few hundred bytes; anything near this is not keyvault answering.
_MAX_ANSWER_BYTES = 1024 * 1024


@dataclass(frozen=True)
class KeyInfo:
    """The current key of one scope as keyvault served it; ``repr`` leaves the key out."""

    cluster: str
    scope: str  # "root" or "app:<APPID>"
    version: int
    fingerprint: str
    created_at: str  # as the server sent it (ISO 8601)
    key: str = field(repr=False)
    etag: str = field(default="", repr=False, compare=False)

    @property
    def appid(self) -> str | None:
        """The APPID of an app key, None for the root key."""
        return self.scope[4:] if self.scope.startswith("app:") else None


def _segment(value: str, what: str) -> str:
    if not isinstance(value, str) or not _SEGMENT.fullmatch(value) or value in (".", ".."):
        raise InvalidInput(
            f"invalid {what} {str(value)[:80]!r}",
            hint=f"a {what} is one non-empty path segment without '/' or spaces",
        )
    return urllib.parse.quote(value, safe="")


def _normalize_url(url: str) -> str:
    parts = urllib.parse.urlsplit(str(url).strip())
    port = f":{parts.port}" if _port_ok(parts) and parts.port else ""
    shown = f"{parts.scheme}://{parts.hostname or ''}{port}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(
            f"invalid keyvault URL {shown!r}",
            hint="use http(s)://host[:port][/prefix], e.g. http://127.0.0.1:8200",
        )
    if "@" in parts.netloc or parts.query or parts.fragment or not _port_ok(parts):
        raise InvalidInput(
            f"invalid keyvault URL {shown!r}: no user@, query, fragment or bad port",
            hint="the token goes in Client(url, token), not in the URL",
        )
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _port_ok(parts: urllib.parse.SplitResult) -> bool:
    try:
        _ = parts.port
    except ValueError:
        return False
    return True


class _Hidden(str):
    """A str whose repr never shows its value (the bearer token kept for scrubbing)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


class Client:
    """A thread-safe client of keyvault's HTTP API for one bearer token.

    ``verify``: True (system CAs), False (no check: tests only), a CA bundle path or an
    ``ssl.SSLContext``; used for https URLs.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 5.0,
        verify: bool | str | ssl.SSLContext = True,
    ) -> None:
        if not isinstance(token, str) or not token.strip() or any(c.isspace() for c in token):
            raise InvalidInput(
                "the keyvault token is empty or contains whitespace",
                hint="pass the kvt_... string printed by `keyvault token create`",
            )
        if not timeout or timeout <= 0:
            raise InvalidInput(f"the timeout must be positive, not {timeout!r}")
        self.url = _normalize_url(url)
        self.timeout = float(timeout)
        self._token = _Hidden(token)
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], KeyInfo] = {}
        self._ssl = httpclient.ssl_context(verify) if self.url.startswith("https:") else None
        # httpclient uses no proxy from the environment (none gets to see keys) and follows
        # no redirect, so the bearer token goes nowhere else. The Authorization header is
        # made per request, so no attribute but the _Hidden token holds it.
        self._headers = {"Accept": "application/json", "User-Agent": _USER_AGENT}

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})"

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Forget every cached key (each request uses its own connection)."""
        self.refresh()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- keys ------------------------------------------------------------------------------
    def get_root(self, cluster: str) -> KeyInfo:
        """The current root key of ``cluster`` (revalidated with the server on every call)."""
        path = f"/v1/clusters/{_segment(cluster, 'cluster name')}/root"
        return self._get_key(cluster, "root", path)

    def get_app(self, cluster: str, appid: str) -> KeyInfo:
        """The current key of app ``appid`` of ``cluster`` (revalidated on every call)."""
        path = f"/v1/clusters/{_segment(cluster, 'cluster name')}/apps/{_segment(appid, 'APPID')}"
        return self._get_key(cluster, f"app:{appid}", path)

    def refresh(self, cluster: str | None = None, scope: str | None = None) -> int:
        """Drop cached keys (all, one cluster's, or one scope's); return how many were dropped.

        ``scope`` is ``"root"`` or ``"app:<APPID>"``; with ``cluster=None`` it matches in
        every cluster.
        """
        with self._lock:
            doomed = [
                k
                for k in self._cache
                if (cluster is None or k[0] == cluster) and (scope is None or k[1] == scope)
            ]
            for k in doomed:
                del self._cache[k]
        return len(doomed)

    def cached(self, cluster: str, scope: str) -> KeyInfo | None:
        """The cached entry of a scope without asking the server (None if not cached)."""
        with self._lock:
            return self._cache.get((cluster, scope))

    def _get_key(self, cluster: str, scope: str, path: str) -> KeyInfo:
        with self._lock:
            cached = self._cache.get((cluster, scope))
        headers = {"If-None-Match": cached.etag} if cached is not None else {}
        response = self._request("GET", path, headers=headers)
        if response.status == 304:
            if cached is None:
                raise KeyvaultError(
                    f"keyvault answered GET {path} with 304 to a request without If-None-Match",
                    hint="check proxies in between",
                )
            return cached
        if response.status != 200:
            if response.status == 404:
                self.refresh(cluster, scope)
            raise self._error("GET", path, response)
        info = self._parse_key(path, response, cluster, scope)
        with self._lock:
            self._cache[(cluster, scope)] = info
        return info

    def _parse_key(
        self, path: str, response: httpclient.Response, cluster: str, scope: str
    ) -> KeyInfo:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or any(name not in body for name in _FIELDS):
            raise KeyvaultError(
                f"keyvault answered GET {path} with a body that is not a key "
                f"(expected JSON with {', '.join(_FIELDS)})"
            )
        version, key = body["version"], body["key"]
        if (
            not isinstance(version, int)
            or isinstance(version, bool)
            or not isinstance(key, str)
            or not key
        ):
            raise KeyvaultError(f"keyvault answered GET {path} with a malformed version or key")
        if body["cluster"] != cluster or body["scope"] != scope:
            # A key for another scope must never be handed out as this one.
            raise KeyvaultError(
                f"keyvault answered GET {path} with the key of "
                f"{str(body['scope'])[:80]!r} of {str(body['cluster'])[:80]!r}, "
                f"not {scope!r} of {cluster!r}"
            )
        etag = response.header("ETag") or f'"v{version}"'
        return KeyInfo(
            cluster=cluster,
            scope=scope,
            version=version,
            fingerprint=str(body["fingerprint"]),
            created_at=str(body["created_at"]),
            key=key,
            etag=etag,
        )

    # -- TA --------------------------------------------------------------------------------
    def call_ta(
        self,
        cluster: str,
        *,
        appid: str | None = None,
        api_path: str,
        method: str = "GET",
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        ta_base_url: str,
        ta_client_factory: Callable[[str], TaClient] | None = None,
    ) -> Any:
        """Call the TA Open API with the current key (app key if ``appid``, else root).

        Returns the envelope's ``data``. When TA answers that the key is invalid, the cached
        entry is dropped, the key fetched again and the call retried once; any other error
        (and the retry's own) is raised: TaApiError, TaTransportError or a keyvault error.
        ``ta_client_factory(ta_base_url)`` builds the TaClient (e.g. to pass the cluster's
        ``invalid_key_codes``); the default is ``TaClient(ta_base_url)``.
        """
        ta = (ta_client_factory or TaClient)(ta_base_url)
        fetch = (
            (lambda: self.get_app(cluster, appid))
            if appid is not None
            else (lambda: self.get_root(cluster))
        )
        scope = "root" if appid is None else f"app:{appid}"

        def call(info: KeyInfo) -> Any:
            return ta.call(
                api_path, token=info.key, method=method, params=params, json_body=json_body
            )

        try:
            return call(fetch())
        except TaApiError as exc:
            rejected = getattr(ta, "is_key_rejected", None)
            if not (rejected(exc) if callable(rejected) else is_key_rejected(exc)):
                raise
        self.refresh(cluster, scope)
        return call(fetch())

    # -- HTTP ------------------------------------------------------------------------------
    def _request(
        self, method: str, path: str, *, headers: Mapping[str, str] | None = None
    ) -> httpclient.Response:
        try:
            return httpclient.request(
                method,
                self.url + path,
                headers={
                    **self._headers,
                    "Authorization": f"Bearer {self._token}",
                    **(headers or {}),
                },
                timeout=self.timeout,
                max_bytes=_MAX_ANSWER_BYTES,
                what="keyvault",
                shown=f"{self.url} ({method} {path})",
                scrub=self._scrub,
                context=self._ssl,
            )
        except httpclient.HttpError as exc:
            raise KeyvaultError(str(exc)) from None

    def _scrub(self, text: str) -> str:
        return text.replace(str(self._token), "***") if self._token else text

    def _error(self, method: str, path: str, response: httpclient.Response) -> KeyvaultError:
        status = response.status
        code, detail = None, None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            code, detail = body["error"], body.get("detail")
        if isinstance(detail, str):
            detail = self._scrub(detail)
        shown = self._scrub(" ".join(str(detail).split())[:300]) if detail is not None else ""
        label = (
            (f"{code}: {shown}" if shown else code)
            if code
            else response.reason or "no JSON error body"
        )
        cls = _ERRORS.get(status, KeyvaultError)
        error = cls(f"keyvault {method} {path} answered HTTP {status} ({label})")
        error.http_status = status
        if code:
            error.code = code
        error.detail = detail
        return error
