"""Consumer client of keyvault's HTTP API: current keys, kept fresh, through outages.

    from keyvault_client import Client

    kv = Client()                                     # KEYVAULT_ADDR / KEYVAULT_TOKEN(_FILE)
    kv = Client(["http://kv1:8200", "http://kv2:8200"], token, max_stale=3600)
    info = kv.get_app("prod", "APP1")                 # KeyInfo; repr() hides the key
    info.stale                                        # True: keyvault unreachable, cached key
    for rotation in kv.watch():                       # blocks; rotations of held scopes
        ...
    kv.on_rotate(lambda r: reload(r.key.key))         # the same, in a background thread

Every ``get_root``/``get_app`` asks the server, sending the cached version's ETag in
``If-None-Match``: a 304 answers from memory (no key on the wire), a 200 replaces the cached
entry, so a rotation committed by any process is seen at the next call.

Addresses: tried in order from the one that last answered; an address that does not answer,
or answers 5xx, makes the client try the next one (and stay there once it answers). When no
address answers, connection errors and 503 are retried with a capped, jittered exponential
backoff. Then, if the caller allowed it (``max_stale`` seconds), the last key keyvault
confirmed is served with ``stale=True``; otherwise ``Unavailable`` is raised.

``watch()`` long-polls ``GET /v1/events`` from the newest event on, revalidates a held key
whenever an event names its scope, and after every outage revalidates every held key (a
rotation committed while it could not reach keyvault is found by its ETag, not only by an
event). Errors are ``keyvault_client.errors`` classes: 400 InvalidInput, 401 Unauthorized,
403 Forbidden, 404 NotFound, 409 Conflict, no answer or 5xx Unavailable, anything else
KeyvaultError; neither the token nor a key is ever part of a repr, an error or a log line.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keyvault_client import __version__
from keyvault_client.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    KeyvaultError,
    NotFound,
    PreconditionFailed,
    Unauthorized,
    Unavailable,
)
from keyvault_client.settings import addresses_from, consumer_name, token_from
from keyvault_client.transport import HttpTransport, Request, Response, Transport, TransportError

__all__ = ["Client", "KeyInfo", "Rotation"]

log = logging.getLogger("keyvault_client")

_ERRORS: dict[int, type[KeyvaultError]] = {
    400: InvalidInput,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    412: PreconditionFailed,
}
_SEGMENT = re.compile(r"[^/\s]+")
_FIELDS = ("cluster", "scope", "version", "fingerprint", "created_at", "key")
_USER_AGENT = f"keyvault-client/{__version__}"
EVENTS_PAGE = 100  # the server's page size: a shorter page is the end of the feed
Scope = tuple[str, str]  # (cluster, "root" | "app:<APPID>")


@dataclass(frozen=True)
class KeyInfo:
    """The current key of one scope as keyvault served it; ``repr`` leaves the key out.

    ``stale`` is True when keyvault could not be reached and this is the last key it
    confirmed, served because the caller allowed it (``max_stale``).
    """

    cluster: str
    scope: str  # "root" or "app:<APPID>"
    version: int
    fingerprint: str
    created_at: str  # as the server sent it (ISO 8601)
    key: str = field(repr=False)
    etag: str = field(default="", repr=False, compare=False)
    stale: bool = field(default=False, compare=False)

    @property
    def appid(self) -> str | None:
        """The APPID of an app key, None for the root key."""
        return self.scope[4:] if self.scope.startswith("app:") else None


@dataclass(frozen=True)
class Rotation:
    """A held key changed: ``key`` is the new one. ``event_id`` is the event that named it,
    None when revalidation found it (after an outage, or at the start of ``watch``)."""

    cluster: str
    scope: str
    version: int
    previous_version: int | None
    key: KeyInfo
    event_id: int | None = None


def scope_of(appid: str | None) -> str:
    """The scope name of an app key (``app:<APPID>``) or of the root key (``appid=None``)."""
    return "root" if appid is None else f"app:{appid}"


def _segment(value: str, what: str) -> str:
    if not isinstance(value, str) or not _SEGMENT.fullmatch(value) or value in (".", ".."):
        raise InvalidInput(
            f"invalid {what} {str(value)[:80]!r}",
            hint=f"a {what} is one non-empty path segment without '/' or spaces",
        )
    return urllib.parse.quote(value, safe="")


def key_path(cluster: str, scope: str) -> str:
    """The API path of a scope's current key."""
    base = f"/v1/clusters/{_segment(cluster, 'cluster name')}"
    if scope == "root":
        return f"{base}/root"
    if not scope.startswith("app:"):
        raise InvalidInput(f"invalid scope {scope[:80]!r}", hint="use 'root' or 'app:<APPID>'")
    return f"{base}/apps/{_segment(scope[4:], 'APPID')}"


