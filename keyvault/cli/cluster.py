"""`keyvault cluster`."""

from __future__ import annotations

import click

from keyvault.cli.audited import audited
from keyvault.cli.context import AppContext
from keyvault.cli.output import emit_json, emit_table, output_option
from keyvault.cli.params import PROJECT_ID_MAPPING, complete_appids, complete_clusters


@click.group()
def cluster() -> None:
    """Manage TA clusters."""


@cluster.command("add")
@click.argument("name")
@click.option("--open-api-url", required=True, help="TA Open API base URL, e.g. http://ta2:8992")
@click.option("--key-pattern", help="Regex a generated key matches (default [A-Za-z0-9]{64}).")
@click.option("--login-name", help="Login name for the root-key check (open/project-list).")
@output_option
@click.pass_obj
@audited("cluster.add", about=lambda p: {"cluster": p["name"], "detail": p["open_api_url"]})
def cluster_add(
    app: AppContext,
    name: str,
    open_api_url: str,
    key_pattern: str | None,
    login_name: str | None,
    as_json: bool,
) -> None:
    """Register a TA cluster."""
    from keyvault.services.clusters import add_cluster, cluster_info

    options = {"login_name": login_name} if login_name else {}
    with app.transaction() as session:
        info = cluster_info(
            add_cluster(
                session,
                keyring=app.keyring(session),
                name=name,
                open_api_url=open_api_url,
                key_pattern=key_pattern,
                options=options,
                appid_pattern=app.settings.appid_pattern,
            )
        )
    emit_json(info) if as_json else click.echo(f"cluster {name} added")


@cluster.command("set")
@click.argument("name", shell_complete=complete_clusters)
@click.option("--open-api-url")
@click.option("--key-pattern")
@click.option("--login-name")
@click.option(
    "--project-id",
    "project_ids",
    multiple=True,
    type=PROJECT_ID_MAPPING,
    help="Map an APPID to its TA project id (repeatable).",
)
@click.option(
    "--remove-project-id",
    "removed",
    multiple=True,
    metavar="APPID",
    shell_complete=complete_appids,
    help="Drop the project id of an APPID (repeatable).",
)
@output_option
@click.pass_obj
@audited("cluster.set", about=lambda p: {"cluster": p["name"], "detail": changed_options(p)})
def cluster_set(
    app: AppContext,
    name: str,
    open_api_url: str | None,
    key_pattern: str | None,
    login_name: str | None,
    project_ids: tuple[tuple[str, int], ...],
    removed: tuple[str, ...],
    as_json: bool,
) -> None:
    """Change a cluster's settings and its APPID -> project id map."""
    from keyvault.services.clusters import cluster_info, set_options, update_project_ids

    pattern = app.settings.appid_pattern
    with app.transaction() as session:
        keyring = app.keyring(session)
        changed = set_options(
            session,
            keyring=keyring,
            name=name,
            appid_pattern=pattern,
            open_api_url=open_api_url,
            key_pattern=key_pattern,
            login_name=login_name,
        )
        if project_ids or removed:
            changed = update_project_ids(
                session,
                keyring=keyring,
                name=name,
                mapped=dict(project_ids),
                removed=removed,
                appid_pattern=pattern,
            )
        info = cluster_info(changed)
    emit_json(info) if as_json else click.echo(f"cluster {name} updated")


def changed_options(params: dict) -> str:
    """The options `cluster set` was given (their values are not secrets)."""
    names = ("open_api_url", "key_pattern", "login_name", "project_ids", "removed")
    return " ".join(f"{n}={params[n]!r}" for n in names if params.get(n))


@cluster.command("list")
@output_option
@click.pass_obj
def cluster_list(app: AppContext, as_json: bool) -> None:
    """List clusters."""
    from keyvault.services.clusters import cluster_info, list_clusters

    with app.transaction() as session:
        rows = [cluster_info(c) for c in list_clusters(session)]
    emit_json(rows) if as_json else emit_table(rows, ("name", "open_api_url", "key_pattern"))


COMMANDS = [cluster]
