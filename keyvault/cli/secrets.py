"""`keyvault secrets`."""

from __future__ import annotations

import sys

import click

from keyvault.cli.audited import audited, key_scope
from keyvault.cli.context import AppContext
from keyvault.cli.output import (
    echo_safe,
    emit_json,
    emit_table,
    mask,
    output_option,
    resolve_scope,
    scope_options,
)
from keyvault.cli.params import complete_clusters

VERSION_COLUMNS = (
    "version",
    "state",
    "fingerprint",
    "source",
    "created_at",
    "created_by",
    "superseded_by",
)


@click.group()
def secrets() -> None:
    """Read stored keys and their history."""


@secrets.command("list")
@click.option("--cluster", shell_complete=complete_clusters)
@output_option
@click.pass_obj
def secrets_list(app: AppContext, cluster: str | None, as_json: bool) -> None:
    """List every scope with its current version (no keys)."""
    from keyvault.services.secrets import list_current, version_info

    with app.transaction() as session:
        rows = [version_info(v) for v in list_current(session, cluster_name=cluster)]
    emit_json(rows) if as_json else emit_table(
        rows, ("cluster", "scope", "version", "fingerprint", "created_at", "source")
    )


@secrets.command("show")
@scope_options
@click.option("--version", "number", type=int, help="A version number (default: the current one).")
@click.option("--reveal", is_flag=True, help="Print the key itself.")
@output_option
@click.pass_obj
@audited(
    "secrets.reveal",
    about=lambda p: {**key_scope(p), "detail": f"version {p['number']}" if p["number"] else None},
    when=lambda p: p["reveal"],
)
def secrets_show(
    app: AppContext,
    cluster: str,
    is_root: bool,
    appid: str | None,
    number: int | None,
    reveal: bool,
    as_json: bool,
) -> None:
    """Show one version; the key is masked unless --reveal."""
    from keyvault.services.secrets import get_version, version_info
    from keyvault.services.secrets import reveal as reveal_key

    scope = resolve_scope(is_root, appid, app.settings)
    with app.transaction() as session:
        version = get_version(session, cluster_name=cluster, scope=scope, number=number)
        key = reveal_key(app.keyring(session), version)
        info = version_info(version)
    info["key"] = key if reveal else mask(key)
    if as_json:
        emit_json(info)
    elif reveal and not sys.stdout.isatty():
        click.echo(key)  # scripts get the bare key
    else:  # stored text (created_by, source) is shown escaped; a key is plain alphanumerics
        for name in (
            "cluster",
            "scope",
            "version",
            "state",
            "fingerprint",
            "source",
            "created_at",
            "created_by",
            "key",
        ):
            echo_safe(f"{name:12} {info[name]}")


@secrets.command("history")
@scope_options
@output_option
@click.pass_obj
def secrets_history(
    app: AppContext, cluster: str, is_root: bool, appid: str | None, as_json: bool
) -> None:
    """Every version of a scope, oldest first (no keys)."""
    from keyvault.services.secrets import history, version_info

    scope = resolve_scope(is_root, appid, app.settings)
    with app.transaction() as session:
        rows = [version_info(v) for v in history(session, cluster_name=cluster, scope=scope)]
    emit_json(rows) if as_json else emit_table(rows, VERSION_COLUMNS)


COMMANDS = [secrets]
