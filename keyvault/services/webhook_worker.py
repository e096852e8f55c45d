"""The background webhook deliverer run inside ``keyvault serve``: fan out, then deliver, in a loop.

Each tick opens the keyring against the store, runs ``enqueue_deliveries`` in one
transaction and ``deliver_due`` (which commits per delivery). Several servers (and the
workers of one) each run one, but only the holder of the ``webhook-deliveries`` lease
(``services/leases.py``) delivers: its thread ticks only while the lease is held, and each
claim's transaction checks it (the fence). A holder that takes the lease over makes the
deliveries its predecessor claimed and never recorded due at once (``release_claims``):
at least once, never lost; a repeat carries the same ``webhook-id``. ``tick()`` called
directly (tests, embedding) takes no lease.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

from keyvault.config import Settings
from keyvault.db import transaction
from keyvault.models import WEBHOOK_LEASE, utcnow
from keyvault.services import leases, webhooks
from keyvault.services.store import open_keyring

log = logging.getLogger(__name__)


class WebhookWorker:
    """Runs ``tick()`` every ``interval`` seconds in a daemon thread between ``start()`` and ``stop()``."""

    def __init__(
        self,
        factory: webhooks.SessionFactory,
        *,
        settings: Settings,
        send: webhooks.Sender | None = None,
        interval: float = 1.0,
        clock: webhooks.Clock | None = None,
        rand: Callable[[], float] = random.random,
        max_attempts: int = webhooks.DEFAULT_MAX_ATTEMPTS,
        limit: int = 100,
        lease_ttl: float | None = None,
        lease_clock: leases.Clock | None = None,
    ) -> None:
        self.factory = factory
        self.settings = settings
        self.send = send or webhooks.default_sender()
        self.interval = interval
        self.clock = clock or utcnow
        self.rand = rand
        self.max_attempts = max_attempts
        self.limit = limit
        # delivered / retrying / dead / errors, for /metrics
        self.outcomes: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        ttl = settings.lease_ttl if lease_ttl is None else lease_ttl
        self.lease = leases.LeaseKeeper(
            factory,
            name=WEBHOOK_LEASE,
            ttl=timedelta(seconds=ttl),
            clock=lease_clock,
            on_taken=self._taken,
        )

    def _taken(self, info: leases.LeaseInfo, previous: str | None) -> None:
        """A takeover: what the previous holder had claimed is due now (it may have died).
        "Now" by the deliveries' clock (this replica's), not the lease's (the database's):
        the due check reads that one, and a database clock ahead would delay the resend."""
        with transaction(self.factory) as session:
            released = webhooks.release_claims(session, holder=self.lease.holder, now=self.clock())
        if released:
            log.warning(
                "webhook lease taken over from %s: %d delivery(ies) in flight there retried",
                previous,
                released,
            )

    def tick(self, *, fenced: bool = False) -> webhooks.DeliveryReport:
        """One round: fan out new events, then deliver what is due (at most ``limit``);
        ``fenced``: only while this worker holds the lease (each claim checks it)."""
        with self._lock:
            with transaction(self.factory) as session:
                keyring = open_keyring(session, settings=self.settings)
                webhooks.enqueue_deliveries(session, now=self.clock())
            report = webhooks.deliver_due(
                self.factory,
                keyring=keyring,
                now=self.clock,
                send=self.send,
                limit=self.limit,
                max_attempts=self.max_attempts,
                rand=self.rand,
                should_stop=self._stop.is_set,
                fence=self.lease.fence if fenced else None,
                claimed_by=self.lease.holder,
            )
        self.outcomes.update(delivered=report.delivered, retrying=report.retrying, dead=report.dead)
        return report

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = False
            if not self.lease.held():  # another replica delivers; the heartbeat retries
                self._stop.wait(min(self.interval, self.lease.every))
                continue
            try:
                busy = self.tick(fenced=True).attempted >= self.limit
            except Exception as exc:  # noqa: BLE001 - keep delivering after a database or keyring hiccup
                self.outcomes["errors"] += 1
                log.error("webhook delivery round failed: %s: %s", type(exc).__name__, exc)
            if not busy:
                self._stop.wait(self.interval)

    def start(self) -> None:
        """Start the delivery thread (once)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self.lease.start()
        self._thread = threading.Thread(target=self._run, name="keyvault-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> bool:
        """Ask the thread to stop and wait at most ``timeout`` seconds; True if it ended."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        thread.join(timeout)
        # Given back only once no claim can follow; else it expires on its own.
        self.lease.stop(release=not thread.is_alive())
        if thread.is_alive():
            log.warning(
                "webhook worker still busy after %.1f s; it is a daemon thread and will not block exit",
                timeout,
            )
            return False
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
