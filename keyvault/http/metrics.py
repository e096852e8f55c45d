"""Prometheus metrics, named by Prometheus conventions (units in names, ``_total`` counters).

Per server (each replica counts its own requests; its workers add up):

    keyvault_http_requests_total{method,route,code}            counter
    keyvault_http_request_duration_seconds{method,route}       histogram
    keyvault_build_info{version}                               always 1

From the database at scrape time (the same on every replica): see ``store_metrics.py``.
``route`` is the route template (``/v1/clusters/{cluster}/apps/{appid}``, or ``unmatched``),
so label values stay few whatever paths clients send.

With ``serve --workers N`` (N > 1) the workers share one scrape through prometheus_client's
multiprocess mode: ``serve`` creates a private (0700) directory, empty, names it in
``PROMETHEUS_MULTIPROC_DIR`` for the workers it spawns, and removes it when it exits
(``multiprocess_dir``). Each worker writes its counters to its own memory-mapped files there;
a scrape, whichever worker answers it, sums the files of every worker that ever ran in this
server, so a worker that died or was restarted (uvicorn replaces it) still counts: counters
never go back. ``keyvault_build_info`` is aggregated with ``max`` (1 whatever the workers).
The store's gauges are read from the database by the worker answering the scrape, not
written to files (they are the same in every worker). One worker: a plain registry.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy.orm import Session, sessionmaker

import keyvault
from keyvault.http.store_metrics import StoreCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# prometheus_client reads it once, when first imported: it must be set before a worker starts.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def multiprocess_dir() -> Iterator[str]:
    """A new private directory for the workers' metric files, in ``MULTIPROC_ENV`` while the
    block runs (the workers started in it inherit it), removed afterwards."""
    # mkdtemp: a fresh, empty directory (nothing left by an earlier server), mode 0700 (the
    # counts are this server's business only). Any PROMETHEUS_MULTIPROC_DIR given is replaced.
    path = tempfile.mkdtemp(prefix="keyvault-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


class Metrics:
    """The request metrics of one server process, and the registry a scrape renders."""

    def __init__(self) -> None:
        multiproc_dir = os.environ.get(MULTIPROC_ENV)
        # Files or memory is decided by prometheus_client at import, from the same variable.
        multiprocess = bool(getattr(values.ValueClass, "_multiprocess", False))
        if bool(multiproc_dir) != multiprocess:
            raise RuntimeError(f"{MULTIPROC_ENV} was set or unset after prometheus_client loaded")
        self.registry = CollectorRegistry()
        own = None if multiprocess else self.registry  # files: the collector reads them all
        if multiproc_dir:
            MultiProcessCollector(self.registry, path=multiproc_dir)
        self.requests = Counter(
            "keyvault_http_requests",
            "HTTP requests answered, by method, route template and status code",
            ["method", "route", "code"],
            registry=own,
        )
        self.duration = Histogram(
            "keyvault_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template",
            ["method", "route"],
            buckets=BUCKETS,
            registry=own,
        )
        build = Gauge(
            "keyvault_build_info",
            "The running keyvault version",
            ["version"],
            registry=own,
            multiprocess_mode="max",
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
