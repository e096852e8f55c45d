"""`keyvault audit`."""

from __future__ import annotations

from datetime import UTC

import click

from keyvault.cli.output import emit_json, emit_table, output_option


@click.group()
def audit() -> None:
    """Read the audit log of the HTTP API."""


@audit.command("list")
@click.option("--since", help="ISO time or a duration ago (e.g. 1h).")
@click.option("--token", "token_name")
@click.option("--limit", default=200, show_default=True, type=click.IntRange(1, 100000))
@output_option
@click.pass_obj
def audit_list(app, since, token_name, limit, as_json) -> None:
    """Key reads and rotations, newest first."""
    from datetime import datetime

    from keyvault.errors import InvalidInput
    from keyvault.models import utcnow
    from keyvault.services.audit import audit_info, list_audit
    from keyvault.services.tokens import parse_duration

    when = None
    if since:
        try:
            when = datetime.fromisoformat(since)
            when = when if when.tzinfo else when.replace(tzinfo=UTC)
        except ValueError:
            try:
                when = utcnow() - parse_duration(since)
            except InvalidInput:
                raise InvalidInput(
                    f"invalid --since {since!r}", hint="give an ISO time or a duration like 1h"
                ) from None
    with app.transaction() as session:
        rows = [
            audit_info(r)
            for r in list_audit(session, since=when, token_name=token_name, limit=limit)
        ]
    emit_json(rows) if as_json else emit_table(
        rows, ("at", "token", "action", "cluster", "scope", "version", "client", "outcome")
    )


COMMANDS = [audit]
