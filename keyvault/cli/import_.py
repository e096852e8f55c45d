"""`keyvault import`."""

from __future__ import annotations

import sys

import click

from keyvault.cli.audited import audited, key_scope
from keyvault.cli.context import AppContext
from keyvault.cli.output import emit_json, output_option, resolve_scope, scope_options


@click.command("import")
@scope_options
@click.option(
    "--any-format", is_flag=True, help="Store a key that does not match the cluster's key pattern."
)
@output_option
@click.pass_obj
@audited("import", about=key_scope)
def import_(
    app: AppContext, cluster: str, is_root: bool, appid: str | None, any_format: bool, as_json: bool
) -> None:
    """Store a key read from standard input as the new current version."""
    from keyvault.services.secrets import MAX_INPUT_BYTES, import_key, key_from_input

    scope = resolve_scope(is_root, appid, app.settings)
    if sys.stdin.isatty():
        key = click.prompt("key", hide_input=True, prompt_suffix=": ", err=True)
    else:
        # Bytes, not text: undecodable input is refused, never replaced or escaped.
        key = key_from_input(sys.stdin.buffer.read(MAX_INPUT_BYTES + 1))
    with app.transaction() as session:
        stored = import_key(
            session,
            keyring=app.keyring(session),
            cluster_name=cluster,
            scope=scope,
            key=key,
            actor=app.settings.actor,
            any_format=any_format,
        )
    if as_json:
        emit_json(
            {
                "cluster": stored.cluster,
                "scope": stored.scope,
                "version": stored.number,
                "fingerprint": stored.fingerprint,
                "old_version": stored.old_number,
                "old_fingerprint": stored.old_fingerprint,
            }
        )
        return
    old = (
        f" (version {stored.old_number} {stored.old_fingerprint} invalidated)"
        if stored.old_number
        else ""
    )
    click.echo(
        f"stored {scope} of {cluster} as version {stored.number}, fingerprint {stored.fingerprint}{old}"
    )


COMMANDS = [import_]
