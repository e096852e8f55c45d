"""Waiting, without sleeps as synchronisation, until a server has heard of a change.

On PostgreSQL a ``keyvault serve`` learns the revision from NOTIFY (keyvault/http/
revision_listener.py): a change committed by another process reaches it a moment later (at
most ``--revision-recheck-ms`` later if the notification is lost). ``wait_heard`` polls the
server's ``/metrics`` (bounded) until its listener reports the database's current revision,
or until it is not listening (then every request reads the counter itself). On SQLite it
returns at once: every request reads the counter.
"""

from __future__ import annotations

import re
import time

import httpx
from sqlalchemy import create_engine, text

from keyvault.db import normalize_url
from tests.support.timeouts import TIMEOUT

_METRIC = re.compile(r"^(keyvault_revision_[a-z_]+) (\S+)$", re.MULTILINE)


def revision_metrics(url: str) -> dict[str, float]:
    """The ``keyvault_revision_*`` metrics of the server at ``url`` (none on SQLite)."""
    with httpx.Client(base_url=url, timeout=15.0, trust_env=False) as http:
        body = http.get("/metrics").text
    return {name: float(value) for name, value in _METRIC.findall(body)}


def database_revision(db_url: str) -> int:
    """The revision counter, read on a connection of its own."""
    engine = create_engine(normalize_url(db_url))
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT value FROM revision WHERE id = 1")).scalar_one())
    finally:
        engine.dispose()


def wait_heard(url: str, db_url: str) -> None:
    """Until the server at ``url`` uses the database's current revision (bounded poll)."""
    if db_url.startswith("sqlite"):
        return
    revision = database_revision(db_url)
    deadline = time.monotonic() + TIMEOUT
    while True:
        metrics = revision_metrics(url)
        if metrics.get("keyvault_revision_listener_connected", 0) == 0:
            return  # not listening: its next request reads the counter itself
        if metrics.get("keyvault_revision_heard", -1) >= revision:
            return
        assert time.monotonic() < deadline, f"the server never heard of revision {revision}"
        time.sleep(0.02)  # the pause between polls (the condition is what is waited for)