class _Hidden(str):
    """A str whose repr never shows its value (the bearer token kept for scrubbing)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


class Client:
    """A thread-safe client of keyvault's HTTP API for one bearer token.

    ``url``: one base URL, several (a list or comma-separated), or None for
    ``KEYVAULT_ADDR``. ``token``/``token_file``: else ``KEYVAULT_TOKEN`` /
    ``KEYVAULT_TOKEN_FILE`` (read here, when the client is made). ``consumer``: sent as
    ``X-Keyvault-Consumer`` (default: the host name). ``retries``: extra rounds over all
    addresses on no answer or 503, ``backoff`` seconds doubling up to ``max_backoff``,
    jittered. ``max_stale``: seconds a confirmed key may be served when keyvault cannot be
    reached (0: never). ``verify``: for https (True, False for tests, a CA file or an
    SSLContext). ``transport``: a callable ``Request -> Response`` (default HTTP);
    ``sleep``, ``clock`` and ``rng`` make the backoff and the staleness testable.
    """

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        token: str | None = None,
        *,
        token_file: str | None = None,
        timeout: float = 5.0,
        verify: Any = True,
        consumer: str | None = None,
        retries: int = 2,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
        max_stale: float = 0.0,
        transport: Transport | None = None,
        environ: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        environ = os.environ if environ is None else environ
        if not timeout or timeout <= 0:
            raise InvalidInput(f"the timeout must be positive, not {timeout!r}")
        if retries < 0 or backoff < 0 or max_backoff < 0 or max_stale < 0:
            raise InvalidInput("retries, backoff, max_backoff and max_stale cannot be negative")
        self.urls = addresses_from(url, environ)
        self._token = _Hidden(token_from(token, token_file, environ))
        self.consumer = consumer_name(consumer)
        self.timeout = float(timeout)
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.max_stale = float(max_stale)
        self._transport: Transport = transport or HttpTransport(verify)
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._current = 0
        self._cache: dict[Scope, KeyInfo] = {}
        self._confirmed: dict[Scope, float] = {}  # monotonic time keyvault last confirmed it
        self._watchers: list[Watcher] = []

    @property
    def url(self) -> str:
        """The address in use (the one that answered last)."""
        return self.urls[self._current]

    def __repr__(self) -> str:
        return f"Client(urls={self.urls!r}, consumer={self.consumer!r})"

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Stop ``on_rotate`` threads and forget every cached key."""
        for watcher in list(self._watchers):
            watcher.stop()
        self.refresh()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- keys ------------------------------------------------------------------------------
    def get_root(self, cluster: str, *, max_stale: float | None = None) -> KeyInfo:
        """The current root key of ``cluster`` (revalidated with the server on every call)."""
        return self.get(cluster, "root", max_stale=max_stale)

    def get_app(self, cluster: str, appid: str, *, max_stale: float | None = None) -> KeyInfo:
        """The current key of app ``appid`` of ``cluster`` (revalidated on every call)."""
        _segment(appid, "APPID")
        return self.get(cluster, f"app:{appid}", max_stale=max_stale)

    def get(self, cluster: str, scope: str, *, max_stale: float | None = None) -> KeyInfo:
        """The current key of ``scope`` ("root" or "app:<APPID>"); ``max_stale`` overrides
        the client's for this call."""
        path = key_path(cluster, scope)
        with self._lock:
            cached = self._cache.get((cluster, scope))
        headers = {"If-None-Match": cached.etag} if cached is not None else {}
        try:
            response = self._request("GET", path, headers=headers)
        except Unavailable:
            limit = self.max_stale if max_stale is None else max_stale
            stale = self._stale(cluster, scope, limit)
            if stale is None:
                raise
            return stale
        return self._accept(cluster, scope, path, cached, response)

    def _accept(
        self, cluster: str, scope: str, path: str, cached: KeyInfo | None, response: Response
    ) -> KeyInfo:
        if response.status == 304:
            if cached is None:
                raise KeyvaultError(
                    f"keyvault answered GET {path} with 304 to a request without If-None-Match",
                    hint="check proxies in between",
                )
            with self._lock:
                self._confirmed[(cluster, scope)] = self._clock()
            return cached
        if response.status != 200:
            if response.status == 404:
                self.refresh(cluster, scope)
            raise self._error("GET", path, response)
        info = self._parse_key(path, response, cluster, scope)
        with self._lock:
            self._cache[(cluster, scope)] = info
            self._confirmed[(cluster, scope)] = self._clock()
        return info

    def _stale(self, cluster: str, scope: str, limit: float) -> KeyInfo | None:
        with self._lock:
            cached = self._cache.get((cluster, scope))
            confirmed = self._confirmed.get((cluster, scope))
        if cached is None or confirmed is None or limit <= 0:
            return None
        age = self._clock() - confirmed
        if age > limit:
            return None
        log.warning(
            "keyvault unreachable: serving the cached key of %s %s (version %d, confirmed "
            "%.0fs ago, max_stale %gs)",
            cluster,
            scope,
            cached.version,
            age,
            limit,
        )
        return dataclasses.replace(cached, stale=True)

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
                self._confirmed.pop(k, None)
        return len(doomed)

    def cached(self, cluster: str, scope: str) -> KeyInfo | None:
        """The cached entry of a scope without asking the server (None if not cached)."""
        with self._lock:
            return self._cache.get((cluster, scope))

    def held(self) -> list[Scope]:
        """The (cluster, scope) pairs with a cached key."""
        with self._lock:
            return list(self._cache)

    def _parse_key(self, path: str, response: Response, cluster: str, scope: str) -> KeyInfo:
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
        return KeyInfo(
            cluster=cluster,
            scope=scope,
            version=version,
            fingerprint=str(body["fingerprint"]),
            created_at=str(body["created_at"]),
            key=key,
            etag=response.header("ETag") or f'"v{version}"',
        )

    # -- events ----------------------------------------------------------------------------
    def events(
        self, after: int, wait: float = 0.0, *, tail: bool = False
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of ``GET /v1/events`` after ``after`` (long-polled up to ``wait`` s):
        the events the token may see and the id to continue from. ``tail``: no events, the
        newest event's id (where a new follower starts)."""
        path = f"/v1/events?after={int(after)}&wait={float(wait):g}" + (
            "&tail=true" if tail else ""
        )
        response = self._request("GET", path, timeout=self.timeout + wait)
        if response.status != 200:
            raise self._error("GET", "/v1/events", response)
        try:
            body = response.json()
            found, last = list(body["events"]), int(body["last_id"])
        except (ValueError, KeyError, TypeError):
            raise KeyvaultError("keyvault answered GET /v1/events with a malformed body") from None
        return [e for e in found if isinstance(e, dict)], last

    def watch(
        self,
        scopes: Iterable[Scope] | None = None,
        *,
        wait: float = 25.0,
        after: int | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[Rotation]:
        """Yield a ``Rotation`` whenever a held key changes, until ``stop`` is set.

        ``scopes``: (cluster, scope) pairs to follow, fetched at the start (default: the
        keys this client holds, re-read as it fetches more). Follows ``/v1/events`` from
        ``after`` (default: the newest event) by long-poll of ``wait`` seconds; revalidates
        every followed key at the start and after every outage, so nothing committed
        meanwhile is missed. Survives outages (retries forever, capped jittered backoff);
        raises Unauthorized, Forbidden or NotFound (those need an operator).
        """
        from keyvault_client.watch import Follower  # noqa: PLC0415 - cycle: it uses Client

        follower = Follower(self, scopes, wait=wait, after=after, stop=stop)
        return follower.run()

    def on_rotate(
        self,
        callback: Callable[[Rotation], object],
        scopes: Iterable[Scope] | None = None,
        *,
        wait: float = 25.0,
    ) -> Watcher:
        """Call ``callback(rotation)`` from a background thread for each change (see
        ``watch``); returns the ``Watcher`` (``stop()`` it, or ``close()`` the client)."""
        watcher = Watcher(self, callback, scopes, wait)
        self._watchers.append(watcher)
        watcher.start()
        return watcher

    def _forget_watcher(self, watcher: Watcher) -> None:
        if watcher in self._watchers:
            self._watchers.remove(watcher)

    # -- HTTP ------------------------------------------------------------------------------
    def delay(self, attempt: int) -> float:
        """The pause before retry ``attempt`` (1, 2, ...): exponential, capped, jittered."""
        base = min(self.max_backoff, self.backoff * (2 ** min(attempt - 1, 30)))
        return base * self._rng.uniform(0.5, 1.0)

    def _request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send to the address in use, failing over and retrying (see the module docstring).

        Returns the first answer below 500. Raises Unavailable when no address gave one:
        after ``retries`` extra rounds when every failure was no answer or a 503, at once
        when an address answered another 5xx (retrying would not help).
        """
        problem: KeyvaultError | None = None
        retry = True
        for attempt in range(self.retries + 1):
            if attempt:
                if not retry:
                    break
                self._sleep(self.delay(attempt))
            start = self._current
            for offset in range(len(self.urls)):
                index = (start + offset) % len(self.urls)
                request = self._make_request(index, method, path, headers, timeout)
                try:
                    response = self._transport(request)
                except TransportError as exc:
                    problem = Unavailable(self._scrub(str(exc)))
                    log.debug("keyvault at %s did not answer: %s", self.urls[index], problem)
                    continue
                if response.status < 500:
                    self._current = index
                    return response
                problem = self._error(method, path.partition("?")[0], response, Unavailable)
                log.debug("keyvault at %s answered HTTP %d", self.urls[index], response.status)
                retry = retry and response.status == 503
        assert problem is not None
        if len(self.urls) > 1:
            problem.message = (
                f"no keyvault address answered ({len(self.urls)} tried): {problem.message}"
            )
        raise problem

    def _make_request(
        self,
        index: int,
        method: str,
        path: str,
        headers: Mapping[str, str] | None,
        timeout: float | None,
    ) -> Request:
        return Request(
            method=method,
            url=self.urls[index] + path,
            headers={
                "Accept": "application/json",
                "User-Agent": _USER_AGENT,
                "X-Keyvault-Consumer": self.consumer,
                "Authorization": f"Bearer {self._token}",
                **(headers or {}),
            },
            timeout=self.timeout if timeout is None else timeout,
        )

    def _scrub(self, text: str) -> str:
        return text.replace(str(self._token), "***") if self._token else text

    def _error(
        self,
        method: str,
        path: str,
        response: Response,
        cls: type[KeyvaultError] | None = None,
    ) -> KeyvaultError:
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
        cls = cls or _ERRORS.get(status, KeyvaultError)
        error = cls(f"keyvault {method} {path} answered HTTP {status} ({label})")
        error.http_status = status
        if code:
            error.code = code
        error.detail = detail
        return error


class Watcher:
    """The background thread of ``Client.on_rotate``."""

    def __init__(
        self,
        client: Client,
        callback: Callable[[Rotation], object],
        scopes: Iterable[Scope] | None,
        wait: float,
    ) -> None:
        self._client = client
        self._callback = callback
        self._scopes = list(scopes) if scopes is not None else None
        self._wait = wait
        self._stop = threading.Event()
        self.error: KeyvaultError | None = None
        self.thread = threading.Thread(target=self._run, name="keyvault-on-rotate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to end (it does at its next answer) and wait ``timeout`` s for it."""
        self._stop.set()
        self._client._forget_watcher(self)
        if timeout is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def _run(self) -> None:
        try:
            for rotation in self._client.watch(self._scopes, wait=self._wait, stop=self._stop):
                try:
                    self._callback(rotation)
                except Exception as exc:  # noqa: BLE001 - the caller's bug must not end the watch
                    log.error("on_rotate callback failed: %s", type(exc).__name__)
        except KeyvaultError as exc:
            self.error = exc
            log.error("on_rotate stopped: %s", exc)
