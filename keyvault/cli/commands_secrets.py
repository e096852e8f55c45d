"""cluster add|list|set, import, secrets list|show|history."""

from __future__ import annotations

import sys

import click

from keyvault.cli.output import emit_json, emit_table, mask, resolve_scope, scope_options

VERSION_COLUMNS = ("version", "state", "fingerprint", "source", "created_at", "created_by", "superseded_by")


@click.group()
def cluster() -> None:
    """Manage TA clusters."""


@cluster.command("add")
@click.argument("name")
@click.option("--open-api-url", required=True, help="TA Open API base URL, e.g. http://ta2:8992")
@click.option("--key-pattern", help="Regex a generated key matches (default [A-Za-z0-9]{64}).")
@click.option("--login-name", help="Login name for the root-key check (open/project-list).")
@click.pass_obj
def cluster_add(app, name: str, open_api_url: str, key_pattern: str | None, login_name: str | None) -> None:
    """Register a TA cluster."""
    from keyvault.services.clusters import add_cluster

    options = {"login_name": login_name} if login_name else {}
    with app.transaction() as session:
        add_cluster(session, name=name, open_api_url=open_api_url, key_pattern=key_pattern, options=options)
    click.echo(f"cluster {name} added")


@cluster.command("set")
@click.argument("name")
@click.option("--open-api-url")
@click.option("--key-pattern")
@click.option("--login-name")
@click.option("--project-id", "project_ids", multiple=True, metavar="APPID=ID", help="Project id of an APPID.")
@click.pass_obj
def cluster_set(app, name, open_api_url, key_pattern, login_name, project_ids) -> None:
    """Change a cluster's settings."""
    from keyvault.errors import InvalidInput
    from keyvault.services.clusters import cluster_options, get_cluster, set_options

    with app.transaction() as session:
        changes = {"open_api_url": open_api_url, "key_pattern": key_pattern, "login_name": login_name}
        if project_ids:
            mapping = {}
            for item in project_ids:
                appid, _, pid = item.partition("=")
                if not pid.isdigit():
                    raise InvalidInput(f"invalid --project-id {item!r}", hint="use APPID=NUMBER")
                mapping[appid] = int(pid)
            existing = cluster_options(get_cluster(session, name=name))
            changes["project_ids"] = {**existing["project_ids"], **mapping}
        set_options(session, name=name, **changes)
    click.echo(f"cluster {name} updated")


@cluster.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def cluster_list(app, as_json: bool) -> None:
    """List clusters."""
    from keyvault.services.clusters import cluster_info, list_clusters

    with app.transaction() as session:
        rows = [cluster_info(c) for c in list_clusters(session)]
    emit_json(rows) if as_json else emit_table(rows, ("name", "open_api_url", "key_pattern"))


@click.command("import")
@scope_options
@click.option("--any-format", is_flag=True, help="Store a key that does not match the cluster's key pattern.")
@click.pass_obj
def import_(app, cluster: str, is_root: bool, appid: str | None, any_format: bool) -> None:
    """Store a key read from standard input as the new current version."""
    from keyvault.services.secrets import import_key

    scope = resolve_scope(is_root, appid, app.settings)
    if sys.stdin.isatty():
        key = click.prompt("key", hide_input=True, prompt_suffix=": ", err=True)
    else:
        key = sys.stdin.read(65536)
        key = key[:-1] if key.endswith("\n") else key
        key = key[:-1] if key.endswith("\r") else key
    with app.transaction() as session:
        stored = import_key(session, keyring=app.keyring(session), cluster_name=cluster, scope=scope,
                            key=key, actor=app.settings.actor, any_format=any_format)
    old = f" (version {stored.old_number} {stored.old_fingerprint} invalidated)" if stored.old_number else ""
    click.echo(f"stored {scope} of {cluster} as version {stored.number}, fingerprint {stored.fingerprint}{old}")


@click.group()
def secrets() -> None:
    """Read stored keys and their history."""


@secrets.command("list")
@click.option("--cluster")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def secrets_list(app, cluster: str | None, as_json: bool) -> None:
    """List every scope with its current version (no keys)."""
    from keyvault.services.secrets import list_current, version_info

    with app.transaction() as session:
        rows = [version_info(v) for v in list_current(session, cluster_name=cluster)]
    emit_json(rows) if as_json else emit_table(rows, ("cluster", "scope", "version", "fingerprint", "created_at", "source"))


@secrets.command("show")
@scope_options
@click.option("--version", "number", type=int, help="A version number (default: the current one).")
@click.option("--reveal", is_flag=True, help="Print the key itself.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def secrets_show(app, cluster, is_root, appid, number, reveal, as_json) -> None:
    """Show one version; the key is masked unless --reveal."""
    from keyvault.services.secrets import get_version, reveal as reveal_key, version_info

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
    else:
        for name in ("cluster", "scope", "version", "state", "fingerprint", "source", "created_at", "created_by", "key"):
            click.echo(f"{name:12} {info[name]}")


@secrets.command("history")
@scope_options
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def secrets_history(app, cluster, is_root, appid, as_json) -> None:
    """Every version of a scope, oldest first (no keys)."""
    from keyvault.services.secrets import history, version_info

    scope = resolve_scope(is_root, appid, app.settings)
    with app.transaction() as session:
        rows = [version_info(v) for v in history(session, cluster_name=cluster, scope=scope)]
    emit_json(rows) if as_json else emit_table(rows, VERSION_COLUMNS)


COMMANDS = [cluster, import_, secrets]
