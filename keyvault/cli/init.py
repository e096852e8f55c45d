"""`keyvault init`."""

from __future__ import annotations

import click

from keyvault.cli.context import AppContext
from keyvault.cli.output import emit_json, output_option


@click.command()
@output_option
@click.pass_obj
def init(app: AppContext, as_json: bool) -> None:
    """Create the home, a master key (never overwritten), the config and the schema."""
    from keyvault.services.store import initialise

    settings = app.settings
    report = initialise(app.engine, settings=settings)
    if as_json:
        emit_json(report.as_dict(settings))
        return
    for line in report.created:
        click.echo(f"created {line}")
    click.echo(
        f"keyvault is ready: home {settings.home}, database at schema head, "
        f"master key {report.master_key_id}"
    )
    if report.new_master_key:
        click.echo("back up the master key file now: without it the store cannot be read")


COMMANDS = [init]
