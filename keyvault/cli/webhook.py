"""`keyvault webhook`."""

from __future__ import annotations

from pathlib import Path

import click

from keyvault.cli.audited import audited
from keyvault.cli.confirm import confirm, yes_option
from keyvault.cli.output import echo_safe, emit_json, emit_table, output_option

DELIVERY_COLUMNS = (
    "id",
    "webhook_id",
    "event_id",
    "type",
    "cluster",
    "scope",
    "status",
    "attempts",
    "last_status",
    "last_error",
    "next_attempt_at",
)


HOOK_COLUMNS = ("id", "url", "scopes", "status", "pending", "delivered", "dead", "created_at")

# Per process, not stored with the webhook: `add` checks the URL with this process's choice,
# and every delivering process (`deliver`, `serve`) checks the connected address with its own.
allow_private_network_option = click.option(
    "--allow-private-network",
    is_flag=True,
    envvar="KEYVAULT_ALLOW_PRIVATE_NETWORK",
    show_envvar=True,
    help="Allow receivers on loopback, link-local and private addresses "
    "(refused by default: a webhook URL must not reach what only keyvault can).",
)


@click.group()
def webhook() -> None:
    """Notify services of rotations with signed webhooks (Standard Webhooks)."""


@webhook.command("add")
@click.argument("url")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    metavar="SCOPE",
    help="root:CLUSTER, app:CLUSTER/APPID or app:CLUSTER/* (repeatable).",
)
@click.option(
    "--secret-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A file (mode 0600, yours) holding a whsec_... signing secret; default: generate one.",
)
@allow_private_network_option
@click.pass_obj
@audited("webhook.add", about=lambda p: {"target": p["url"], "detail": " ".join(p["scopes"])})
def webhook_add(
    app, url: str, scopes: tuple[str, ...], secret_file: Path | None, allow_private_network: bool
) -> None:
    """Register URL for the events of the given scopes (a public receiver, unless allowed)."""
    from keyvault.services.webhooks import add_webhook, read_secret_file

    given = read_secret_file(secret_file) if secret_file else None
    with app.transaction() as session:
        hook, secret = add_webhook(
            session,
            keyring=app.keyring(session),
            url=url,
            scopes=list(scopes),
            secret=given,
            appid_pattern=app.settings.appid_pattern,
            allow_private_network=allow_private_network,
        )
    echo_safe(f"webhook {hook.id} added: {hook.url} ({', '.join(scopes)})")
    if given is None:
        click.echo(
            "warning: store this signing secret now; keyvault will never show it again", err=True
        )
        click.echo(f"signing secret: {secret}")


@webhook.command("list")
@click.option("--all", "include_removed", is_flag=True, help="Include removed webhooks.")
@output_option
@click.pass_obj
def webhook_list(app, include_removed: bool, as_json: bool) -> None:
    """List webhooks and their delivery counts (never their secrets)."""
    from keyvault.services.webhooks import delivery_counts, list_webhooks, webhook_info

    with app.transaction() as session:
        counts = delivery_counts(session)
        rows = [
            webhook_info(h, counts.get(h.id))
            for h in list_webhooks(session, include_removed=include_removed)
        ]
    if as_json:
        emit_json(rows)
    else:
        emit_table([{**r, "scopes": ",".join(r["scopes"])} for r in rows], HOOK_COLUMNS)


@webhook.command("remove")
@click.argument("webhook_id", metavar="ID", type=int)
@yes_option
@click.pass_obj
@audited("webhook.remove", about=lambda p: {"target": f"webhook:{p['webhook_id']}"})
def webhook_remove(app, webhook_id: int, yes: bool) -> None:
    """Stop notifying a webhook; its pending deliveries are dead-lettered."""
    from keyvault.services.webhooks import get_webhook, remove_webhook

    with app.transaction() as session:
        get_webhook(session, webhook_id=webhook_id)  # a missing id fails before the question
    confirm(
        yes,
        command="webhook remove",
        warning=f"webhook {webhook_id} will receive nothing more; its pending deliveries are "
        "dead-lettered and not sent.",
        question="Remove it now?",
    )
    with app.transaction() as session:
        hook = remove_webhook(session, keyring=app.keyring(session), webhook_id=webhook_id)
    echo_safe(f"webhook {hook.id} removed: {hook.url}")


@webhook.command("deliveries")
@click.option(
    "--failed",
    "failed_only",
    is_flag=True,
    help="Only dead-lettered deliveries and those whose last attempt failed.",
)
@click.option(
    "--webhook", "webhook_id", type=int, metavar="ID", help="Only this webhook's deliveries."
)
@click.option("--limit", type=click.IntRange(1, 10000), default=100, show_default=True)
@output_option
@click.pass_obj
def webhook_deliveries(
    app, failed_only: bool, webhook_id: int | None, limit: int, as_json: bool
) -> None:
    """List deliveries, newest first."""
    from keyvault.services.webhooks import deliveries

    with app.transaction() as session:
        rows = deliveries(session, failed_only=failed_only, limit=limit, webhook_id=webhook_id)
    emit_json(rows) if as_json else emit_table(rows, DELIVERY_COLUMNS)


@webhook.command("deliver")
@click.option(
    "--once/--loop",
    default=True,
    help="One round (default), or rounds until nothing is due or --max-seconds passed.",
)
@click.option(
    "--max-seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=55.0,
    show_default=True,
    help="Start no delivery after this long.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(1, 1000),
    default=12,
    show_default=True,
    help="Dead-letter a delivery after this many failed attempts.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds to wait for each receiver.",
)
@allow_private_network_option
@output_option
@click.pass_obj
def webhook_deliver(
    app,
    once: bool,
    max_seconds: float,
    max_attempts: int,
    timeout: float,
    allow_private_network: bool,
    as_json: bool,
) -> None:
    """Fan out new events and deliver what is due (for cron).

    A receiver at a non-public address is not sent to (a failed attempt) unless allowed."""
    from keyvault.services.webhooks import default_sender, run_deliveries, summary

    with app.transaction() as session:
        keyring = app.keyring(session)
    report = run_deliveries(
        app.factory,
        keyring=keyring,
        once=once,
        max_seconds=max_seconds,
        max_attempts=max_attempts,
        send=default_sender(timeout, allow_private_network=allow_private_network),
    )
    if as_json:
        emit_json(summary(report))
    else:
        click.echo(
            f"enqueued {report.enqueued}; attempted {report.attempted}: {report.delivered} "
            f"delivered, {report.retrying} to retry, {report.dead} dead-lettered"
        )


COMMANDS = [webhook]
