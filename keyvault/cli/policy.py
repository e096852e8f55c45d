"""`keyvault policy`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from keyvault.cli.audited import audited, key_scope, scope_of
from keyvault.cli.context import AppContext
from keyvault.cli.output import emit_json, emit_table, output_option
from keyvault.cli.params import complete_appids, complete_clusters


def _target_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--all-apps", is_flag=True, help="Every app of the cluster (a specific --appid wins)."
    )(func)
    func = click.option("--appid", shell_complete=complete_appids)(func)
    func = click.option("--root", "is_root", is_flag=True)(func)
    return click.option("--cluster", required=True, shell_complete=complete_clusters)(func)


def _target(app: AppContext, is_root: bool, appid: str | None, all_apps: bool) -> str:
    from keyvault.scope import validate_appid

    if sum((is_root, appid is not None, all_apps)) != 1:
        raise click.UsageError("give exactly one of --root, --appid APPID or --all-apps")
    if is_root:
        return "root"
    if all_apps or appid is None:
        return "all-apps"
    return f"app:{validate_appid(appid, app.settings.appid_pattern)}"


def _policy_target(params: dict) -> dict[str, str | None]:
    return {
        "cluster": params["cluster"],
        "target": f"policy:{scope_of(params) or ('all-apps' if params['all_apps'] else '?')}",
    }


@click.group()
def policy() -> None:
    """Rotation policies for `keyvault rotate due`."""


@policy.command("set")
@_target_options
@click.option("--max-age", required=True, help="Rotate when the key is older than this (e.g. 30d).")
@click.option("--window", help="When rotation may happen, e.g. 'Tue 02:00-04:00 UTC'.")
@output_option
@click.pass_obj
@audited(
    "policy.set",
    about=lambda p: {**_policy_target(p), "detail": f"max-age {p['max_age']} window {p['window']}"},
)
def policy_set(
    app: AppContext,
    cluster: str,
    is_root: bool,
    appid: str | None,
    all_apps: bool,
    max_age: str,
    window: str | None,
    as_json: bool,
) -> None:
    """Create or replace a policy."""
    from keyvault.services.policies import policy_info, set_policy

    target = _target(app, is_root, appid, all_apps)
    with app.transaction() as session:
        info = policy_info(
            set_policy(
                session,
                keyring=app.keyring(session),
                cluster_name=cluster,
                target=target,
                max_age=max_age,
                window=window,
            )
        )
    if as_json:
        emit_json(info)
        return
    click.echo(
        f"policy for {target} of {cluster}: rotate after {max_age}"
        + (f", within {window}" if window else "")
    )


@policy.command("list")
@click.option("--cluster", shell_complete=complete_clusters)
@output_option
@click.pass_obj
def policy_list(app: AppContext, cluster: str | None, as_json: bool) -> None:
    """List policies."""
    from keyvault.services.policies import list_policies, policy_info

    with app.transaction() as session:
        rows = [policy_info(p) for p in list_policies(session, cluster_name=cluster)]
    emit_json(rows) if as_json else emit_table(rows, ("cluster", "target", "max_age", "window"))


@policy.command("remove")
@_target_options
@output_option
@click.pass_obj
@audited("policy.remove", about=_policy_target)
def policy_remove(
    app: AppContext, cluster: str, is_root: bool, appid: str | None, all_apps: bool, as_json: bool
) -> None:
    """Delete a policy."""
    from keyvault.services.policies import remove_policy

    target = _target(app, is_root, appid, all_apps)
    with app.transaction() as session:
        info = remove_policy(session, cluster_name=cluster, target=target)
    emit_json(info) if as_json else click.echo(f"policy for {target} of {cluster} removed")


@policy.command("resume")
@click.option("--cluster", required=True, shell_complete=complete_clusters)
@click.option("--root", "is_root", is_flag=True)
@click.option("--appid", shell_complete=complete_appids)
@output_option
@click.pass_obj
@audited("policy.resume", about=key_scope)
def policy_resume(
    app: AppContext, cluster: str, is_root: bool, appid: str | None, as_json: bool
) -> None:
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
        count = resume(
            session, keyring=app.keyring(session), cluster_name=cluster, scope=scope, now=utcnow()
        )
    if as_json:
        emit_json({"cluster": cluster, "scope": scope, "resumed": count})
        return
    click.echo(f"resumed {count} scope(s) of {cluster}")


COMMANDS = [policy]
