"""`keyvault sandbox`."""

from __future__ import annotations

import click

from keyvault.cli.output import emit_json, output_option


def _require_store(app) -> None:
    """Refuse before starting anything when `keyvault init` has not run."""
    from keyvault.errors import NotInitialized

    if not app.settings.home.exists():
        raise NotInitialized(
            f"keyvault has no home at {app.settings.home}", hint="run `keyvault init` first"
        )
    app.factory  # noqa: B018 - checks the schema is at head


def _parse_apps(values) -> list[str]:
    from keyvault.scope import validate_appid

    apps: list[str] = []
    for value in values:
        for appid in (a.strip() for a in value.split(",")):
            if not appid:
                continue
            validate_appid(appid)
            if appid not in apps:
                apps.append(appid)
    return apps


def _paths(app):
    from keyvault.sandbox.run import SandboxPaths

    return SandboxPaths(app.settings.home)


NOT_TA = "a simulator on 127.0.0.1, not TA"


@click.group()
def sandbox() -> None:
    """TA simulator: ta-tool, Open API and an SSH front on 127.0.0.1 (not TA).

    For trying keyvault and for tests, with no TA cluster and no root.
    """


@sandbox.command("up")
@click.option(
    "--ssh-port",
    type=click.IntRange(0, 65535),
    default=2022,
    show_default=True,
    help="SSH front port (a free one if taken; 0: any).",
)
@click.option(
    "--api-port",
    type=click.IntRange(0, 65535),
    default=8992,
    show_default=True,
    help="Open API emulator port (a free one if taken; 0: any).",
)
@click.option(
    "--apps",
    "apps",
    multiple=True,
    metavar="APPID,...",
    help="APPIDs known to the simulator (default demo,app1,app2,app3).",
)
@click.pass_obj
def sandbox_up(app, ssh_port: int, api_port: int, apps) -> None:
    """Start the simulator in the background and register it as cluster `sandbox`."""
    from keyvault.sandbox.registration import register
    from keyvault.sandbox.run import DEFAULT_APPS, start_background

    _require_store(app)
    wanted = _parse_apps(apps) or list(DEFAULT_APPS)
    paths = _paths(app)
    info = start_background(paths, ssh_port=ssh_port, api_port=api_port, apps=wanted)
    with app.transaction() as session:
        _, host = register(session, keyring=app.keyring(session), info=info, paths=paths)
        label = host.label
    from keyvault.sandbox import state as st

    known = sorted(st.read_state(paths.state_dir)["apps"])
    verb = "started" if info.get("started") else "already running"
    click.echo(f"TA simulator {verb} ({NOT_TA}), pid {info['pid']}:")
    click.echo(
        f"  SSH front          127.0.0.1:{info['ssh_port']}  host key {info['host_key_fingerprint']}"
    )
    click.echo(f"  Open API emulator  {info['open_api_url']}")
    click.echo(f"  ta-tool emulator   {paths.ta_tool}")
    click.echo(f"  apps               {', '.join(known)}")
    for asked, got, name in (
        (ssh_port, info["ssh_port"], "SSH"),
        (api_port, info["api_port"], "Open API"),
    ):
        if asked and asked != got:
            click.echo(f"  note: {name} port {asked} was not used; the simulator listens on {got}")
    click.echo(
        f"cluster sandbox registered: host {label}, become su, ta user ta, "
        f"identity {paths.client_key}, host key pinned"
    )
    click.echo("next:")
    click.echo("  keyvault host check sandbox")
    click.echo("  keyvault rotate root --cluster sandbox --yes")
    example = "demo" if "demo" in known or not known else known[0]
    click.echo(f"  keyvault rotate app --cluster sandbox {example} --yes")
    click.echo("  keyvault verify --cluster sandbox --root")
    click.echo("  keyvault sandbox status")
    click.echo("  keyvault sandbox down")


@sandbox.command("down")
@click.pass_obj
def sandbox_down(app) -> None:
    """Stop the simulator (the cluster stays registered; its keys stay stored)."""
    from keyvault.sandbox.run import stop

    pid = stop(_paths(app))
    if pid is None:
        click.echo("TA simulator is not running")
    else:
        click.echo(f"TA simulator stopped (pid {pid})")


@sandbox.command("status")
@output_option
@click.pass_obj
def sandbox_status(app, as_json: bool) -> None:
    """Show whether the simulator runs, its ports and apps (never a key)."""
    from keyvault.sandbox.run import status

    info = status(_paths(app))
    if as_json:
        emit_json(info)
        return
    if not info["running"]:
        click.echo(f"TA simulator ({NOT_TA}) is not running; `keyvault sandbox up` starts it")
    else:
        click.echo(f"TA simulator ({NOT_TA}) running, pid {info['pid']}")
        click.echo(
            f"  SSH front          127.0.0.1:{info.get('ssh_port')}  host key {info.get('host_key_fingerprint')}"
        )
        click.echo(f"  Open API emulator  {info.get('open_api_url')}")
    if "apps" in info:
        click.echo(f"  root key generations: {info['root_generations']}")
        for appid, entry in info["apps"].items():
            click.echo(
                f"  app {appid}: project {entry['project_id']}, generations {entry['generations']}"
            )


@sandbox.command("add-apps")
@click.argument("apps", nargs=-1, required=True)
@click.pass_obj
def sandbox_add_apps(app, apps) -> None:
    """Register more APPIDs in the simulator (and their project ids in cluster `sandbox`)."""
    from keyvault.errors import NotFound
    from keyvault.sandbox import state as st
    from keyvault.sandbox.registration import sync_project_ids

    wanted = _parse_apps(apps)
    paths = _paths(app)
    if not paths.prepared:
        raise NotFound("the TA simulator is not set up", hint="run `keyvault sandbox up` first")
    mapping = st.add_apps(paths.state_dir, wanted)
    synced = False
    if app.settings.home.exists():
        with app.transaction() as session:
            synced = sync_project_ids(session, keyring=app.keyring(session), paths=paths)
    for appid in wanted:
        click.echo(f"app {appid}: project {mapping[appid]}")
    if synced:
        click.echo("cluster sandbox: project ids updated")


COMMANDS = [sandbox]
