"""`keyvault host`."""

from __future__ import annotations

import click

from keyvault.cli.output import emit_json, emit_table, output_option


@click.group()
def host() -> None:
    """Manage the SSH hosts of a cluster."""


@host.command("add")
@click.argument("cluster")
@click.argument("address")
@click.option("--port", default=22, show_default=True, type=int)
@click.option("--user", "username", default="root", show_default=True, help="SSH login user.")
@click.option("--identity", type=click.Path(exists=True, dir_okay=False), help="Private key file.")
@click.option(
    "--become", type=click.Choice(["su", "sudo", "none"]), default="su", show_default=True
)
@click.option("--ta-user", default="ta", show_default=True)
@click.option("--fingerprint", help="Pinned host key fingerprint, SHA256:...")
@click.pass_obj
def host_add(app, cluster, address, port, username, identity, become, ta_user, fingerprint) -> None:
    """Add a host where ta-tool can be run."""
    import os

    from keyvault.services.hosts import add_host

    identity = os.path.abspath(identity) if identity else None
    with app.transaction() as session:
        h = add_host(
            session,
            cluster_name=cluster,
            address=address,
            port=port,
            username=username,
            identity_file=identity,
            become=become,
            ta_user=ta_user,
            fingerprint=fingerprint,
        )
        label = h.label
    click.echo(f"host {label} added to {cluster}")
    if not fingerprint:
        click.echo(
            f"its host key is not trusted yet: run `keyvault host trust {cluster} {address}"
            f"{'' if port == 22 else f' --port {port}'}`"
        )


@host.command("list")
@click.option("--cluster")
@output_option
@click.pass_obj
def host_list(app, cluster, as_json) -> None:
    """List hosts in the order they are tried."""
    from keyvault.services.hosts import list_hosts

    with app.transaction() as session:
        rows = [
            {
                "cluster": h.cluster.name,
                "address": h.address,
                "port": h.port,
                "user": h.username,
                "become": h.become,
                "ta_user": h.ta_user,
                "identity": h.identity_file,
                "fingerprint": h.host_key_fingerprint or "(untrusted)",
            }
            for h in list_hosts(session, cluster_name=cluster)
        ]
    emit_json(rows) if as_json else emit_table(
        rows, ("cluster", "address", "port", "user", "become", "ta_user", "fingerprint")
    )


@host.command("remove")
@click.argument("cluster")
@click.argument("address")
@click.option("--port", type=int)
@click.pass_obj
def host_remove(app, cluster, address, port) -> None:
    """Remove a host (refused while a rotation on it is unresolved)."""
    from keyvault.services.hosts import remove_host

    with app.transaction() as session:
        remove_host(session, cluster_name=cluster, address=address, port=port)
    click.echo(f"host {address} removed from {cluster}")


@host.command("trust")
@click.argument("cluster")
@click.argument("address")
@click.option("--port", type=int)
@click.option("--yes", is_flag=True, help="Pin without asking (for scripts).")
@click.pass_obj
def host_trust(app, cluster, address, port, yes) -> None:
    """Show the host key the server offers and pin it after confirmation."""
    from keyvault.services.hosts import get_host, pin_host_key, ssh_target

    with app.transaction() as session:
        h = get_host(session, cluster_name=cluster, address=address, port=port)
        offered = app.connector.offered_fingerprint(ssh_target(h, app.settings))
        click.echo(f"{h.address}:{h.port} offers host key {offered}")
        if h.host_key_fingerprint:
            click.echo(
                f"currently pinned: {h.host_key_fingerprint}"
                + (" (same)" if offered == h.host_key_fingerprint else " (DIFFERENT)")
            )
        if not yes:
            click.confirm(
                "Compare it with the host's own `ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub`. Pin it?",
                abort=True,
                err=True,
            )
        pin_host_key(session, host=h, fingerprint=offered)
    click.echo(f"pinned {offered} for {address}")


@host.command("check")
@click.argument("cluster")
@click.argument("address", required=False)
@click.pass_obj
def host_check(app, cluster, address) -> None:
    """Connect, become ta and confirm ta-tool is on its PATH; generates nothing."""
    from keyvault.services.hosts import check_host, list_hosts

    with app.transaction() as session:
        hosts = [
            h for h in list_hosts(session, cluster_name=cluster) if address in (None, h.address)
        ]
        if not hosts:
            raise click.UsageError(f"no host {address or ''} in cluster {cluster}")
        for h in hosts:
            click.echo(check_host(session, host=h, settings=app.settings, connector=app.connector))


COMMANDS = [host]
