"""`keyvault consumers`: who read which version of which key (see docs/propagation.md).

Also the propagation parts of other commands, kept here so that `rotate` and `rotations`
carry only a few lines: `rotate --plan`, `rotate --wait-propagation`, the exit status of a
previous key TA still accepts, and the `propagation` of `rotations show`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from keyvault.cli.audited import audited, key_scope
from keyvault.cli.confirm import confirm, yes_option
from keyvault.cli.output import echo_safe, emit_json, emit_table, output_option
from keyvault.cli.params import complete_appids, complete_clusters

if TYPE_CHECKING:
    from keyvault.cli.context import AppContext
    from keyvault.scope import Scope
    from keyvault.services.rotation import RotationResult

EXIT_STRAGGLERS = 4  # --wait-propagation ran out with consumers still on the old key
EXIT_OLD_KEY_ACCEPTED = 5  # TA still accepts the previous key: it was not invalidated
POLL_SECONDS = 0.5  # how often --wait-propagation reads the store
COLUMNS = ("token", "consumer", "cluster", "scope", "version", "last_read_at", "stale")


def _key_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in (
        click.option("--root", "is_root", is_flag=True, help="Only the root key."),
        click.option("--appid", shell_complete=complete_appids, help="Only this project's key."),
        click.option("--cluster", shell_complete=complete_clusters, help="Only this cluster."),
    ):
        func = option(func)
    return func


def _scope(app: AppContext, appid: str | None, is_root: bool) -> str | None:
    from keyvault.scope import app_scope

    if appid is not None and is_root:
        raise click.UsageError("give at most one of --root or --appid APPID")
    return (
        "root" if is_root else str(app_scope(appid, app.settings.appid_pattern)) if appid else None
    )


@click.group(invoke_without_command=True)
@_key_options
@output_option
@click.pass_context
def consumers(
    ctx: click.Context, cluster: str | None, appid: str | None, is_root: bool, as_json: bool
) -> None:
    """One row per consumer and key: the version it read last, and whether it is stale."""
    from keyvault.services.propagation import list_consumers

    if ctx.invoked_subcommand is not None:
        return
    app: AppContext = ctx.obj
    scope = _scope(app, appid, is_root)
    with app.transaction() as session:
        rows = list_consumers(session, cluster=cluster, scope=scope)
    if as_json:
        emit_json(rows)
    else:  # table cells escape control characters (a consumer name is the client's text)
        emit_table(rows, COLUMNS, empty="no consumer has read a key through `keyvault serve`")


@consumers.command("forget")
@click.option("--token", "token", required=True, help="The token whose consumer is gone.")
@click.option("--consumer", help="Only this consumer name (default: every one of the token).")
@_key_options
@yes_option
@click.pass_obj
@audited(
    "consumers.forget",
    about=lambda p: {
        **key_scope(p),
        "target": f"token:{p['token']}",
        "detail": f"consumer:{p['consumer']}" if p["consumer"] else None,
    },
)
def forget(
    app: AppContext,
    token: str,
    consumer: str | None,
    cluster: str | None,
    appid: str | None,
    is_root: bool,
    yes: bool,
) -> None:
    """Forget a one-off or decommissioned consumer: it stops holding rotations back."""
    from keyvault.services.propagation import forget_consumers

    scope = _scope(app, appid, is_root)
    what = (
        f"consumer {consumer!r} of token {token!r}"
        if consumer
        else f"every consumer of token {token!r}"
    )
    confirm(
        yes,
        command="consumers forget",
        warning=f"{what} will no longer count as a consumer (until it reads a key again).",
        question="Forget?",
    )
    with app.transaction() as session:
        count, recorded = forget_consumers(
            session, token=token, consumer=consumer, cluster=cluster, scope=scope
        )
    echo_safe(f"forgot {count} consumer record(s) of token {token}")
    for rid in recorded:
        click.echo(f"rotation {rid} propagated: every known consumer holds its key")


# -- `rotate`: --plan and --wait-propagation -------------------------------------------------------
def propagation_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--plan`` and ``--wait-propagation SECONDS`` for `rotate root|app`."""
    func = click.option(
        "--wait-propagation",
        "wait_propagation",
        type=click.FloatRange(0, 86400),
        metavar="SECONDS",
        help="After rotating, wait until every known consumer holds the new key; exit "
        f"{EXIT_STRAGGLERS} naming the stragglers if they do not in time.",
    )(func)
    return click.option(
        "--plan",
        is_flag=True,
        help="Rotate nothing: list the consumers that will lose their key.",
    )(func)


