"""`keyvault db`."""

from __future__ import annotations

import click

from keyvault.cli.context import AppContext
from keyvault.cli.output import emit_json, output_option


@click.group()
def db() -> None:
    """Manage the database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@output_option
@click.pass_obj
def db_upgrade(app: AppContext, revision: str, as_json: bool) -> None:
    """Apply the migrations."""
    from keyvault.db import current_revision, head_revision, upgrade

    upgrade(app.engine, revision)
    current = current_revision(app.engine)
    if as_json:
        emit_json({"current": current, "head": head_revision()})
        return
    click.echo(f"database at {current}")


@db.command("current")
@output_option
@click.pass_obj
def db_current(app: AppContext, as_json: bool) -> None:
    """Show the schema revision of the database and of this keyvault."""
    from keyvault.db import current_revision, head_revision

    info = {"current": current_revision(app.engine), "head": head_revision()}
    emit_json(info) if as_json else click.echo(f"current: {info['current']}  head: {info['head']}")


@db.command("check")
@click.pass_obj
def db_check(app: AppContext) -> None:
    """Check that the database is at head and that the models and the migrations agree."""
    from keyvault.db import require_head, schema_drift
    from keyvault.errors import DatabaseError

    require_head(app.engine)
    drift = schema_drift(app.engine)
    if drift:
        for diff in drift:
            click.echo(f"drift: {diff}", err=True)
        raise DatabaseError(
            f"models and migrations disagree ({len(drift)} differences)", hint="write a migration"
        )
    click.echo("models and migrations agree")


COMMANDS = [db]
