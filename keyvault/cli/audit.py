"""`keyvault audit`."""

from __future__ import annotations

import click

from keyvault.cli.context import AppContext
from keyvault.cli.output import emit_json, emit_table, output_option
from keyvault.cli.params import complete_token_names

# Every cell is shown escaped (emit_table): a request path or a name may hold control characters.
COLUMNS = (
    "id",
    "at",
    "who",
    "action",
    "cluster",
    "scope",
    "target",
    "version",
    "client",
    "outcome",
    "detail",
)


@click.group()
def audit() -> None:
    """Read the audit log: HTTP key reads and rotations, CLI actions."""


@audit.command("list")
@click.option("--since", help="ISO time or a duration ago (e.g. 1h).")
@click.option(
    "--token", "token_name", shell_complete=complete_token_names, help="Only this token's requests."
)
@click.option("--actor", help="Only this CLI actor's actions (as shown in WHO).")
@click.option("--limit", default=200, show_default=True, type=click.IntRange(1, 100000))
@output_option
@click.pass_obj
def audit_list(
    app: AppContext,
    since: str | None,
    token_name: str | None,
    actor: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Audit records, newest first; a CLI action has an intent (outcome "pending") and an outcome."""
    from keyvault.models import utcnow
    from keyvault.services.audit import audit_info, list_audit
    from keyvault.timespec import parse_since

    when = parse_since(since, now=utcnow()) if since else None
    with app.transaction() as session:
        found = list_audit(session, since=when, token_name=token_name, actor=actor, limit=limit)
        rows = [audit_info(r) for r in found]
    if as_json:
        emit_json(rows)
        return
    emit_table(
        [{**r, "who": r["actor"] if r["token"] is None else f"token {r['token']}"} for r in rows],
        COLUMNS,
    )


COMMANDS = [audit]
