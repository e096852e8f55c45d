"""Following rotations: the loop behind ``Client.watch``, ``on_rotate`` and the agent.

Position first, then revalidation: the follower finds the newest event id, then revalidates
every followed key (If-None-Match), then long-polls for events after that id. A rotation
committed before the position is found by revalidation, one after it by its event; so none
is missed, also across an outage (every reconnect repeats position-then-revalidate, since
events may have been skipped or the feed's ids may be a restored database's).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from keyvault_client.client import EVENTS_PAGE, Rotation, Scope
from keyvault_client.errors import Unavailable

if TYPE_CHECKING:
    from keyvault_client.client import Client

log = logging.getLogger("keyvault_client")
# Pages read to find the newest event (100 events each); past that, start from there.
_MAX_TAIL_PAGES = 10_000


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
                # At the start, and after an outage (the feed may have moved on, or been
                # restored from a backup with other ids): position, then revalidate.
                after = self._newest() if self.after is None else self.after
                self.after = after
                if revalidate:
                    yield from self._revalidate(self.followed(), None)
                    if failures:
                        log.warning("keyvault reachable again at %s", self.client.url)
                    revalidate, failures = False, 0
                found, last = self.client.events(after, self.wait)
            except Unavailable as exc:
                failures += 1
                revalidate, self.after = True, None
                if failures == 1:
                    log.warning("keyvault unreachable, retrying with backoff: %s", exc)
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
        """The id of the newest event the token may see (0 for none)."""
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
