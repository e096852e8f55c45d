"""`keyvault audit`."""

from __future__ import annotations

import click

from keyvault.cli.context import AppContext
from keyvault.cli.output import emit_json, emit_table, output_option
from keyvault.cli.params import complete_token_names


@click.group()
def audit() -> None:
    """Read the audit log of the HTTP API."""


@audit.command("list")
@click.option("--since", help="ISO time or a duration ago (e.g. 1h).")
@click.option("--token", "token_name", shell_complete=complete_token_names)
@click.option("--limit", default=200, show_default=True, type=click.IntRange(1, 100000))
@output_option
@click.pass_obj
def audit_list(
    app: AppContext, since: str | None, token_name: str | None, limit: int, as_json: bool
) -> None:
    """Key reads and rotations, newest first."""
    from keyvault.models import utcnow
    from keyvault.services.audit import audit_info, list_audit
    from keyvault.timespec import parse_since

    when = parse_since(since, now=utcnow()) if since else None
    with app.transaction() as session:
        rows = [
            audit_info(r)
            for r in list_audit(session, since=when, token_name=token_name, limit=limit)
        ]
    emit_json(rows) if as_json else emit_table(
        rows, ("at", "token", "action", "cluster", "scope", "version", "client", "outcome")
    )


COMMANDS = [audit]
