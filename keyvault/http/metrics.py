"""Prometheus metrics, named by Prometheus conventions (units in names, ``_total`` counters).

Per process (each replica and worker counts its own requests):

    keyvault_http_requests_total{method,route,code}            counter
    keyvault_http_request_duration_seconds{method,route}       histogram
    keyvault_build_info{version}                               always 1

From the database at scrape time (the same on every replica): see ``store_metrics.py``.
``route`` is the route template (``/v1/clusters/{cluster}/apps/{appid}``, or ``unmatched``),
so label values stay few whatever paths clients send.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy.orm import Session, sessionmaker

import keyvault
from keyvault.http.store_metrics import StoreCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    """The registry of one server process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "keyvault_http_requests",
            "HTTP requests answered, by method, route template and status code",
            ["method", "route", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "keyvault_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template",
            ["method", "route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        build = Gauge(
            "keyvault_build_info",
            "The running keyvault version",
            ["version"],
            registry=self.registry,
        )
        build.labels(keyvault.__version__).set(1)
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe(self, method: str, route: str, code: int, seconds: float) -> None:
        """Count one answered request and its duration."""
        key = (method, route, code)
        children = self._children.get(key)
        if children is None:  # labels() costs a lock and a dict walk: once per label set
            children = self._children[key] = (
                self.requests.labels(method, route, str(code)),
                self.duration.labels(method, route),
            )
        counter, histogram = children
        counter.inc()
        histogram.observe(seconds)

    def attach_database(self, factory: sessionmaker[Session]) -> None:
        """Also export the store's state, read at each scrape."""
        self.registry.register(StoreCollector(factory))

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)
