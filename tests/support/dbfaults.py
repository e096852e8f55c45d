"""Database faults for the fault loops (tests/support/faultloop.py): a database that goes away.

PostgreSQL (through the admin connection of ``tests.support.db``, never the store's own):

    terminate_backends(server_url, db)       # pg_terminate_backend of every session on db
    with refusing_connections(server_url, db):  # ALLOW_CONNECTIONS false ... then true again
        ...

SQLite (a file; the store's process keeps its open connections):

    with exclusive_lock(path): ...           # BEGIN EXCLUSIVE from another connection
    with vanished(path): ...                 # the database file renamed away, then back

Each fault is undone on every path out of its block. ``refusing_connections`` also
registers an ``atexit`` restore and :func:`restore_all` is called by the loop's own
``finally``: a crashed test never leaves a database that nobody can connect to.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from tests.support.db import admin_engine

_REFUSED: set[tuple[str, str]] = set()
_REFUSED_LOCK = threading.Lock()


def _admin_sql(server_url: str, sql: str, params: dict | None = None) -> int:
    from sqlalchemy import text

    engine = admin_engine(server_url)
    try:
        with engine.connect() as conn:
            result = conn.execute(text(sql), params or {})
            return result.rowcount if result.returns_rows is False else len(result.all())
    finally:
        engine.dispose()


def terminate_backends(server_url: str, db_name: str) -> int:
    """Cut every connection to ``db_name`` (as a failover or an admin would); how many."""
    return _admin_sql(
        server_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = :name AND pid <> pg_backend_pid()",
        {"name": db_name},
    )


def _allow_connections(server_url: str, db_name: str, allow: bool) -> None:
    # The name comes from tests.support.db (kv_test_<hex>), never from outside.
    flag = "true" if allow else "false"
    _admin_sql(server_url, f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS {flag}')


def restore_all() -> None:
    """Allow connections again on every database a fault refused (idempotent)."""
    with _REFUSED_LOCK:
        refused = list(_REFUSED)
    for server_url, db_name in refused:
        _allow_connections(server_url, db_name, True)
        with _REFUSED_LOCK:
            _REFUSED.discard((server_url, db_name))


atexit.register(restore_all)


@contextlib.contextmanager
def refusing_connections(server_url: str, db_name: str, *, cut: bool) -> Iterator[None]:
    """New connections to ``db_name`` are refused inside the block; with ``cut`` the open
    ones are terminated too (else a process keeps working on the ones it holds)."""
    with _REFUSED_LOCK:
        _REFUSED.add((server_url, db_name))
    try:
        _allow_connections(server_url, db_name, False)
        if cut:
            terminate_backends(server_url, db_name)
        yield
    finally:
        restore_all()


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Another connection holds SQLite's exclusive lock on ``path`` inside the block
    (writers wait their busy timeout, then fail)."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        conn.close()


class HarnessRace(RuntimeError):
    """Something created a new file where the database was renamed away from."""


@contextlib.contextmanager
def vanished(path: Path) -> Iterator[None]:
    """The database file is not at ``path`` inside the block (renamed aside, then back).

    Only the main file moves: open connections keep working on it and its WAL, and a new
    connection finds no database (keyvault refuses to create one there). Moving the WAL
    of a live database would corrupt it, which is not a fault keyvault can answer for.
    """
    aside = path.with_name(path.name + ".away")
    os.rename(path, aside)
    try:
        yield
    finally:
        if path.exists():  # sqlite created an empty file in the instant of a race
            raise HarnessRace(f"{path} was re-created while the database was away")
        os.rename(aside, path)
