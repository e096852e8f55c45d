"""Metrics read from the database at scrape time: the same on every replica.

    keyvault_rotations{cluster,state}                        rotation journal rows by state
    keyvault_rotation_duration_seconds{cluster,outcome}      summary (_count, _sum) of finished
                                                             rotations, created -> last update
    keyvault_unresolved_rotation_age_seconds{cluster}        age of the oldest unresolved rotation
    keyvault_scheduler_last_success_timestamp_seconds        end of its last completed run (0: never)
    keyvault_scheduler_last_run_timestamp_seconds            end of its last run, completed or not
    keyvault_scheduler_last_run_ok                           1: the last run completed; 0: it failed
    keyvault_scheduler_last_run_scope_failures               scopes that failed in the last run
    keyvault_key_age_seconds{cluster,scope}                  age of each current key
    keyvault_key_max_age_seconds{cluster,scope}              its policy's max age (scopes with a policy)
    keyvault_webhook_deliveries{status}                      deliveries by status
    keyvault_consumers{cluster,scope}                        consumers seen reading it in 30 days
    keyvault_stale_consumers{cluster,scope}                  of those, the ones on an older version
    keyvault_old_key_accepted{cluster,scope}                 1: TA accepted the previous key after
                                                             the scope's last rotation (not invalidated)

The scheduler records the end of each run on its lease row (services/scheduler.record_run),
including runs that found nothing due; "completed" counts a run whose scopes failed (those
have their own metrics and alerts). Never run: timestamps 0 and last_run_ok 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any, cast

from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, Float, func, select
from sqlalchemy.orm import Session, sessionmaker

from keyvault.db import transaction
from keyvault.models import (
    CURRENT,
    ROTATE_DUE_LEASE,
    UNRESOLVED_ROTATION_STATES,
    Cluster,
    ConsumerRead,
    Lease,
    Rotation,
    RotationPolicy,
    Secret,
    SecretVersion,
    WebhookDelivery,
    utcnow,
)
from keyvault.services import leases
from keyvault.services.policies import ALL_APPS
from keyvault.services.propagation import current_versions, last_old_key_checks
from keyvault.services.propagation import known as known_reads

FINISHED = ("completed", "failed", "abandoned")
_DurationRows = list[tuple[str, str, int, float | None]]


class StoreCollector(Collector):
    """A prometheus_client collector reading the store on each ``collect``."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory

    def collect(self) -> Iterator[Metric]:
        now = utcnow()
        with transaction(self.factory) as session:
            yield from rotation_metrics(session, now)
            yield from scheduler_metrics(session)
            yield from key_metrics(session, now)
            yield webhook_metric(session)
            yield from propagation_metrics(session, now)
            yield from lease_metrics(session)


def _seconds_between(start: Any, end: Any, dialect: str) -> ColumnElement[Any]:
    """``end - start`` in seconds, in SQL (each database has its own date arithmetic)."""
    if dialect == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.extract("epoch", end - start)


def rotation_metrics(session: Session, now: datetime) -> Iterator[Metric]:
    """Rotations by state, durations by outcome, the oldest unresolved."""
    by_state = GaugeMetricFamily(
        "keyvault_rotations", "Rotation journal rows by state", labels=["cluster", "state"]
    )
    for cluster, state, count in session.execute(
        select(Cluster.name, Rotation.state, func.count())
        .join(Cluster)
        .group_by(Cluster.name, Rotation.state)
    ):
        by_state.add_metric([cluster, state], count)
    yield by_state
    yield _durations(session)
    oldest = GaugeMetricFamily(
        "keyvault_unresolved_rotation_age_seconds",
        "Age of the oldest unresolved (pending or needs_recovery) rotation",
        labels=["cluster"],
    )
    for cluster, created in session.execute(
        select(Cluster.name, func.min(Rotation.created_at))
        .join(Cluster)
        .where(Rotation.state.in_(UNRESOLVED_ROTATION_STATES))
        .group_by(Cluster.name)
    ):
        oldest.add_metric([cluster], (now - created).total_seconds())
    yield oldest


def scheduler_metrics(session: Session) -> Iterator[Metric]:
    """The scheduler's last run and last completed run, from its lease row."""
    lease = session.get(Lease, ROTATE_DUE_LEASE)

    def stamp(at: datetime | None) -> float:
        return at.timestamp() if at is not None else 0.0

    last_run = stamp(lease.last_finished_at) if lease else 0.0
    yield GaugeMetricFamily(
        "keyvault_scheduler_last_success_timestamp_seconds",
        "When the scheduler last completed a run, due scopes or not (Unix time; 0: never)",
        value=stamp(lease.last_success_at) if lease else 0.0,
    )
    yield GaugeMetricFamily(
        "keyvault_scheduler_last_run_timestamp_seconds",
        "When the scheduler's last run ended, completed or failed (Unix time; 0: never)",
        value=last_run,
    )
    completed = lease is not None and lease.last_outcome in ("ok", "partial")
    yield GaugeMetricFamily(
        "keyvault_scheduler_last_run_ok",
        "1 when the scheduler's last run completed (scope failures included), 0 when it failed or never ran",
        value=1.0 if completed else 0.0,
    )
    yield GaugeMetricFamily(
        "keyvault_scheduler_last_run_scope_failures",
        "Scopes whose rotation failed in the scheduler's last run",
        value=float((lease.last_failed or 0) if lease else 0),
    )


