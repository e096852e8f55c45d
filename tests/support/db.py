"""The database fixtures of the keyvault test suite (a plugin, see tests/conftest.py).

Every database test runs twice, through the ``db_url`` fixture: on SQLite (a file in
``tmp_path``) and on PostgreSQL (a fresh database ``kv_test_<random>`` per test, dropped
at teardown). Both are at schema head made by the real ``alembic upgrade head`` through
``keyvault.db.upgrade``: once per session and backend into a template (an SQLite file, a
PostgreSQL database), which each test's database is a copy of (a file copy; ``CREATE
DATABASE ... TEMPLATE``), ~0.1-0.3 s less per test than migrating each. ``blank_database``/
``blank_db_url`` are the same without a schema (the migrations' own tests use them);
``engine`` is an engine on ``db_url``.

PostgreSQL: ``KEYVAULT_TEST_POSTGRES_URL`` names the server (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``; its database is only used to
create and drop the per-test databases). If the server is unreachable the
PostgreSQL tests are skipped, unless ``KEYVAULT_TEST_REQUIRE_POSTGRES=1``: then they
fail, so CI cannot pass with the database tests silently skipped.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
POSTGRES_URL_VAR = "KEYVAULT_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_VAR = "KEYVAULT_TEST_REQUIRE_POSTGRES"


def postgres_server_url() -> str:
    return os.environ.get(POSTGRES_URL_VAR) or DEFAULT_POSTGRES_URL


def _require_postgres() -> bool:
    return os.environ.get(REQUIRE_POSTGRES_VAR, "") not in ("", "0")


def admin_engine(server_url: str):
    """An AUTOCOMMIT engine on the server's maintenance database, without pooling."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from keyvault.db import normalize_url

    return create_engine(
        normalize_url(server_url),
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
        connect_args={"connect_timeout": 5},
    )


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The PostgreSQL server URL, checked once per session: skip (or fail) if it is down."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    url = postgres_server_url()
    engine = admin_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()
        message = (
            f"PostgreSQL at {_hide_password(url)} is unreachable "
            f"({reason[0] if reason else type(exc).__name__}); "
            f"start it or set {POSTGRES_URL_VAR}"
        )
        if _require_postgres():
            pytest.fail(f"{message} ({REQUIRE_POSTGRES_VAR}=1 forbids skipping)", pytrace=False)
        pytest.skip(message)
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="session")
def postgres_url(postgres_server: str) -> str:
    """The PostgreSQL server URL, for a test that makes its own databases (marked ``postgres``)."""
    return postgres_server


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@dataclass(frozen=True)
class PostgresDatabase:
    """A scratch database on the test server."""

    server_url: str
    name: str

    @property
    def url(self) -> str:
        from sqlalchemy.engine import make_url

        from keyvault.db import normalize_url

        return (
            make_url(normalize_url(self.server_url))
            .set(database=self.name)
            .render_as_string(hide_password=False)
        )


def create_postgres_database(server_url: str, template: str | None = None) -> PostgresDatabase:
    """A new empty database, or a copy of the database ``template`` (nobody connected to it)."""
    from sqlalchemy import text

    name = f"kv_test_{secrets.token_hex(6)}"
    engine = admin_engine(server_url)
    try:
        with engine.connect() as conn:
            copy = f' TEMPLATE "{template}"' if template else ""
            conn.execute(text(f'CREATE DATABASE "{name}"{copy}'))
    finally:
        engine.dispose()
    return PostgresDatabase(server_url=server_url, name=name)


def drop_postgres_database(db: PostgresDatabase) -> None:
    """Terminate whatever still talks to the database, then drop it."""
    from sqlalchemy import text

    engine = admin_engine(db.server_url)
    try:
        with engine.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": db.name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db.name}"'))
    finally:
        engine.dispose()


@dataclass(frozen=True)
class Database:
    """What a test knows about its database."""

    backend: str  # "sqlite" or "postgres"
    url: str
    name: str  # the PostgreSQL database name, or the SQLite file path
    server_url: str | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.backend == "sqlite"

    @property
    def is_postgres(self) -> bool:
        return self.backend == "postgres"

    @property
    def sqlite_path(self) -> Path:
        assert self.is_sqlite
        return Path(self.name)


def _migrate(url: str) -> None:
    from keyvault.db import make_engine, upgrade

    engine = make_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """An SQLite file at schema head (the real migrations, once per session); copied, never
    opened by a test."""
    path = tmp_path_factory.mktemp("sqlite-template") / "keyvault.db"
    _migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_template(postgres_server: str) -> Iterator[str]:
    """The name of a PostgreSQL database at schema head (the real migrations, once per
    session, per xdist worker), closed to connections: only copied, by CREATE DATABASE."""
    from sqlalchemy import text

    pg = create_postgres_database(postgres_server)
    try:
        _migrate(pg.url)
        engine = admin_engine(postgres_server)
        try:
            with engine.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{pg.name}" ALLOW_CONNECTIONS false'))
        finally:
            engine.dispose()
        yield pg.name
    finally:
        drop_postgres_database(pg)


