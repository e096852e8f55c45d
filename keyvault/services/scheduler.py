"""Scheduled rotation: rotate every scope whose key is older than its policy allows.

Safe to start on several machines at once: a lease row in the database lets one
runner act; the others report who holds it and do nothing. The lease (``services/leases``)
is short (15 s by default) and renewed by a heartbeat while the run lasts; a runner that
loses it journals no further rotation (``rotate_many(should_start=...)``) and writes no
bookkeeping, and one that dies is replaced by the next run after the lease expired. Time comes from an
injected clock. A failing scope backs off exponentially (capped) and is paused
after ``max_failures`` consecutive failures until an operator resumes it.
Like rotation, this commits in steps (lease, then each scope's bookkeeping).

Each run's end is recorded on the lease row (``record_run``), so "when did the scheduler
last run, and did it work" is answered even when nothing was due.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.config import Settings
from keyvault.db import transaction
from keyvault.errors import IntegrityError
from keyvault.events import record_event
from keyvault.models import ROTATE_DUE_LEASE, Lease, ScopeSchedule, utcnow
from keyvault.scope import parse_scope
from keyvault.services import integrity, leases
from keyvault.services.clusters import get_cluster
from keyvault.services.policies import Candidate, candidates
from keyvault.services.rotation import (
    SETTLE_AFTER,
    ResultStatus,
    RotationResult,
    RotationService,
)
from keyvault.services.rotation.journal import SessionFactory
from keyvault.services.store import open_keyring
from keyvault.ssh import Connector

LEASE = ROTATE_DUE_LEASE
_log = logging.getLogger("keyvault.scheduler")
Clock = Callable[[], datetime]


@dataclass
class ScopeResult:
    cluster: str
    scope: str
    status: str  # rotated, failed, skipped, due (dry run)
    reason: str
    rotation_id: str | None = None
    new_version: int | None = None
    new_fingerprint: str | None = None


@dataclass
class DueReport:
    lease_acquired: bool
    lease_holder: str | None
    results: list[ScopeResult] = field(default_factory=list)
    # Stored rotations a dead process left, finished by this run (see _settle_stored).
    settled: list[RotationResult] = field(default_factory=list)
    # True once the run's end is on the lease row; False for a dry run, a lease held
    # elsewhere, or a run that lost its lease before it ended (it must not write).
    recorded: bool = False

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)


def runner_id() -> str:
    """Who holds the lease: host, pid and a random instance id (``leases.holder_id``)."""
    return leases.holder_id()


def acquire_lease(
    factory: SessionFactory, *, holder: str, now: datetime, ttl: timedelta
) -> str | None:
    """Take (or extend) the lease; return None on success, else the current holder."""
    with transaction(factory) as s:
        if leases.take(s, name=LEASE, holder=holder, now=now, ttl=ttl) is not None:
            return None
        info = leases.read(s, LEASE)
        return "unknown" if info is None or info.expires_at is None else info.describe()


def record_run(
    factory: SessionFactory,
    *,
    holder: str,
    started_at: datetime,
    finished_at: datetime,
    report: DueReport,
    error: BaseException | None = None,
) -> bool:
    """Release the lease and record the run's end on it; False when we no longer held it.

    Outcomes: ``failed`` when the run raised before it was through (unknown cluster,
    database, a bug; ``last_error`` keeps its first line); ``partial`` when it completed but some scopes failed; ``ok``
    otherwise, nothing due included. A completed run is a success even if scopes failed:
    "last success" answers "is the scheduler alive and able to work" (a dead timer, a
    broken configuration), and a failing host has its own signals (backoff, pause,
    rotation.failed, the key-age alert) that must not mask, or be masked by, that one.
    One conditional UPDATE: a runner whose lease expired and was taken writes nothing.
    """
    failed = report.count("failed")
    outcome = "failed" if error is not None else "partial" if failed else "ok"
    values: dict[str, Any] = {
        "holder": None,
        "expires_at": None,
        "last_started_at": started_at,
        "last_finished_at": finished_at,
        "last_holder": holder,
        "last_outcome": outcome,
        "last_rotated": report.count("rotated"),
        "last_failed": failed,
        "last_skipped": report.count("skipped"),
        "last_error": None if error is None else _one_line(error),
    }
    values["last_failure_at" if error is not None else "last_success_at"] = finished_at
    with transaction(factory) as s:
        written = cast(
            "CursorResult[Any]",
            s.execute(
                update(Lease).where(Lease.name == LEASE, Lease.holder == holder).values(**values)
            ),
        ).rowcount
    return written == 1


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:500]


def backoff(failures: int, *, base: timedelta, cap: timedelta) -> timedelta:
    """base · 2^(failures-1), capped."""
    # Doubling step by step (stopping at the cap) never overflows timedelta, however
    # many failures a scope has (base * 2**n raised OverflowError from n ~ 38).
    delay = base
    for _ in range(min(max(0, failures - 1), 64)):
        if delay >= cap:
            break
        delay *= 2
    return min(cap, delay)


class Scheduler:
    """Runs `rotate due` once per call to ``run``."""

    def __init__(
        self,
        factory: SessionFactory,
        *,
        settings: Settings,
        connector: Connector,
        clock: Clock,
        concurrency: int = 4,
        max_failures: int = 5,
        backoff_base: timedelta = timedelta(minutes=5),
        backoff_cap: timedelta = timedelta(hours=6),
        lease_ttl: timedelta = leases.DEFAULT_TTL,
        holder: str | None = None,
        service_factory: Callable[[], RotationService] | None = None,
        database_time: bool = False,
    ) -> None:
        self.factory = factory
        self.settings = settings
        self.connector = connector
        self.clock = clock
        self.concurrency = concurrency
        self.max_failures = max_failures
        self.backoff_base, self.backoff_cap, self.lease_ttl = backoff_base, backoff_cap, lease_ttl
        self.holder = holder or runner_id()
        # The lease's clock: the database's (replicas, `rotate due`) or the injected one (tests).
        self.lease_clock: Clock | None = None if database_time else clock
        self.service_factory = service_factory or (
            lambda: RotationService(factory, settings=settings, connector=connector)
        )

    def plan(self, cluster_name: str | None = None) -> list[ScopeResult]:
        """What would be rotated now, and why the rest would not; a scope whose policy or
        schedule row fails its MAC check is refused ("failed", the error says which row)."""
        now = self.clock()
        with transaction(self.factory) as s:
            keyring = open_keyring(s, settings=self.settings)
            found = candidates(s, now=now, cluster_name=cluster_name)
            return [self._planned(c, keyring) for c in found]

    @staticmethod
    def _planned(c: Candidate, keyring: crypto.Keyring) -> ScopeResult:
        try:
            for row in c.rows:
                integrity.check_row(row, keyring=keyring)
        except IntegrityError as exc:
            _log.error("%s of %s not scheduled: %s", c.scope, c.cluster, exc.message)
            return ScopeResult(c.cluster, c.scope, "failed", f"{exc.message} ({exc.hint})")
        return ScopeResult(c.cluster, c.scope, "due" if c.due else "skipped", c.reason)

    def run(
        self,
        *,
        dry_run: bool = False,
        cluster_name: str | None = None,
        on_done: Callable[[ScopeResult], None] | None = None,
    ) -> DueReport:
        """Rotate every due scope (holding the lease), and record outcomes, backoff and pauses."""
        if dry_run:
            return DueReport(
                lease_acquired=False, lease_holder=None, results=self.plan(cluster_name)
            )
        started = self.clock()
        keeper = leases.LeaseKeeper(  # retake=False: a run that lost its lease ends
            self.factory,
            name=LEASE,
            holder=self.holder,
            ttl=self.lease_ttl,
            clock=self.lease_clock,
            retake=False,
        )
        if not keeper.acquire():
            held = keeper.info.describe() if keeper.info is not None else "unknown"
            return DueReport(lease_acquired=False, lease_holder=held)
        report = DueReport(lease_acquired=True, lease_holder=self.holder)
        keeper.start(first=False)  # the heartbeat: renewed every ttl/3 while the run lasts
        try:
            self._rotate_due(report, cluster_name, on_done, keeper)
        except BaseException as exc:
            keeper.stop(release=False)
            self._record_run(started, report, exc)
            raise
        keeper.stop(release=False)  # record_run gives it back with the run's end
        self._record_run(started, report, None)
        return report

    def _rotate_due(
        self,
        report: DueReport,
        cluster_name: str | None,
        on_done: Callable[[ScopeResult], None] | None,
        keeper: leases.LeaseKeeper,
    ) -> None:
        """Settle, then rotate the due scopes; nothing starts once the lease is lost."""
        planned = self.plan(cluster_name)
        report.results += [r for r in planned if r.status != "due"]  # skipped, or refused
        due: dict[str, list] = {}
        for r in planned:
            if r.status == "due":
                due.setdefault(r.cluster, []).append(parse_scope(r.scope, r".+"))
        with self.service_factory() as service:
            if keeper.held():
                self._settle_stored(service, report, cluster_name)
            for cluster, scopes in due.items():

                def done(result: RotationResult, cluster: str = cluster) -> None:
                    item = self._done(cluster, result, keeper)
                    report.results.append(item)
                    if on_done is not None:
                        on_done(item)

                service.rotate_many(
                    cluster,
                    scopes,
                    actor="scheduler",
                    concurrency=self.concurrency,
                    on_done=done,
                    should_start=keeper.confirm,
                    fence=keeper.guard,
                )

    def _done(
        self, cluster: str, result: RotationResult, keeper: leases.LeaseKeeper
    ) -> ScopeResult:
        """A scope's bookkeeping, by the lease holder only (a runner that lost it writes none)."""
        if keeper.held():
            return self._record(cluster, result.scope, result)
        done = result.failure is None
        return ScopeResult(
            cluster,
            result.scope,
            "rotated" if done else "skipped",
            "lease lost: not recorded" if done else f"lease lost: {result.failure}",
            result.rotation_id,
            result.new_version,
            result.new_fingerprint,
        )

    def _settle_stored(
        self, service: RotationService, report: DueReport, cluster_name: str | None
    ) -> None:
        """Finish rotations whose key is stored but whose process died before the clean-up
        (the TA host still holds a copy of the key) or the check; say which could not be."""
        report.settled = service.settle_stored(
            actor="scheduler",
            stored_before=self.clock() - SETTLE_AFTER,
            cluster_name=cluster_name,
        )
        for result in report.settled:
            if result.failure is not None:
                _log.warning(
                    "could not settle rotation %s of %s: %s",
                    result.rotation_id,
                    result.scope,
                    result.failure.message,
                )

    def _record_run(
        self, started: datetime, report: DueReport, error: BaseException | None
    ) -> None:
        """Release the lease with the run's end; a failure to do so never hides ``error``."""
        try:
            report.recorded = record_run(
                self.factory,
                holder=self.holder,
                started_at=started,
                finished_at=self.clock(),
                report=report,
                error=error,
            )
        except Exception as exc:
            if error is None:
                raise
            # The lease expires on its own; the run's own error is the one to report.
            _log.warning("could not record the failed scheduler run: %s", _one_line(exc))
            return
        if not report.recorded:
            _log.warning("the scheduler lost its lease during the run; its end is not recorded")

    def _record(self, cluster_name: str, scope: str, result: RotationResult) -> ScopeResult:
        now = self.clock()
        with transaction(self.factory) as s:
            keyring = open_keyring(s, settings=self.settings)
            cluster = get_cluster(s, name=cluster_name)
            row = s.scalar(
                select(ScopeSchedule)
                .where(ScopeSchedule.cluster_id == cluster.id, ScopeSchedule.scope == scope)
                .with_for_update()
            )
            if row is None:
                row = ScopeSchedule(
                    cluster_id=cluster.id, scope=scope, consecutive_failures=0, updated_at=now
                )
                s.add(row)
            elif integrity.failure(row, keyring=keyring) is not None:
                # Never re-MAC a row changed outside keyvault: it stays refused (see plan).
                _log.error(
                    "the schedule of %s of %s fails its MAC check; not updated", scope, cluster_name
                )
                row = ScopeSchedule(cluster_id=cluster.id, scope=scope, consecutive_failures=0)
            row.updated_at = now
            if result.failure is None:
                row.consecutive_failures, row.next_attempt_at, row.last_error = 0, None, None
                if row in s:
                    integrity.seal_row(s, row, keyring=keyring)
                return ScopeResult(
                    cluster_name,
                    scope,
                    "rotated",
                    f"v{result.new_version} {result.new_fingerprint}",
                    result.rotation_id,
                    result.new_version,
                    result.new_fingerprint,
                )
            if result.status is ResultStatus.REFUSED:
                # Not this run's failure: the scope waits for an operator's recover.
                if row in s:
                    integrity.seal_row(s, row, keyring=keyring)
                return ScopeResult(
                    cluster_name, scope, "skipped", str(result.failure), result.rotation_id
                )
            item = self._record_failure(s, row, cluster_name, result, now)
            if row in s:
                integrity.seal_row(s, row, keyring=keyring)
            return item

    def _record_failure(
        self,
        s: Session,
        row: ScopeSchedule,
        cluster_name: str,
        result: RotationResult,
        now: datetime,
    ) -> ScopeResult:
        """Count a failure: back off, raise rotation.failed if no journal row did, maybe pause."""
        assert result.failure is not None
        scope, message = result.scope, str(result.failure)
        row.consecutive_failures = (row.consecutive_failures or 0) + 1
        row.last_error = message[:2000]
        row.next_attempt_at = now + backoff(
            row.consecutive_failures, base=self.backoff_base, cap=self.backoff_cap
        )
        payload = {
            "cluster": cluster_name,
            "scope": scope,
            "error": message[:500],
            "source": "scheduler",
            "consecutive_failures": row.consecutive_failures,
            "next_attempt_at": row.next_attempt_at.isoformat(),
            "rotation_id": result.rotation_id,
        }
        if result.failure.rotation_id is None:
            # Errors that name a rotation come after its journal row, which wrote
            # rotation.failed already; the others did not.
            record_event(
                s,
                kind="rotation.failed",
                cluster=cluster_name,
                scope=scope,
                payload=payload,
                at=now,
            )
        if row.consecutive_failures >= self.max_failures and row.paused_at is None:
            row.paused_at = now
            record_event(
                s,
                kind="rotation.paused",
                cluster=cluster_name,
                scope=scope,
                payload=payload,
                at=now,
            )
        return ScopeResult(cluster_name, scope, "failed", message, result.rotation_id)


