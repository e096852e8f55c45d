"""serve, token create|list|revoke, audit list."""

from __future__ import annotations

import click

from keyvault.cli.output import emit_json, emit_table

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told).")
@click.option("--port", default=8200, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False))
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False))
@click.option("--no-webhooks", is_flag=True, help="Do not deliver webhooks from this server.")
@click.option("--scheduler", is_flag=True, help="Also run `rotate due` every minute (a lease lets one replica act).")
@click.pass_obj
def serve(app, host, port, workers, tls_cert, tls_key, no_webhooks, scheduler) -> None:
    """Serve current keys over HTTP to services holding scoped tokens."""
    import os

    import uvicorn

    from keyvault.db import require_head

    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("give both --tls-cert and --tls-key, or neither")
    require_head(app.engine)  # fail here, with a clear error, not in every worker
    app.keyring_check()
    if host not in LOOPBACK and not tls_cert:
        click.echo(f"warning: serving keys on {host} without TLS", err=True)
    if no_webhooks:
        os.environ["KEYVAULT_SERVE_WEBHOOKS"] = "0"  # read by each worker's settings
    if scheduler:
        os.environ["KEYVAULT_SERVE_SCHEDULER"] = "1"
    click.echo(f"keyvault serving on {'https' if tls_cert else 'http'}://{host}:{port} ({workers} worker(s))", err=True)
    uvicorn.run("keyvault.http.app:create_app", factory=True, host=host, port=port, workers=workers,
                ssl_certfile=tls_cert, ssl_keyfile=tls_key, log_level="warning", access_log=False,
                server_header=False, lifespan="on")


@click.group()
def token() -> None:
    """Manage access tokens for the HTTP API."""


@token.command("create")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, required=True,
              help="root:CLUSTER, app:CLUSTER/APPID or app:CLUSTER/* (repeatable).")
@click.option("--rotate", "can_rotate", is_flag=True, help="Also allow POST .../rotate.")
@click.option("--expires", help="Lifetime such as 90d, 12h, 30m.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def token_create(app, name, scopes, can_rotate, expires, as_json) -> None:
    """Create a token; it is printed once, only its hash is kept."""
    from keyvault.services.tokens import create_token, parse_duration, token_info

    lifetime = parse_duration(expires) if expires else None
    with app.transaction() as session:
        secret, row = create_token(session, name=name, scopes=list(scopes), can_rotate=can_rotate,
                                   expires_in=lifetime, appid_pattern=app.settings.appid_pattern)
        info = token_info(row)
    if as_json:
        emit_json({**info, "token": secret})
        return
    click.echo(f"token {name} created for {', '.join(info['scopes'])}"
               + (" (may rotate)" if can_rotate else "") + (f", expires {info['expires_at']}" if expires else ""), err=True)
    click.echo("it is shown only now; store it in the consuming service's secret store:", err=True)
    click.echo(secret)


@token.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def token_list(app, as_json) -> None:
    """List tokens (never their value)."""
    from keyvault.services.tokens import list_tokens, token_info

    with app.transaction() as session:
        rows = [token_info(t) for t in list_tokens(session)]
    if as_json:
        emit_json(rows)
    else:
        emit_table([{**r, "scopes": " ".join(r["scopes"])} for r in rows],
                   ("name", "status", "scopes", "can_rotate", "expires_at", "created_at"))


@token.command("revoke")
@click.argument("name")
@click.pass_obj
def token_revoke(app, name) -> None:
    """Revoke a token; every server refuses it from its next request."""
    from keyvault.services.tokens import revoke_token

    with app.transaction() as session:
        revoke_token(session, name=name)
    click.echo(f"token {name} revoked")


@click.group()
def audit() -> None:
    """Read the audit log of the HTTP API."""


@audit.command("list")
@click.option("--since", help="ISO time or a duration ago (e.g. 1h).")
@click.option("--token", "token_name")
@click.option("--limit", default=200, show_default=True, type=click.IntRange(1, 100000))
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def audit_list(app, since, token_name, limit, as_json) -> None:
    """Key reads and rotations, newest first."""
    from datetime import datetime, timezone

    from keyvault.errors import InvalidInput
    from keyvault.models import utcnow
    from keyvault.services.audit import audit_info, list_audit
    from keyvault.services.tokens import parse_duration

    when = None
    if since:
        try:
            when = datetime.fromisoformat(since)
            when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
        except ValueError:
            try:
                when = utcnow() - parse_duration(since)
            except InvalidInput:
                raise InvalidInput(f"invalid --since {since!r}", hint="give an ISO time or a duration like 1h") from None
    with app.transaction() as session:
        rows = [audit_info(r) for r in list_audit(session, since=when, token_name=token_name, limit=limit)]
    emit_json(rows) if as_json else emit_table(rows, ("at", "token", "action", "cluster", "scope", "version", "client", "outcome"))


COMMANDS = [serve, token, audit]
