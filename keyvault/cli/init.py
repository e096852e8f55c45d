"""`keyvault init`."""

from __future__ import annotations

import click


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
    click.echo(
        f"keyvault is ready: home {settings.home}, database at schema head, master key {keyring.active}"
    )
    if new_key:
        click.echo("back up the master key file now: without it the store cannot be read")


COMMANDS = [init]
