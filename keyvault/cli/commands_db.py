"""init, db upgrade|current|check, master-key rotate."""

from __future__ import annotations

import click

from keyvault.cli.output import emit_json


@click.command()
@click.pass_obj
def init(app) -> None:
    """Create the home, a master key (never overwritten), the config and the schema."""
    from keyvault.db import session_factory, transaction, upgrade
    from keyvault.services import store

    settings = app.settings
    created = store.ensure_home(settings)
    upgrade(app.engine)
    store.restrict_sqlite_file(app.engine)
    with transaction(session_factory(app.engine)) as session:
        store.refuse_foreign_store(session, settings=settings)
        keyring, new_key = store.ensure_keyring(settings.master_key_file)
        store.register_keyring(session, keyring=keyring)
    if new_key:
        created.append(f"master key {settings.master_key_file} ({keyring.active})")
    for line in created:
        click.echo(f"created {line}")
    click.echo(f"keyvault is ready: home {settings.home}, database at schema head, master key {keyring.active}")
    if new_key:
        click.echo("back up the master key file now: without it the store cannot be read")


@click.group()
def db() -> None:
    """Manage the database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_obj
def db_upgrade(app, revision: str) -> None:
    """Apply the migrations."""
    from keyvault.db import current_revision, upgrade

    upgrade(app.engine, revision)
    click.echo(f"database at {current_revision(app.engine)}")


@db.command("current")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def db_current(app, as_json: bool) -> None:
    """Show the schema revision of the database and of this keyvault."""
    from keyvault.db import current_revision, head_revision

    info = {"current": current_revision(app.engine), "head": head_revision()}
    emit_json(info) if as_json else click.echo(f"current: {info['current']}  head: {info['head']}")


@db.command("check")
@click.pass_obj
def db_check(app) -> None:
    """Check that the database is at head and that the models and the migrations agree."""
    from keyvault.db import require_head, schema_drift
    from keyvault.errors import DatabaseError

    require_head(app.engine)
    drift = schema_drift(app.engine)
    if drift:
        for diff in drift:
            click.echo(f"drift: {diff}", err=True)
        raise DatabaseError(f"models and migrations disagree ({len(drift)} differences)", hint="write a migration")
    click.echo("models and migrations agree")


@click.group("master-key")
def master_key() -> None:
    """Manage the master keyring."""


@master_key.command("rotate")
@click.pass_obj
def master_key_rotate(app) -> None:
    """Make a new master key and re-wrap every data key under it in one transaction."""
    from keyvault.services.masterkeys import rotate_master_key

    result = rotate_master_key(app.factory, settings=app.settings)
    click.echo(f"master key rotated: {result.old_id} -> {result.new_id}; {result.rewrapped} data keys re-wrapped")
    click.echo(f"back up {app.settings.master_key_file} now; the previous master key opens nothing any more")


COMMANDS = [init, db, master_key]
