"""`keyvault master-key`."""

from __future__ import annotations

import click


@click.group("master-key")
def master_key() -> None:
    """Manage the master keyring."""


@master_key.command("rotate")
@click.pass_obj
def master_key_rotate(app) -> None:
    """Make a new master key and re-wrap every data key under it in one transaction."""
    from keyvault.services.masterkeys import rotate_master_key

    result = rotate_master_key(app.factory, settings=app.settings)
    click.echo(
        f"master key rotated: {result.old_id} -> {result.new_id}; {result.rewrapped} data keys re-wrapped"
    )
    click.echo(
        f"back up {app.settings.master_key_file} now; the previous master key opens nothing any more"
    )


COMMANDS = [master_key]