class SchedulerThread:
    """`rotate due` every ``interval`` seconds inside `keyvault serve --scheduler`.

    Every replica (and every worker of one) may run one: the lease lets one act at a time,
    compared with the database's clock. ``connector``, ``clock`` (also the lease's clock when
    given) and ``on_run`` (called with each run's report, or the exception it raised) are for
    injection; ``poke()`` runs it now instead of at the next interval.
    """

    def __init__(
        self,
        factory: SessionFactory,
        *,
        settings: Settings,
        interval: float | None = None,
        clock: Clock | None = None,
        connector: Connector | None = None,
        on_run: Callable[[object], None] | None = None,
    ) -> None:
        if connector is None:
            from keyvault.ssh.paramiko_transport import connector_from_settings  # noqa: PLC0415 - paramiko: ~0.13 s, on demand

            connector = connector_from_settings(settings)
        self.scheduler = Scheduler(
            factory,
            settings=settings,
            connector=connector,
            clock=clock or utcnow,
            lease_ttl=timedelta(seconds=settings.lease_ttl),
            database_time=clock is None,
        )
        self.interval = settings.scheduler_interval if interval is None else interval
        self.on_run = on_run or (lambda outcome: None)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keyvault-scheduler", daemon=True)

    def start(self) -> None:
        """Start the thread; the first run comes after ``interval`` (or a ``poke``)."""
        self._thread.start()

    def poke(self) -> None:
        """Run now rather than at the end of the current interval."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop after the current run; True when the thread has ended."""
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        log = logging.getLogger("keyvault.scheduler")
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                report = self.scheduler.run()
                if report.lease_acquired and report.results:
                    log.info(
                        "rotate due: %d rotated, %d failed",
                        report.count("rotated"),
                        report.count("failed"),
                    )
                outcome: object = report
            except Exception as exc:  # noqa: BLE001 - the server keeps serving; the next tick tries again
                log.error("scheduled rotation run failed: %s", exc)
                outcome = exc
            try:
                self.on_run(outcome)
            except Exception:  # an observer's failure must not end the scheduler
                log.exception("on_run callback failed")
