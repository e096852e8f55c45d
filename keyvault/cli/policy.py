"""`keyvault policy`."""

from __future__ import annotations

import click

from keyvault.cli.output import emit_json, emit_table, output_option


def _target_options(func):
    func = click.option(
        "--all-apps", is_flag=True, help="Every app of the cluster (a specific --appid wins)."
    )(func)
    func = click.option("--appid")(func)
    func = click.option("--root", "is_root", is_flag=True)(func)
    return click.option("--cluster", required=True)(func)


def _target(app, is_root: bool, appid: str | None, all_apps: bool) -> str:
    from keyvault.scope import validate_appid

    if sum((is_root, appid is not None, all_apps)) != 1:
        raise click.UsageError("give exactly one of --root, --appid APPID or --all-apps")
    return (
        "root"
        if is_root
        else "all-apps"
        if all_apps
        else f"app:{validate_appid(appid, app.settings.appid_pattern)}"
    )


@click.group()
def policy() -> None:
    """Rotation policies for `keyvault rotate due`."""


@policy.command("set")
@_target_options
@click.option("--max-age", required=True, help="Rotate when the key is older than this (e.g. 30d).")
@click.option("--window", help="When rotation may happen, e.g. 'Tue 02:00-04:00 UTC'.")
@click.pass_obj
def policy_set(app, cluster, is_root, appid, all_apps, max_age, window) -> None:
    """Create or replace a policy."""
    from keyvault.services.policies import set_policy

    target = _target(app, is_root, appid, all_apps)
    with app.transaction() as session:
        set_policy(session, cluster_name=cluster, target=target, max_age=max_age, window=window)
    click.echo(
        f"policy for {target} of {cluster}: rotate after {max_age}"
        + (f", within {window}" if window else "")
    )


@policy.command("list")
@click.option("--cluster")
@output_option
@click.pass_obj
def policy_list(app, cluster, as_json) -> None:
    """List policies."""
    from keyvault.services.policies import list_policies, policy_info

    with app.transaction() as session:
        rows = [policy_info(p) for p in list_policies(session, cluster_name=cluster)]
    emit_json(rows) if as_json else emit_table(rows, ("cluster", "target", "max_age", "window"))


@policy.command("remove")
@_target_options
@click.pass_obj
def policy_remove(app, cluster, is_root, appid, all_apps) -> None:
    """Delete a policy."""
    from keyvault.services.policies import remove_policy

    target = _target(app, is_root, appid, all_apps)
    with app.transaction() as session:
        remove_policy(session, cluster_name=cluster, target=target)
    click.echo(f"policy for {target} of {cluster} removed")


@policy.command("resume")
@click.option("--cluster", required=True)
@click.option("--root", "is_root", is_flag=True)
@click.option("--appid")
@click.pass_obj
def policy_resume(app, cluster, is_root, appid) -> None:
    """Clear the pause and backoff of a scope (or of every scope of the cluster)."""
    from keyvault.models import utcnow
    from keyvault.scope import validate_appid
    from keyvault.services.policies import resume

    if is_root and appid:
        raise click.UsageError("give --root or --appid, not both")
    scope = (
        "root"
        if is_root
        else f"app:{validate_appid(appid, app.settings.appid_pattern)}"
        if appid
        else None
    )
    with app.transaction() as session:
        count = resume(session, cluster_name=cluster, scope=scope, now=utcnow())
    click.echo(f"resumed {count} scope(s) of {cluster}")


COMMANDS = [policy]
