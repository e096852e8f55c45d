"""Metrics read from the database at scrape time: the same on every replica.

    keyvault_rotations{cluster,state}                        rotation journal rows by state
    keyvault_rotation_duration_seconds{cluster,outcome}      summary (_count, _sum) of finished
                                                             rotations, created -> last update
    keyvault_unresolved_rotation_age_seconds{cluster}        age of the oldest unresolved rotation
    keyvault_scheduler_last_success_timestamp_seconds        last scope the scheduler rotated (0: never)
    keyvault_key_age_seconds{cluster,scope}                  age of each current key
    keyvault_key_max_age_seconds{cluster,scope}              its policy's max age (scopes with a policy)
    keyvault_webhook_deliveries{status}                      deliveries by status

The scheduler leaves no row for a run that found nothing due, so its timestamp is that of the
last *rotation* it completed; an alert pairs it with an overdue key (ops/prometheus).
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
    UNRESOLVED_ROTATION_STATES,
    Cluster,
    Rotation,
    RotationPolicy,
    Secret,
    SecretVersion,
    WebhookDelivery,
    utcnow,
)
from keyvault.services.policies import ALL_APPS

FINISHED = ("completed", "failed", "abandoned")
SUCCEEDED = ("stored", "completed")
SCHEDULER_ACTOR = "scheduler"
_DurationRows = list[tuple[str, str, int, float | None]]


class StoreCollector(Collector):
    """A prometheus_client collector reading the store on each ``collect``."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory

    def collect(self) -> Iterator[Metric]:
        now = utcnow()
        with transaction(self.factory) as session:
            yield from rotation_metrics(session, now)
            yield from key_metrics(session, now)
            yield webhook_metric(session)


def _seconds_between(start: Any, end: Any, dialect: str) -> ColumnElement[Any]:
    """``end - start`` in seconds, in SQL (each database has its own date arithmetic)."""
    if dialect == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.extract("epoch", end - start)


def rotation_metrics(session: Session, now: datetime) -> Iterator[Metric]:
    """Rotations by state, durations by outcome, the oldest unresolved, the scheduler's last."""
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
    last = session.scalar(
        select(func.max(Rotation.updated_at)).where(
            Rotation.actor == SCHEDULER_ACTOR, Rotation.state.in_(SUCCEEDED)
        )
    )
    yield GaugeMetricFamily(
        "keyvault_scheduler_last_success_timestamp_seconds",
        "When the scheduler last rotated a key successfully (Unix time; 0: never)",
        value=last.timestamp() if last is not None else 0.0,
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