def _durations(session: Session) -> Metric:
    family = SummaryMetricFamily(
        "keyvault_rotation_duration_seconds",
        "Finished rotations by outcome: from start to the last update of the journal row",
        labels=["cluster", "outcome"],
    )
    dialect = session.get_bind().dialect.name
    seconds = _seconds_between(Rotation.created_at, Rotation.updated_at, dialect)
    total = func.sum(seconds, type_=Float)
    rows = session.execute(
        select(Cluster.name, Rotation.state, func.count(), total)
        .join(Cluster)
        .where(Rotation.state.in_(FINISHED))
        .group_by(Cluster.name, Rotation.state)
    ).all()
    for cluster, outcome, count, total_seconds in cast(_DurationRows, rows):
        family.add_metric([cluster, outcome], count_value=count, sum_value=total_seconds or 0.0)
    return family


def key_metrics(session: Session, now: datetime) -> Iterator[Metric]:
    """The age of each current key, and its policy's max age where a policy covers it."""
    age = GaugeMetricFamily(
        "keyvault_key_age_seconds", "Age of each current key", labels=["cluster", "scope"]
    )
    max_age = GaugeMetricFamily(
        "keyvault_key_max_age_seconds",
        "The max age the rotation policy allows each current key (scopes with a policy)",
        labels=["cluster", "scope"],
    )
    policies: dict[str, dict[str, int]] = {}
    for cluster, target, seconds in session.execute(
        select(Cluster.name, RotationPolicy.target, RotationPolicy.max_age_seconds).join(Cluster)
    ):
        policies.setdefault(cluster, {})[target] = seconds
    for cluster, scope, created in session.execute(
        select(Cluster.name, Secret.scope, SecretVersion.created_at)
        .join(Secret, SecretVersion.secret_id == Secret.id)
        .join(Cluster, Secret.cluster_id == Cluster.id)
        .where(SecretVersion.state == CURRENT)
    ):
        age.add_metric([cluster, scope], (now - created).total_seconds())
        limit = _max_age(policies.get(cluster, {}), scope)
        if limit is not None:
            max_age.add_metric([cluster, scope], limit)
    yield age
    yield max_age


def _max_age(targets: dict[str, int], scope: str) -> int | None:
    # A policy for the scope itself beats the cluster's all-apps policy (as in `rotate due`).
    if scope in targets:
        return targets[scope]
    return targets.get(ALL_APPS) if scope.startswith("app:") else None


def webhook_metric(session: Session) -> Metric:
    """Webhook deliveries by status (pending, delivered, dead)."""
    family = GaugeMetricFamily(
        "keyvault_webhook_deliveries", "Webhook deliveries by status", labels=["status"]
    )
    for status, count in session.execute(
        select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
    ):
        family.add_metric([status], count)
    return family


def propagation_metrics(session: Session, now: datetime) -> Iterator[Metric]:
    """Known and stale consumers per scope; scopes whose last rotation left the old key alive."""
    known = GaugeMetricFamily(
        "keyvault_consumers",
        "Consumers (token and consumer name) seen reading the scope's key in the last 30 days",
        labels=["cluster", "scope"],
    )
    stale = GaugeMetricFamily(
        "keyvault_stale_consumers",
        "Consumers seen in the last 30 days whose last read was an older version than the current",
        labels=["cluster", "scope"],
    )
    current = current_versions(session)
    counts: dict[tuple[str, str], list[int]] = {}
    for cluster, scope, version, count in session.execute(
        select(ConsumerRead.cluster, ConsumerRead.scope, ConsumerRead.version, func.count())
        .where(known_reads(now))
        .group_by(ConsumerRead.cluster, ConsumerRead.scope, ConsumerRead.version)
    ):
        figures = counts.setdefault((cluster, scope), [0, 0])
        figures[0] += count
        now_at = current.get((cluster, scope))
        if now_at is None or version < now_at:
            figures[1] += count
    for (cluster, scope), (total, old) in sorted(counts.items()):
        known.add_metric([cluster, scope], total)
        stale.add_metric([cluster, scope], old)
    yield known
    yield stale
    yield _old_key_accepted(session)


def _old_key_accepted(session: Session) -> Metric:
    family = GaugeMetricFamily(
        "keyvault_old_key_accepted",
        "1 when TA still accepted the previous key after the scope's last rotation",
        labels=["cluster", "scope"],
    )
    for cluster, scope, _, old_key in last_old_key_checks(session):
        family.add_metric([cluster, scope], 1.0 if old_key == "still_accepted" else 0.0)
    return family


def lease_metrics(session: Session) -> Iterator[Metric]:
    """Each lease (services/leases.py): held or not, by whom, until when, how many takeovers."""
    now = leases.database_now(session)
    held = GaugeMetricFamily(
        "keyvault_lease_held",
        "1 while some runner holds the lease (by the database's clock), 0 while it is free or expired",
        labels=["name"],
    )
    holder = GaugeMetricFamily(
        "keyvault_lease_holder",
        "1 for the lease's live holder (host:pid:instance)",
        labels=["name", "holder"],
    )
    expires = GaugeMetricFamily(
        "keyvault_lease_expires_timestamp_seconds",
        "When the lease expires unless renewed (Unix time; 0: free)",
        labels=["name"],
    )
    epoch = GaugeMetricFamily(
        "keyvault_lease_epoch",
        "Acquisitions of the lease so far (a change: a new holder)",
        labels=["name"],
    )
    for info in leases.read_all(session):
        alive = leases.live(info, now)
        held.add_metric([info.name], 1.0 if alive else 0.0)
        if alive and info.holder is not None:
            holder.add_metric([info.name, info.holder], 1.0)
        expires.add_metric([info.name], info.expires_at.timestamp() if info.expires_at else 0.0)
        epoch.add_metric([info.name], float(info.epoch))
    yield from (held, holder, expires, epoch)
