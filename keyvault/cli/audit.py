"""`keyvault audit`."""

from __future__ import annotations

from pathlib import Path

import click

from keyvault.cli.audited import app_chain, audited
from keyvault.cli.confirm import confirm, yes_option
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
    """Read the audit log (HTTP key reads and rotations, CLI actions), check its hash
    chain, prune it."""


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


@audit.command("verify")
@click.option(
    "--file",
    "file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Check this JSON-lines sink file instead, and compare it with the database.",
)
@output_option
@click.pass_obj
def audit_verify(app: AppContext, file: Path | None, as_json: bool) -> None:
    """Check the audit log's hash chain; exit 1 naming the first record deleted, altered,
    inserted or moved."""
    from keyvault.services.audit_chain import ChainKeys
    from keyvault.services.audit_verify import verify_file, verify_store

    app.factory  # noqa: B018 - the schema must be at head
    keys = ChainKeys(keyring_file=app.settings.master_key_file)
    report = (
        verify_store(app.engine, keys=keys)
        if file is None
        else verify_file(app.engine, file, keys=keys)
    )
    if as_json:
        emit_json(report.as_dict())
    report.raise_if_broken()
    if not as_json:
        click.echo(report.summary() if file is None else f"{file}: {report.summary()}")


@audit.command("prune")
@click.option(
    "--before",
    required=True,
    help="Delete the records older than this: ISO time or a duration ago (90d).",
)
@yes_option
@output_option
@click.pass_obj
@audited("audit.prune", about=lambda p: {"target": "audit", "detail": f"before {p['before']}"})
def audit_prune(app: AppContext, before: str, yes: bool, as_json: bool) -> None:
    """Delete old audit records; the chain stays verifiable from an anchor (the last deleted
    record's MAC), named by an audit.pruned record. Refused if the chain does not verify."""
    from keyvault.errors import InvalidInput
    from keyvault.models import utcnow
    from keyvault.services.audit_verify import plan_prune, prune
    from keyvault.timespec import parse_since

    now = utcnow()
    when = parse_since(before, now=now, what="--before")
    if when > now:
        raise InvalidInput(
            f"--before {before} is in the future", hint="give a past time or a duration (90d)"
        )
    with app.transaction() as session:
        plan = plan_prune(session, before=when)
    if plan.count:
        confirm(
            yes,
            command="audit prune",
            warning=f"this deletes {plan.count} audit records (ids up to {plan.through_id}), "
            f"older than {when.isoformat()}; keep a backup or the sink file if you need them.",
            question=f"Delete {plan.count} audit records?",
        )
        with app.transaction() as session:
            plan = prune(session, chain=app_chain(app), before=when, actor=app.settings.actor)
    result = {
        "deleted": plan.count,
        "through_id": plan.through_id or None,
        "before": when.isoformat(),
    }
    if as_json:
        emit_json(result)
    elif plan.count:
        click.echo(f"pruned {plan.count} audit records (ids up to {plan.through_id})")
    else:
        click.echo(f"nothing to prune: no audit record is older than {when.isoformat()}")


COMMANDS = [audit]