@pytest.fixture(
    params=[pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)]
)
def blank_database(request, tmp_path_factory) -> Iterator[Database]:
    """A fresh, empty database (no schema) on SQLite or PostgreSQL; at schema head when the
    test asks for ``database`` (which would migrate this one): then it is made as a copy of
    the session's migrated template instead."""
    migrated = "database" in request.fixturenames
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "keyvault.db"
        if migrated:
            shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield Database(backend="sqlite", url=f"sqlite:///{path}", name=str(path))
        return
    server = request.getfixturevalue("postgres_server")
    template = request.getfixturevalue("postgres_template") if migrated else None
    pg = create_postgres_database(server, template=template)
    try:
        yield Database(backend="postgres", url=pg.url, name=pg.name, server_url=server)
    finally:
        drop_postgres_database(pg)


@pytest.fixture
def database(blank_database: Database) -> Database:
    """A fresh database at schema head: ``blank_database`` made as a copy of the session's
    template, which the real alembic migrations brought to head."""
    return blank_database


@pytest.fixture
def blank_db_url(blank_database: Database) -> str:
    """The URL of a fresh database without any schema."""
    return blank_database.url


@pytest.fixture
def db_url(database: Database) -> str:
    """The URL of a fresh database at schema head, on SQLite and on PostgreSQL."""
    return database.url


@pytest.fixture
def engine(db_url: str):
    """An engine on ``db_url`` with keyvault's connection policy; disposed at teardown."""
    from keyvault.db import make_engine

    eng = make_engine(db_url)
    yield eng
    eng.dispose()


# ------------------------------------------------------------------------- store dumps

# Every backup and restore command is audited (intent, then outcome), whatever it did.
# And the chain's own key records: a restore starts a chain key (a chained record naming it),
# and its copies of the backup's key records are renamed (``audit_merge._copy``).
AUDITED_ATTEMPTS = frozenset(
    {
        "backup",
        "restore",
        "audit.restored",
        "audit.chain_key_started",
        "audit.chain_key_started.copy",
    }
)
# The audit chain's bookkeeping: a restore keeps the store's chain and appends copies of the
# backup's records to it (new ids, MACs and a new chain key), so these never compare equal.
CHAIN_TABLES = ("audit_chain", "audit_chain_keys")
CHAIN_COLUMNS = ("id", "intent_id", "chain_key_id", "chain_mac")


def dump_store(url: str) -> dict[str, list[dict]]:
    """Every row of every table a backup holds, by primary key (bytes stay bytes)."""
    from sqlalchemy import select

    from keyvault.db import make_engine
    from keyvault.services.backup import backup_tables

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {
                t.name: [
                    dict(r._mapping)
                    for r in conn.execute(select(t).order_by(*t.primary_key.columns))
                ]
                for t in backup_tables()
            }
    finally:
        engine.dispose()


def comparable(dump: dict[str, list[dict]], *, revision: bool = True) -> dict[str, list]:
    """``dump`` as it compares across backup and restore attempts: without the audit records
    of those attempts, audit records without their ids (a restore renumbers the records it
    merges), without the audit chain's MACs and tables, and without the revision counter
    when ``revision`` is false."""
    rest = {
        name: rows
        for name, rows in dump.items()
        if (revision or name != "revision") and name not in CHAIN_TABLES
    }
    rest["audit_log"] = sorted(
        (
            {k: v for k, v in r.items() if k not in CHAIN_COLUMNS}
            for r in dump["audit_log"]
            if r["action"] not in AUDITED_ATTEMPTS
        ),
        key=lambda r: (r["at"], r["action"], r.get("phase") or ""),
    )
    return rest


def run_sql(url: str, statement: str, **params) -> list:
    """Run one SQL statement on ``url`` in its own transaction (a hostile writer, or a
    check behind keyvault's back); the rows it returned, if any."""
    from sqlalchemy import text

    from keyvault.db import make_engine

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(statement), params)
            return list(result) if result.returns_rows else []
    finally:
        engine.dispose()


@contextlib.contextmanager
def lock_held(engine, *, sqlite: str, postgres: str) -> Iterator[None]:
    """Another connection holds a lock until the block ends: on SQLite the transaction
    ``sqlite`` begins (``BEGIN IMMEDIATE``, ``BEGIN EXCLUSIVE``), on PostgreSQL the
    ``postgres`` statement in an open transaction (a ``LOCK TABLE``)."""
    from sqlalchemy import text

    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.connection.driver_connection.execute(sqlite)
        else:
            conn.begin()
            conn.execute(text(postgres))
        try:
            yield
        finally:
            if engine.dialect.name == "sqlite":
                conn.connection.driver_connection.execute("ROLLBACK")
            else:
                conn.rollback()


def audit_appends_held(engine):
    """What an audit append needs is held, while key, token and revision reads still answer:
    SQLite's write lock (WAL readers go on), or the chain's head on PostgreSQL (SELECT goes
    on)."""
    return lock_held(
        engine, sqlite="BEGIN IMMEDIATE", postgres="LOCK TABLE audit_chain IN EXCLUSIVE MODE"
    )
