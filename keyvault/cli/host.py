"""`keyvault host`."""

from __future__ import annotations

import click

from keyvault.cli.audited import audited
from keyvault.cli.confirm import confirm, yes_option
from keyvault.cli.context import AppContext
from keyvault.cli.output import echo_safe, emit_json, emit_table, output_option
from keyvault.cli.params import complete_clusters, complete_host_addresses

CLUSTER_ARGUMENT = click.argument("cluster", shell_complete=complete_clusters)
ADDRESS_ARGUMENT = click.argument("address", shell_complete=complete_host_addresses)


def _host_target(params: dict) -> dict[str, str | None]:
    port = params.get("port")
    return {
        "cluster": params["cluster"],
        "target": f"host:{params['address']}" + (f":{port}" if port else ""),
    }


@click.group()
def host() -> None:
    """Manage the SSH hosts of a cluster."""


@host.command("add")
@CLUSTER_ARGUMENT
@click.argument("address")
@click.option("--port", default=22, show_default=True, type=int)
@click.option("--user", "username", default="root", show_default=True, help="SSH login user.")
@click.option("--identity", type=click.Path(exists=True, dir_okay=False), help="Private key file.")
@click.option(
    "--become", type=click.Choice(["su", "sudo", "none"]), default="su", show_default=True
)
@click.option("--ta-user", default="ta", show_default=True)
@click.option("--fingerprint", help="Pinned host key fingerprint, SHA256:...")
@output_option
@click.pass_obj
@audited("host.add", about=_host_target)
def host_add(
    app: AppContext,
    cluster: str,
    address: str,
    port: int,
    username: str,
    identity: str | None,
    become: str,
    ta_user: str,
    fingerprint: str | None,
    as_json: bool,
) -> None:
    """Add a host where ta-tool can be run."""
    import os

    from keyvault.services.hosts import add_host, host_info

    identity = os.path.abspath(identity) if identity else None
    with app.transaction() as session:
        h = add_host(
            session,
            keyring=app.keyring(session),
            cluster_name=cluster,
            address=address,
            port=port,
            username=username,
            identity_file=identity,
            become=become,
            ta_user=ta_user,
            fingerprint=fingerprint,
        )
        label, info = h.label, host_info(h)
    if as_json:
        emit_json(info)
        return
    click.echo(f"host {label} added to {cluster}")
    if not fingerprint:
        click.echo(
            f"its host key is not trusted yet: run `keyvault host trust {cluster} {address}"
            f"{'' if port == 22 else f' --port {port}'}`"
        )


@host.command("list")
@click.option("--cluster", shell_complete=complete_clusters)
@output_option
@click.pass_obj
def host_list(app: AppContext, cluster: str | None, as_json: bool) -> None:
    """List hosts in the order they are tried."""
    from keyvault.services.hosts import host_info, list_hosts

    with app.transaction() as session:
        rows = [host_info(h) for h in list_hosts(session, cluster_name=cluster)]
    emit_json(rows) if as_json else emit_table(
        rows, ("cluster", "address", "port", "user", "become", "ta_user", "fingerprint")
    )


@host.command("remove")
@CLUSTER_ARGUMENT
@ADDRESS_ARGUMENT
@click.option("--port", type=int)
@yes_option
@output_option
@click.pass_obj
@audited("host.remove", about=_host_target)
def host_remove(
    app: AppContext, cluster: str, address: str, port: int | None, yes: bool, as_json: bool
) -> None:
    """Remove a host (refused while a rotation on it is unresolved)."""
    from keyvault.services.hosts import get_host, host_info, remove_host

    with app.transaction() as session:  # a missing host is NotFound before the question
        found = get_host(session, cluster_name=cluster, address=address, port=port)
        info, port = host_info(found), found.port
    confirm(
        yes,
        command="host remove",
        warning=f"rotations of cluster {cluster} will no longer use {address}:{port}.",
        question=f"Remove host {address}:{port} from {cluster}?",
    )
    with app.transaction() as session:
        remove_host(session, cluster_name=cluster, address=address, port=port)
    emit_json(info) if as_json else click.echo(f"host {address} removed from {cluster}")


@host.command("trust")
@CLUSTER_ARGUMENT
@ADDRESS_ARGUMENT
@click.option("--port", type=int)
@yes_option
@output_option
@click.pass_obj
@audited("host.trust", about=_host_target)
def host_trust(
    app: AppContext, cluster: str, address: str, port: int | None, yes: bool, as_json: bool
) -> None:
    """Show the host key the server offers and pin it after confirmation."""
    from keyvault.services.hosts import get_host, host_info, pin_host_key, ssh_target

    with app.transaction() as session:
        h = get_host(session, cluster_name=cluster, address=address, port=port)
        offered = app.connector.offered_fingerprint(ssh_target(h, app.settings))
        # With --json, stdout holds only the JSON: what a person reads goes to stderr.
        echo_safe(f"{h.address}:{h.port} offers host key {offered}", err=as_json)
        if h.host_key_fingerprint:
            echo_safe(
                f"currently pinned: {h.host_key_fingerprint}"
                + (" (same)" if offered == h.host_key_fingerprint else " (DIFFERENT)"),
                err=as_json,
            )
        confirm(
            yes,
            command="host trust",
            warning="Compare it with the host's own `ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub`.",
            question="Pin it?",
        )
        pin_host_key(session, keyring=app.keyring(session), host=h, fingerprint=offered)
        info = host_info(h)
    emit_json(info) if as_json else click.echo(f"pinned {offered} for {address}")


@host.command("check")
@CLUSTER_ARGUMENT
@click.argument("address", required=False, shell_complete=complete_host_addresses)
@click.pass_obj
def host_check(app: AppContext, cluster: str, address: str | None) -> None:
    """Connect, become ta and confirm ta-tool is on its PATH; generates nothing."""
    from keyvault.services.hosts import check_host, hosts_to_check

    with app.transaction() as session:
        keyring = app.keyring(session)
        for h in hosts_to_check(session, cluster_name=cluster, address=address):
            echo_safe(
                check_host(
                    session,
                    host=h,
                    settings=app.settings,
                    connector=app.connector,
                    keyring=keyring,
                )
            )


COMMANDS = [host]
