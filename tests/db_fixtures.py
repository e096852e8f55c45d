"""Database and CLI fixtures shared by the keyvault test suite.

Imported by ``tests/conftest.py``. Every database test runs twice, through the
``db_url`` fixture: on SQLite (a file in ``tmp_path``) and on PostgreSQL (a fresh
database ``kv_test_<random>`` per test, dropped at teardown). Both are migrated by
the real ``alembic upgrade head`` through ``keyvault.db.upgrade``.

PostgreSQL: ``KEYVAULT_TEST_POSTGRES_URL`` names the server (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``; its database is only used to
create and drop the per-test databases). If the server is unreachable the
PostgreSQL tests are skipped, unless ``KEYVAULT_TEST_REQUIRE_POSTGRES=1``: then they
fail, so CI cannot pass with the database tests silently skipped.

``env`` gives an isolated ``KEYVAULT_HOME`` / ``KEYVAULT_DATABASE_URL`` /
``KEYVAULT_MASTER_KEY_FILE`` (set in ``os.environ`` with ``monkeypatch``, which is
how the CLI and any subprocess read their configuration), and ``cli`` runs
``keyvault.cli.main`` with click's ``CliRunner`` in that environment.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path

import pytest

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
POSTGRES_URL_VAR = "KEYVAULT_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_VAR = "KEYVAULT_TEST_REQUIRE_POSTGRES"
BACKENDS = ("sqlite", "postgres")

KEY_ALPHABET = string.ascii_letters + string.digits


# SHA-256 of every key new_key() made, where tests/leak_guard.py looks for them
# (a ``generated.sha256`` under pytest's basetemp): the run fails if one is printed.
KEY_LOG_NAME = "generated.sha256"
_key_log: Path | None = None


def new_key(length: int = 64) -> str:
    """A random key in TA's shape ([A-Za-z0-9]{64}); never print it."""
    key = "".join(secrets.choice(KEY_ALPHABET) for _ in range(length))
    if _key_log is not None:
        with open(_key_log, "a", encoding="ascii") as log:
            log.write(hashlib.sha256(key.encode()).hexdigest() + "\n")
    return key


def _log_keys_under(basetemp: Path) -> None:
    global _key_log
    directory = basetemp / "db-fixtures-keys"
    directory.mkdir(exist_ok=True)
    _key_log = directory / KEY_LOG_NAME


def postgres_server_url() -> str:
    return os.environ.get(POSTGRES_URL_VAR) or DEFAULT_POSTGRES_URL


def _require_postgres() -> bool:
    return os.environ.get(REQUIRE_POSTGRES_VAR, "") not in ("", "0")


def _admin_engine(server_url: str):
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
    engine = _admin_engine(url)
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


def create_postgres_database(server_url: str) -> PostgresDatabase:
    from sqlalchemy import text

    name = f"kv_test_{secrets.token_hex(6)}"
    engine = _admin_engine(server_url)
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return PostgresDatabase(server_url=server_url, name=name)


def drop_postgres_database(db: PostgresDatabase) -> None:
    """Terminate whatever still talks to the database, then drop it."""
    from sqlalchemy import text

    engine = _admin_engine(db.server_url)
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


@pytest.fixture(
    params=[pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)]
)
def blank_database(request, tmp_path_factory) -> Database:
    """A fresh, empty database (no schema) on SQLite or PostgreSQL."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "keyvault.db"
        yield Database(backend="sqlite", url=f"sqlite:///{path}", name=str(path))
        return
    server = request.getfixturevalue("postgres_server")
    pg = create_postgres_database(server)
    try:
        yield Database(backend="postgres", url=pg.url, name=pg.name, server_url=server)
    finally:
        drop_postgres_database(pg)


@pytest.fixture
def database(blank_database: Database) -> Database:
    """``blank_database`` migrated to head by the real alembic migrations."""
    from keyvault.db import make_engine, upgrade

    engine = make_engine(blank_database.url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
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


@dataclass(frozen=True)
class Home:
    """An isolated keyvault home and the environment that points at it."""

    path: Path
    database_url: str
    master_key_file: Path
    env: dict

    @property
    def config_file(self) -> Path:
        return self.path / "keyvault.toml"


def clear_keyvault_env(monkeypatch) -> None:
    """Remove the caller's KEYVAULT_* settings (not the KEYVAULT_TEST_* switches)."""
    for name in list(os.environ):
        if name.startswith("KEYVAULT_") and not name.startswith("KEYVAULT_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def home(tmp_path_factory, db_url: str, monkeypatch) -> Home:
    """KEYVAULT_HOME (not yet created), KEYVAULT_DATABASE_URL and KEYVAULT_MASTER_KEY_FILE,
    set in ``os.environ`` for the CLI and for subprocesses."""
    _log_keys_under(tmp_path_factory.getbasetemp())
    path = tmp_path_factory.mktemp("kvhome") / "home"
    master_key_file = path / "master.key"
    env = {
        "KEYVAULT_HOME": str(path),
        "KEYVAULT_DATABASE_URL": db_url,
        "KEYVAULT_MASTER_KEY_FILE": str(master_key_file),
        "KEYVAULT_ACTOR": "pytest",
    }
    clear_keyvault_env(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Home(path=path, database_url=db_url, master_key_file=master_key_file, env=env)


@pytest.fixture
def env(home: Home) -> dict:
    """The environment dict of ``home`` (already applied to ``os.environ``)."""
    return dict(home.env)


class Cli:
    """Runs ``keyvault`` in-process with click's CliRunner (separate stdout and stderr)."""

    def __init__(self) -> None:
        from click.testing import CliRunner

        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | bytes | None = None):  # noqa: A002
        from keyvault.cli import main

        return self.runner.invoke(main, list(args), input=input, catch_exceptions=False)


@pytest.fixture
def cli(env) -> Cli:
    """``cli("secrets", "list", "--json")`` → click Result, in the ``env`` environment."""
    return Cli()


def describe(result) -> str:
    """A failure message for a CLI result that never shows stdout (it may hold a key)."""
    return f"exit {result.exit_code}; stderr: {result.stderr.strip()!r}"


def expect(result, code: int = 0):
    """Assert the exit code; on failure show only stderr (errors never contain keys)."""
    assert result.exit_code == code, describe(result)
    return result
