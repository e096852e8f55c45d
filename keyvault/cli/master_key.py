"""`keyvault master-key`."""

from __future__ import annotations

import click

from keyvault.cli.audited import audited
from keyvault.cli.confirm import confirm, yes_option
from keyvault.cli.context import AppContext
from keyvault.cli.output import emit_json, output_option


@click.group("master-key")
def master_key() -> None:
    """Manage the master keyring."""


@master_key.command("rotate")
@yes_option
@output_option
@click.pass_obj
@audited("master-key.rotate", about=lambda p: {"target": "master-keyring"})
def master_key_rotate(app: AppContext, yes: bool, as_json: bool) -> None:
    """Make a new master key and re-wrap every data key under it in one transaction."""
    from keyvault.cli.audited import app_chain
    from keyvault.services.masterkeys import rotate_master_key

    keyring_file = app.settings.master_key_file
    confirm(
        yes,
        command="master-key rotate",
        warning=(
            f"the keyring file {keyring_file} is rewritten; every copy of the current one "
            "(backups included) stops opening this store."
        ),
        question="Rotate the master key now?",
    )
    result = rotate_master_key(app.factory, settings=app.settings, sink=app_chain(app).sink)
    if as_json:
        emit_json(
            {
                "old_master_key_id": result.old_id,
                "new_master_key_id": result.new_id,
                "rewrapped": result.rewrapped,
                "master_key_file": str(keyring_file),
                "kept_master_key_ids": sorted(result.kept),
            }
        )
        return
    click.echo(
        f"master key rotated: {result.old_id} -> {result.new_id}; "
        f"{result.rewrapped} data keys re-wrapped"
    )
    for key_id, why in sorted(result.kept.items()):
        click.echo(f"kept {key_id} in {keyring_file}: {why}; the next `master-key rotate` drops it")
    if result.kept:
        click.echo(f"back up {keyring_file} now")
        return
    click.echo(f"back up {keyring_file} now; the previous master key opens nothing any more")


COMMANDS = [master_key]
