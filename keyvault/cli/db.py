"""`keyvault db`."""

from __future__ import annotations

import click

from keyvault.cli.audited import audited
from keyvault.cli.confirm import confirm, yes_option
from keyvault.cli.context import AppContext
from keyvault.cli.output import echo_safe, emit_json, output_option


@click.group()
def db() -> None:
    """Manage the database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@output_option
@click.pass_obj
def db_upgrade(app: AppContext, revision: str, as_json: bool) -> None:
    """Apply the migrations."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from keyvault.db import current_revision, head_revision, upgrade
    from keyvault.errors import KeyvaultError

    # Only the run that brings in the adoption record (the transition to row MACs) adopts:
    # a routine upgrade never MACs a row, whatever a database writer left without one.
    try:
        transition = not inspect(app.engine).has_table("row_mac_adoption")
    except (SQLAlchemyError, KeyvaultError):
        transition = True  # no database yet, or unreachable (the upgrade says so)
    upgrade(app.engine, revision)
    current = current_revision(app.engine)
    adopted = _adopt_after_upgrade(app) if transition and current == head_revision() else None
    if as_json:
        emit_json({"current": current, "head": head_revision(), "adopted": adopted})
        return
    click.echo(f"database at {current}")
    for what in adopted or []:
        echo_safe(f"adopted {what}")
    if adopted:
        click.echo(f"adopted {len(adopted)} row(s) without a MAC (see `keyvault audit list`)")


def _adopt_after_upgrade(app: AppContext) -> list[str] | None:
    """Rows the upgrade to row MACs left without one, MACed now if the keyring opens the
    store; None (and a note) when it does not: those rows are refused until adopted."""
    from keyvault.errors import KeyvaultError
    from keyvault.services.integrity import adoptable

    with app.transaction() as session:
        rows = adoptable(session)
        missing = len(rows or [])
    if not missing:
        return []
    try:
        app.keyring_check()
    except KeyvaultError as exc:
        click.echo(
            f"note: {missing} row(s) have no MAC and are refused until adopted; the keyring "
            f"does not open the store here ({exc.message}): run `keyvault db adopt` with it",
            err=True,
        )
        return None
    return adopt_rows(app, only=None)


@audited("db.adopt", about=lambda p: {"target": "row-macs", "detail": p.get("detail")})
def adopt_rows(app: AppContext, *, only: set[str] | None, detail: str | None = None) -> list[str]:
    """MAC the rows the upgrade found without one (trust on first use, once), audited."""
    from keyvault.services.integrity import adopt

    with app.transaction() as session:
        return adopt(session, keyring=app.keyring(session), only=only)


@db.command("adopt")
@yes_option
@output_option
@click.pass_obj
def db_adopt(app: AppContext, yes: bool, as_json: bool) -> None:
    """MAC the rows the upgrade to row MACs found without one, once (takes them as they
    stand); lists each and asks first."""
    from keyvault.errors import IntegrityError
    from keyvault.services.integrity import adoptable, describe, shown

    with app.transaction() as session:
        rows = adoptable(session)
        listed = None if rows is None else [(describe(r), shown(r)) for r in rows]
    if listed is None:
        raise IntegrityError(
            "this store's rows were adopted already; rows without a MAC are never adopted again",
            what="database",
            hint="`keyvault db check --integrity` names them: restore each from a backup, or "
            "re-create it (an operator holding the master key file MACs it)",
        )
    for _, line in listed:
        echo_safe(f"would adopt {line}", err=as_json)
    confirm(
        yes,
        command="db adopt",
        warning=f"{len(listed)} row(s) above will be trusted as they stand now; adoption "
        "happens once, then no row is adopted again",
        question="Adopt them?",
    )
    adopted = adopt_rows(app, only={what for what, _ in listed}, detail=f"{len(listed)} row(s)")
    if as_json:
        emit_json({"adopted": adopted})
        return
    for what in adopted:
        echo_safe(f"adopted {what}")
    click.echo(f"adopted {len(adopted)} row(s)")


@db.command("current")
@output_option
@click.pass_obj
def db_current(app: AppContext, as_json: bool) -> None:
    """Show the schema revision of the database and of this keyvault."""
    from keyvault.db import current_revision, head_revision

    info = {"current": current_revision(app.engine), "head": head_revision()}
    emit_json(info) if as_json else click.echo(f"current: {info['current']}  head: {info['head']}")


@db.command("check")
@click.option(
    "--integrity",
    "check_macs",
    is_flag=True,
    help="Also check every row MAC (needs the keyring); list each row that fails.",
)
@output_option
@click.pass_obj
def db_check(app: AppContext, check_macs: bool, as_json: bool) -> None:
    """Check that the database is at head and that the models and the migrations agree."""
    from keyvault.db import require_head, schema_drift
    from keyvault.errors import DatabaseError

    require_head(app.engine)
    if check_macs:
        _check_integrity(app, as_json)
    drift = schema_drift(app.engine)
    if drift:
        for diff in drift:
            click.echo(f"drift: {diff}", err=True)
        raise DatabaseError(
            f"models and migrations disagree ({len(drift)} differences)", hint="write a migration"
        )
    if not as_json:
        click.echo("models and migrations agree")


def _check_integrity(app: AppContext, as_json: bool) -> None:
    from keyvault.errors import IntegrityError
    from keyvault.services.integrity import problems

    with app.transaction() as session:
        found = problems(session, keyring=app.keyring(session))
    if as_json:
        emit_json({"failing": [p.as_dict() for p in found]})
    else:
        for p in found:
            echo_safe(f"{p.what}: {p.reason}")
    if found:
        raise IntegrityError(
            f"{len(found)} row(s) fail their integrity check and are refused",
            what="database",
            hint="restore them from a backup, or re-create each (an operator holding the master "
            "key file re-MACs it); `keyvault db adopt` only takes rows that have no MAC",
        )
    if not as_json:
        click.echo("every row MAC verifies")


COMMANDS = [db]
