"""Following rotations: the loop behind ``Client.watch``, ``on_rotate`` and the agent.

Position first, then revalidation: the follower finds the newest event id once, at its
start, then revalidates every followed key (If-None-Match), then long-polls for events after
that id. A rotation committed before the position is found by revalidation, one after it by
its event; so none is missed. Across an outage the position is kept (the feed is not paged
again from id 0 on every reconnect) and every followed key is revalidated when keyvault
answers again, which finds whatever rotated meanwhile.

Errors: Unauthorized, Forbidden and NotFound end the follower (raised: the token or the
scope is gone, an operator must act). Every other failure (no answer, 5xx, 429, a redirect,
a malformed body) is retried with capped jittered backoff, for ever.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from keyvault_client.client import EVENTS_PAGE, Rotation, Scope
from keyvault_client.errors import Forbidden, KeyvaultError, NotFound, Unauthorized, Unavailable

if TYPE_CHECKING:
    from keyvault_client.client import Client

log = logging.getLogger("keyvault_client")
# Pages read to find the newest event at the start (each skips up to 500 rows of the feed);
# past that, follow from there (later events are still read, none is missed).
_MAX_TAIL_PAGES = 10_000
FATAL = (Unauthorized, Forbidden, NotFound)


class Follower:
    """One ``watch()``: its position in the feed and the versions it last reported."""

    def __init__(
        self,
        client: Client,
        scopes: Iterable[Scope] | None,
        *,
        wait: float,
        after: int | None,
        stop: threading.Event | None,
    ) -> None:
        self.client = client
        self.scopes = list(dict.fromkeys(scopes)) if scopes is not None else None
        self.wait = wait
        self.after = after
        self.stop = stop or threading.Event()
        self.seen: dict[Scope, int] = {}
        for scope in self.followed():
            info = client.cached(*scope)
            if info is not None:
                self.seen[scope] = info.version

    def followed(self) -> list[Scope]:
        return self.scopes if self.scopes is not None else self.client.held()

    def run(self) -> Iterator[Rotation]:
        failures = 0
        revalidate = True
        while not self.stop.is_set():
            try:
                if self.after is None:  # once: where the feed ends now
                    self.after = self._newest()
                if revalidate:
                    yield from self._revalidate(self.followed(), None)
                    if failures:
                        log.warning("keyvault reachable again at %s", self.client.url)
                    revalidate, failures = False, 0
                found, last = self.client.events(self.after, self.wait)
            except FATAL:
                raise
            except KeyvaultError as exc:
                # Transient (no answer, 5xx, 429, 3xx, a malformed body): keep the position,
                # revalidate every key once keyvault answers again.
                failures += 1
                revalidate = True
                if failures == 1:
                    what = "unreachable" if isinstance(exc, Unavailable) else "answer unusable"
                    log.warning("keyvault %s, retrying with backoff: %s", what, exc)
                self.stop.wait(self.client.delay(failures))
                continue
            self.after = last
            yield from self._apply(found)

    def _apply(self, found: list[dict[str, object]]) -> Iterator[Rotation]:
        followed = set(self.followed())
        named: dict[Scope, int] = {}
        for event in found:
            scope = (str(event.get("cluster")), str(event.get("scope")))
            event_id = event.get("id")
            if scope in followed and isinstance(event_id, int):
                named[scope] = event_id  # several events of one scope: one revalidation
        for scope, event_id in named.items():
            yield from self._revalidate([scope], event_id)

    def _newest(self) -> int:
        """The id of the newest event (0 for none): one request to a server that knows
        ``tail``; an older one (which ignores it and answers a page) is paged through."""
        found, last = self.client.events(0, 0.0, tail=True)
        if not found:
            return last
        after = 0
        for _page in range(_MAX_TAIL_PAGES):
            found, last = self.client.events(after, 0.0)
            after = max(after, last)
            if len(found) < EVENTS_PAGE:
                break
        return after

    def _revalidate(self, scopes: Iterable[Scope], event_id: int | None) -> Iterator[Rotation]:
        for cluster, scope in scopes:
            if self.stop.is_set():
                return
            info = self.client.get(cluster, scope, max_stale=0)
            previous = self.seen.get((cluster, scope))
            if previous == info.version:
                continue
            self.seen[(cluster, scope)] = info.version
            yield Rotation(cluster, scope, info.version, previous, info, event_id)
