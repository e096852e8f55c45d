"""`keyvault token`."""

from __future__ import annotations

import click

from keyvault.cli.audited import audited
from keyvault.cli.confirm import confirm, yes_option
from keyvault.cli.context import AppContext
from keyvault.cli.output import emit_json, emit_table, output_option
from keyvault.cli.params import complete_token_names


@click.group()
def token() -> None:
    """Manage access tokens for the HTTP API."""


@token.command("create")
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    help="root:CLUSTER, app:CLUSTER/APPID or app:CLUSTER/* (repeatable).",
)
@click.option("--rotate", "can_rotate", is_flag=True, help="Also allow POST .../rotate.")
@click.option("--expires", help="Lifetime such as 90d, 12h, 30m.")
@output_option
@click.pass_obj
@audited(
    "token.create",
    about=lambda p: {
        "target": f"token:{p['name']}",
        "detail": " ".join(p["scopes"]) + (" (may rotate)" if p["can_rotate"] else ""),
    },
)
def token_create(
    app: AppContext,
    name: str,
    scopes: tuple[str, ...],
    can_rotate: bool,
    expires: str | None,
    as_json: bool,
) -> None:
    """Create a token; it is printed once, only its hash is kept."""
    from keyvault.services.tokens import create_token, token_info
    from keyvault.timespec import parse_duration

    lifetime = parse_duration(expires) if expires else None
    with app.transaction() as session:
        secret, row = create_token(
            session,
            keyring=app.keyring(session),
            name=name,
            scopes=list(scopes),
            can_rotate=can_rotate,
            expires_in=lifetime,
            appid_pattern=app.settings.appid_pattern,
        )
        info = token_info(row)
    if as_json:
        emit_json({**info, "token": secret})
        return
    click.echo(
        f"token {name} created for {', '.join(info['scopes'])}"
        + (" (may rotate)" if can_rotate else "")
        + (f", expires {info['expires_at']}" if expires else ""),
        err=True,
    )
    click.echo("it is shown only now; store it in the consuming service's secret store:", err=True)
    click.echo(secret)


@token.command("list")
@output_option
@click.pass_obj
def token_list(app: AppContext, as_json: bool) -> None:
    """List tokens (never their value)."""
    from keyvault.services.tokens import list_tokens, token_info

    with app.transaction() as session:
        rows = [token_info(t) for t in list_tokens(session)]
    if as_json:
        emit_json(rows)
    else:
        emit_table(
            [{**r, "scopes": " ".join(r["scopes"])} for r in rows],
            ("name", "status", "scopes", "can_rotate", "expires_at", "created_at"),
        )


@token.command("revoke")
@click.argument("name", shell_complete=complete_token_names)
@yes_option
@output_option
@click.pass_obj
@audited("token.revoke", about=lambda p: {"target": f"token:{p['name']}"})
def token_revoke(app: AppContext, name: str, yes: bool, as_json: bool) -> None:
    """Revoke a token; every server refuses it from its next request."""
    from keyvault.services.tokens import revoke_token, token_info

    confirm(
        yes,
        command="token revoke",
        warning=f"every service holding token {name} loses access at its next request.",
        question=f"Revoke token {name}?",
    )
    with app.transaction() as session:
        info = token_info(revoke_token(session, keyring=app.keyring(session), name=name))
    emit_json(info) if as_json else click.echo(f"token {name} revoked")


COMMANDS = [token]
