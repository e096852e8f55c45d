"""`keyvault verify`: call the TA Open API with the current key of a scope."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from keyvault.cli.audited import audited, key_scope
from keyvault.cli.output import echo_safe, emit_json, output_option, resolve_scope, scope_options

if TYPE_CHECKING:
    from keyvault.cli.context import AppContext


@click.command()
@scope_options
@output_option
@click.pass_obj
@audited("verify", about=key_scope)
def verify(app: AppContext, cluster: str, is_root: bool, appid: str | None, as_json: bool) -> None:
    """Call the TA Open API with the current key of a scope."""
    from keyvault.services.verify import verify_current

    scope = resolve_scope(is_root, appid, app.settings)
    with app.transaction() as session:
        number, result = verify_current(
            session,
            keyring=app.keyring(session),
            cluster_name=cluster,
            scope=scope,
            settings=app.settings,
        )
    info = {
        "cluster": cluster,
        "scope": str(scope),
        "version": number,
        "state": result.state,
        "return_code": result.return_code,
        "message": result.message,
    }
    emit_json(info) if as_json else echo_safe(
        f"{cluster} {scope} v{number}: {result.state} - {result.message}"
    )
    if result.state == "failed":
        sys.exit(1)


COMMANDS = [verify]
