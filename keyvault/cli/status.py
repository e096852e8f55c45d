"""`keyvault status`."""

from __future__ import annotations

import click

from keyvault.cli.context import AppContext
from keyvault.cli.output import echo_safe, emit_json, output_option

# Exit status when something needs a person (0: all fine; 1/2: the usual errors).
NEEDS_ATTENTION = 3


@click.command()
@click.option(
    "--token-days",
    type=click.IntRange(0, 3650),
    default=14,
    show_default=True,
    help="Report tokens that expire within this many days.",
)
@click.option(
    "--scheduler-hours",
    type=click.IntRange(1, 8760),
    default=24,
    show_default=True,
    help="With rotation policies, report a scheduler that completed no run for this many hours.",
)
@output_option
@click.pass_obj
def status(app: AppContext, token_days: int, scheduler_hours: int, as_json: bool) -> None:
    """Check the store; exit 3 when something needs a person, each problem saying what to do.

    Checks the schema, the keyring, the spool, unresolved and paused rotations, the
    scheduler's last completed run, keys older than their policy, tokens about to expire
    and dead webhook deliveries.
    """
    from keyvault.models import utcnow
    from keyvault.services.status import collect_status

    report = collect_status(
        app.engine,
        settings=app.settings,
        now=utcnow(),
        token_days=token_days,
        scheduler_hours=scheduler_hours,
    )
    if as_json:
        emit_json(report.as_dict())
    else:
        width = max(len(f.check) for f in report.findings)
        for f in report.findings:
            mark = {"ok": "ok", "attention": "ATTENTION", "skipped": "skipped"}[f.status]
            echo_safe(f"{f.check.ljust(width)}  {mark:9}  {f.detail}")
            if f.action and f.status != "ok":
                click.echo(f"{''.ljust(width)}  {'':9}  -> {f.action}")
    if report.needs_attention:
        click.get_current_context().exit(NEEDS_ATTENTION)


COMMANDS = [status]
