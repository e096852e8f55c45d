"""Prometheus metrics: requests and latencies by route (this process), and from
the database at scrape time: rotations by state, webhook deliveries by status,
and the age of each current key (the same for every replica)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from keyvault.models import (
    CURRENT,
    Cluster,
    Rotation,
    Secret,
    SecretVersion,
    WebhookDelivery,
    utcnow,
)

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    """A registry per process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "keyvault_http_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "keyvault_http_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._children: dict = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(route, str(status)),
                self.latency.labels(route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def attach_database(self, factory) -> None:
        self.registry.register(_DatabaseCollector(factory))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _DatabaseCollector:
    def __init__(self, factory) -> None:
        self.factory = factory

    def collect(self):
        from keyvault.db import transaction

        rotations = GaugeMetricFamily(
            "keyvault_rotations", "Rotations by state", labels=["cluster", "state"]
        )
        deliveries = GaugeMetricFamily(
            "keyvault_webhook_deliveries", "Webhook deliveries by status", labels=["status"]
        )
        age = GaugeMetricFamily(
            "keyvault_key_age_seconds", "Age of each current key", labels=["cluster", "scope"]
        )
        with transaction(self.factory) as s:
            for cluster, state, count in s.execute(
                select(Cluster.name, Rotation.state, func.count())
                .join(Cluster)
                .group_by(Cluster.name, Rotation.state)
            ):
                rotations.add_metric([cluster, state], count)
            for status, count in s.execute(
                select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
            ):
                deliveries.add_metric([status], count)
            now = utcnow()
            for cluster, scope, created in s.execute(
                select(Cluster.name, Secret.scope, SecretVersion.created_at)
                .join(Secret, SecretVersion.secret_id == Secret.id)
                .join(Cluster, Secret.cluster_id == Cluster.id)
                .where(SecretVersion.state == CURRENT)
            ):
                created = created if created.tzinfo else created.replace(tzinfo=now.tzinfo)
                age.add_metric([cluster, scope], (now - created).total_seconds())
        yield rotations
        yield deliveries
        yield age
