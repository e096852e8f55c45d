"""Engines, sessions and schema management (alembic) for SQLite and PostgreSQL."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from keyvault.errors import DatabaseDriverError, DatabaseError, NotInitialized
from keyvault.models import Base

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.orm import Session, sessionmaker


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def migrations_dir() -> Path:
    """The alembic script directory: shipped in the wheel, or the checkout's ``migrations/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_migrations", here.parent / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise NotInitialized(
        "keyvault's migrations are missing from this installation", hint="reinstall keyvault"
    )


# Engines whose SQLite file may be created: those a schema upgrade ran on (init, db upgrade).
_MAY_CREATE: weakref.WeakSet[Engine] = weakref.WeakSet()


def make_engine(url: str, *, pool: dict[str, Any] | None = None) -> Engine:
    """An engine with keyvault's connection policy for SQLite (WAL, FKs, immediate writes);
    ``pool``: the PostgreSQL pool's sizes (``pool_size``, ``max_overflow``)
    instead of SQLAlchemy's defaults (the HTTP server's, keyvault/http/state.py)."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event decide how transactions start.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            # A just-generated key must survive power loss once committed.
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        @event.listens_for(engine, "do_connect")
        def _no_new_file(_dialect: Any, _record: Any, cargs: Any, _cparams: Any) -> None:
            # sqlite3 creates a missing file on connect: a read command (or a typo in the
            # URL) would leave an empty database behind. Only a schema upgrade may create it.
            _refuse_missing_sqlite_file(engine, cargs[0] if cargs else "")

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # IMMEDIATE takes the write lock up front, so two writers serialize
            # instead of failing late with "database is locked" on upgrade.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    engine = create_engine(url, pool_pre_ping=True, **(pool or {}))

    @event.listens_for(engine, "connect")
    def _synchronous_commit(dbapi_conn: Any, _record: Any) -> None:
        # A committed key must survive a crash of the database server: a role, database or
        # server default of synchronous_commit = off is overridden for keyvault's sessions
        # (stronger values, remote_write/remote_apply for synchronous standbys, are kept).
        # The audit writer chooses its own, per transaction ([audit] durability).
        cur = dbapi_conn.cursor()
        cur.execute(
            "SELECT set_config('synchronous_commit', 'on', false)"
            " WHERE current_setting('synchronous_commit') = 'off'"
        )
        cur.close()
        dbapi_conn.commit()  # a rolled-back set_config would be undone

    return engine


def _refuse_missing_sqlite_file(engine: Engine, database: str) -> None:
    if engine in _MAY_CREATE or database in ("", ":memory:") or database.startswith("file:"):
        return
    if not os.path.exists(database):
        raise NotInitialized(
            f"no keyvault database at {database}",
            hint="run `keyvault init` (or check database_url / KEYVAULT_DATABASE_URL)",
        )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """A sessionmaker bound to ``engine`` that keeps objects usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: Callable[[], Session]) -> Iterator[Session]:
    """One unit of work owned by an entrypoint: commit on success, roll back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except OperationalError as exc:
        session.rollback()
        raise DatabaseDriverError(
            f"database error: {_one_line(exc)}", hint="check the database and retry"
        ) from None
    except SQLAlchemyError as exc:
        session.rollback()
        raise DatabaseDriverError(f"database refused the change: {_one_line(exc)}") from None
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _one_line(exc: Exception) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0][:300] if str(orig).strip() else type(orig).__name__


def alembic_config(url: str) -> Config:
    """An alembic Config pointing at keyvault's migrations and ``url``."""
    from alembic.config import Config  # noqa: PLC0415 - alembic takes ~0.15 s; db commands only

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def _migrate(engine: Engine, step: str, revision: str) -> None:
    from alembic import command  # noqa: PLC0415 - alembic takes ~0.15 s; db commands only

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            getattr(command, step)(cfg, revision)
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot {step} the database {engine.url.render_as_string()}: {_one_line(exc)}",
            hint="check KEYVAULT_DATABASE_URL and that the server is up",
        ) from None


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the migrations up to ``revision`` on ``engine`` (creating an SQLite file)."""
    _MAY_CREATE.add(engine)
    _migrate(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Run the migrations down to ``revision`` on ``engine``."""
    _migrate(engine, "downgrade", revision)


def head_revision() -> str:
    """The newest migration revision shipped with this keyvault."""
    from alembic.script import ScriptDirectory  # noqa: PLC0415 - alembic takes ~0.15 s; db commands only

    head = ScriptDirectory(str(migrations_dir())).get_current_head()
    if head is None:  # a packaging error: the migrations directory is empty
        raise RuntimeError(f"no migrations found in {migrations_dir()}")
    return head


# The newest migration; a test proves it equals alembic's head. Reading it from
# here keeps alembic (~0.15 s of imports) off every command's path.
SCHEMA_HEAD = "0013"


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database (read without alembic)."""
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot reach the database {engine.url.render_as_string()}: {_one_line(exc)}",
            hint="check KEYVAULT_DATABASE_URL and that the server is up",
        ) from None


def require_head(engine: Engine) -> None:
    """Refuse to work on a database whose schema is not at head."""
    current, head = current_revision(engine), SCHEMA_HEAD
    if current is None:
        raise NotInitialized(
            "the database has no keyvault schema",
            hint="run `keyvault init` or `keyvault db upgrade`",
        )
    if current != head:
        raise NotInitialized(
            f"the database schema is at {current}, this keyvault needs {head}",
            hint="run `keyvault db upgrade`",
        )


def schema_drift(engine: Engine) -> list[Any]:
    """Differences between the models and the migrated database (empty when they agree)."""
    from alembic.autogenerate import compare_metadata  # noqa: PLC0415 - alembic takes ~0.15 s; db commands only
    from alembic.runtime.migration import MigrationContext  # noqa: PLC0415 - alembic takes ~0.15 s; db commands only

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, Base.metadata)
