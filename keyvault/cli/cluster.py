"""`keyvault cluster`."""

from __future__ import annotations

import click

from keyvault.cli.output import (
    emit_json,
    emit_table,
    output_option,
)


@click.group()
def cluster() -> None:
    """Manage TA clusters."""


@cluster.command("add")
@click.argument("name")
@click.option("--open-api-url", required=True, help="TA Open API base URL, e.g. http://ta2:8992")
@click.option("--key-pattern", help="Regex a generated key matches (default [A-Za-z0-9]{64}).")
@click.option("--login-name", help="Login name for the root-key check (open/project-list).")
@click.pass_obj
def cluster_add(
    app, name: str, open_api_url: str, key_pattern: str | None, login_name: str | None
) -> None:
    """Register a TA cluster."""
    from keyvault.services.clusters import add_cluster

    options = {"login_name": login_name} if login_name else {}
    with app.transaction() as session:
        add_cluster(
            session, name=name, open_api_url=open_api_url, key_pattern=key_pattern, options=options
        )
    click.echo(f"cluster {name} added")


@cluster.command("set")
@click.argument("name")
@click.option("--open-api-url")
@click.option("--key-pattern")
@click.option("--login-name")
@click.option(
    "--project-id", "project_ids", multiple=True, metavar="APPID=ID", help="Project id of an APPID."
)
@click.pass_obj
def cluster_set(app, name, open_api_url, key_pattern, login_name, project_ids) -> None:
    """Change a cluster's settings."""
    from keyvault.errors import InvalidInput
    from keyvault.services.clusters import cluster_options, get_cluster, set_options

    with app.transaction() as session:
        changes = {
            "open_api_url": open_api_url,
            "key_pattern": key_pattern,
            "login_name": login_name,
        }
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
@output_option
@click.pass_obj
def cluster_list(app, as_json: bool) -> None:
    """List clusters."""
    from keyvault.services.clusters import cluster_info, list_clusters

    with app.transaction() as session:
        rows = [cluster_info(c) for c in list_clusters(session)]
    emit_json(rows) if as_json else emit_table(rows, ("name", "open_api_url", "key_pattern"))


COMMANDS = [cluster]