def show_plan(app: AppContext, cluster: str, scopes: list[Scope], as_json: bool) -> None:
    """`rotate --plan`: every consumer seen in 30 days of each scope, with its version."""
    from keyvault.services.clusters import get_cluster
    from keyvault.services.propagation import plan

    with app.transaction() as session:
        get_cluster(session, name=cluster)  # NotFound for a cluster that does not exist
        found = plan(session, cluster, [str(s) for s in scopes])
    if as_json:
        emit_json({"plan": found})
        return
    for item in found:
        echo_safe(
            f"{cluster} {item['scope']} (v{item['current_version'] or '-'}): "
            f"{len(item['consumers'])} consumer(s) will lose their key"
        )
        if item["consumers"]:
            emit_table(item["consumers"], ("token", "consumer", "version", "last_read_at", "stale"))


def after_rotation(
    app: AppContext, results: list[RotationResult], wait: float | None, *, failed: bool = False
) -> None:
    """Wait for propagation of the rotated scopes if asked, then exit with the code that
    matters most: 5 (TA still accepts an old key), then 1 (``failed``: some scope of a bulk
    run failed), then 4 (consumers still on an old key when the wait ran out)."""
    rotated = [r for r in results if r.ok and r.rotation_id and r.new_version]
    code = 0
    if wait is not None and rotated:
        code = wait_for_propagation(app, [r.rotation_id for r in rotated if r.rotation_id], wait)
    accepted = [r for r in rotated if r.old_key == "still_accepted"]
    for r in accepted:
        echo_safe(
            f"ALERT: TA still accepts the previous key (v{r.old_version}) of {r.scope} in "
            f"{r.cluster}: it was NOT invalidated (rotation {r.rotation_id}); see docs/propagation.md",
            err=True,
        )
    if accepted:
        sys.exit(EXIT_OLD_KEY_ACCEPTED)
    if failed:
        sys.exit(1)
    if code:
        sys.exit(code)


def wait_for_propagation(app: AppContext, rotation_ids: list[str], seconds: float) -> int:
    """Poll until every known consumer of each rotation holds its key (0), or the time runs
    out (``EXIT_STRAGGLERS``, the stragglers named on stderr). Records ``rotation.propagated``
    (once, whoever notices first)."""
    from keyvault.services.propagation import claim_propagated, propagation_of
    from keyvault.services.rotation.journal import get_rotation

    deadline, started = time.monotonic() + seconds, time.monotonic()
    left = list(rotation_ids)
    while True:
        pending = []
        with app.transaction() as session:
            for rid in left:
                figures = propagation_of(session, get_rotation(session, rid))
                if figures.complete:
                    if figures.consumers:
                        claim_propagated(session, figures)
                    click.echo(
                        f"{figures.scope}: {figures.updated}/{figures.consumers} consumer(s) hold "
                        f"v{figures.version} ({time.monotonic() - started:.1f}s)",
                        err=True,
                    )
                else:
                    pending.append(figures)
        left = [f.rotation_id for f in pending]
        if not left:
            return 0
        if time.monotonic() >= deadline:
            break
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
    for f in pending:
        names = ", ".join(f"{s['token']}/{s['consumer']} (v{s['version']})" for s in f.stale)
        echo_safe(
            f"{f.scope}: {len(f.stale)} of {f.consumers} consumer(s) still on an old key after "
            f"{seconds:g}s: {names}",
            err=True,
        )
    return EXIT_STRAGGLERS


# -- `rotations show` ---------------------------------------------------------------------------
def rotation_propagation(session: Any, rotation: Any) -> dict[str, Any]:
    """The ``propagation`` and ``old_key`` of a rotation, for `rotations show`."""
    from keyvault.services.propagation import propagation_of

    return {"old_key": rotation.old_key, "propagation": propagation_of(session, rotation).as_dict()}


def show_propagation(p: dict[str, Any]) -> None:
    """The ``propagation`` of `rotations show` as lines for people."""
    if p["version"] is None:
        click.echo(f"{'propagation':16} (no new key stored)")
        return
    state = "complete" if p["complete"] else f"{len(p['stale'])} stale"
    click.echo(
        f"{'propagation':16} {p['updated']}/{p['consumers']} consumer(s) hold v{p['version']}"
        f" ({state}; last at {p['last_updated_at'] or '-'})"
    )
    for s in p["stale"]:
        echo_safe(
            f"{'  stale':16} {s['token']}/{s['consumer']} holds v{s['version']}, last read {s['last_read_at']}"
        )


COMMANDS = [consumers]
