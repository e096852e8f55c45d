"""click parameter types and shell completion for keyvault's arguments.

Types refuse bad input while the command line is parsed, so nothing is opened or written
for a command that would fail on its arguments; the services validate again for the
other entrypoints. Completion callbacks read names from the database and fail silently:
a shell completing a word must never print an error into the terminal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click
from click.shell_completion import CompletionItem

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

# Seconds a completion waits for the database: a shell is waiting on the other side.
COMPLETION_DB_TIMEOUT = 2


def appid_pattern_of(ctx: click.Context | None) -> str:
    """The APPID rule in force: the settings' when the command has them, else the default."""
    from keyvault.cli.context import AppContext
    from keyvault.config import DEFAULT_APPID_PATTERN

    app = ctx.find_object(AppContext) if ctx is not None else None
    return app.settings.appid_pattern if app is not None else DEFAULT_APPID_PATTERN


class ProjectIdMapping(click.ParamType):
    """``APPID=PROJECT_ID``: an APPID by keyvault's rule and a whole project id (>= 0)."""

    name = "APPID=PROJECT_ID"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        from keyvault.errors import InvalidInput
        from keyvault.scope import validate_appid

        appid, sep, number = str(value).partition("=")
        if not sep:
            self.fail(f"{value!r} is not APPID=PROJECT_ID (e.g. MYAPP=3)", param, ctx)
        try:
            validate_appid(appid, appid_pattern_of(ctx))
        except InvalidInput as exc:
            self.fail(f"{value!r}: {exc.message}", param, ctx)
        if not number.isascii() or not number.isdigit():
            self.fail(
                f"{value!r}: the project id must be a whole number (e.g. {appid}=3)", param, ctx
            )
        return appid, int(number)

    def shell_complete(
        self, ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        if "=" in incomplete:
            return []
        return [
            CompletionItem(f"{item.value}=") for item in complete_appids(ctx, param, incomplete)
        ]


PROJECT_ID_MAPPING = ProjectIdMapping()


# --- completion ---------------------------------------------------------------------------


@contextmanager
def _completion_session() -> Iterator[Session]:
    """A short-lived read session with short timeouts; never creates a database file."""
    from pathlib import Path

    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session as SASession

    from keyvault.config import load_settings
    from keyvault.db import normalize_url

    url = normalize_url(load_settings().database_url)
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        path = make_url(url).database
        if not path or not Path(path).exists():
            raise FileNotFoundError("no SQLite database")  # nothing to complete from
        engine = create_engine(url, connect_args={"timeout": COMPLETION_DB_TIMEOUT})
    else:
        engine = create_engine(url, connect_args={"connect_timeout": COMPLETION_DB_TIMEOUT})
    try:
        with SASession(engine) as session:
            yield session
    finally:
        engine.dispose()


def _names_from_store(query: Callable[[Session], list[str]], incomplete: str) -> list[str]:
    """``query``'s names that start with ``incomplete``, or none if anything goes wrong."""
    import contextlib
    import io
    import logging
    import warnings

    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stderr(io.StringIO()),
            _completion_session() as session,
        ):
            warnings.simplefilter("ignore")
            names = query(session)
    except Exception:  # noqa: BLE001 - completion offers nothing rather than an error
        return []
    finally:
        logging.disable(previous)
    return [n for n in names if n.startswith(incomplete)]


def complete_clusters(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Cluster names from the store."""
    from keyvault.services import names

    return [CompletionItem(n) for n in _names_from_store(names.cluster_names, incomplete)]


def complete_appids(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """APPIDs the store knows (of ``--cluster``/``CLUSTER`` when given)."""
    from keyvault.services import names

    cluster = ctx.params.get("cluster") or ctx.params.get("name")
    return [
        CompletionItem(n)
        for n in _names_from_store(
            lambda session: names.appids(session, cluster_name=cluster), incomplete
        )
    ]


def complete_rotation_ids(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Rotation ids, unresolved ones first (those are the ones people look up)."""
    from keyvault.services import names

    return [CompletionItem(n) for n in _names_from_store(names.rotation_ids, incomplete)]


def complete_token_names(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Names of tokens not revoked."""
    from keyvault.services import names

    return [CompletionItem(n) for n in _names_from_store(names.token_names, incomplete)]


def complete_host_addresses(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Host addresses (of the cluster argument when given)."""
    from keyvault.services import names

    cluster = ctx.params.get("cluster")
    return [
        CompletionItem(n)
        for n in _names_from_store(
            lambda session: names.host_addresses(session, cluster_name=cluster), incomplete
        )
    ]
