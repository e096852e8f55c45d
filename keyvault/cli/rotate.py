"""`keyvault rotate root|app|due`: new keys from ta-tool over SSH (the old key dies at once).

Every `rotate root|app` prints one JSON shape: ``{"results": [...], "summary": {...}}``
with a result per scope (its ``status``, the outcome fields and, when it failed,
``error``), whether one scope or many were rotated.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from keyvault.cli.audited import audited
from keyvault.cli.confirm import confirm, yes_option
from keyvault.cli.consumers import after_rotation, propagation_options, show_plan
from keyvault.cli.output import echo_safe, emit_json, emit_table, output_option
from keyvault.cli.params import complete_appids, complete_clusters

if TYPE_CHECKING:
    from keyvault.cli.context import AppContext
    from keyvault.scope import Scope
    from keyvault.services.rotation import RotationResult

WARNING = (
    "ta-tool invalidates the current {what} of cluster {cluster} AT ONCE: every consumer still "
    "holding it fails until it fetches the new one."
)


def confirm_rotation(yes: bool, what: str, cluster: str) -> None:
    """Ask before a rotation unless ``--yes``; refuse without a terminal."""
    confirm(
        yes,
        command="rotation",
        warning=WARNING.format(what=what, cluster=cluster),
        question="Rotate now?",
    )


def print_rotated(o: RotationResult) -> None:
    """The lines of one successful rotation."""
    old = f"v{o.old_version} {o.old_fingerprint} (invalidated)" if o.old_version else "none"
    click.echo(f"{o.cluster} {o.scope}: rotated ({o.rotation_id} on {o.host})")
    click.echo(f"  old: {old}")
    click.echo(f"  new: v{o.new_version} {o.new_fingerprint}")
    echo_safe(f"  verify: {o.verify_state} - {o.verify_message}")
    click.echo(f"  old key at TA: {o.old_key or 'unchecked'}")  # propagation (cli/consumers.py)
    for warning in o.warnings:
        echo_safe(f"  warning: {warning}", err=True)


def summary(results: list[RotationResult]) -> dict[str, int]:
    """How many scopes were rotated, failed, or skipped (another rotation unresolved)."""
    from keyvault.services.rotation import ResultStatus

    skipped = sum(1 for r in results if r.status is ResultStatus.REFUSED)
    rotated = sum(1 for r in results if r.ok)
    return {"rotated": rotated, "failed": len(results) - rotated - skipped, "skipped": skipped}


def _run(
    app: AppContext, cluster: str, scopes: list[Scope], as_json: bool, concurrency: int = 4
) -> list[RotationResult]:
    if len(scopes) == 1:
        return [_run_one(app, cluster, scopes[0], as_json)]
    results = _rotate_many(app, cluster, scopes, as_json, concurrency)
    _summarise(results, as_json)
    return results


def _run_one(app: AppContext, cluster: str, scope: Scope, as_json: bool) -> RotationResult:
    """One scope: its failure is the command's error (one line, its exit code); with --json,
    stdout still holds the same shape as for several scopes."""
    from keyvault.errors import KeyvaultError
    from keyvault.services.rotation import RotationResult

    try:
        with app.rotation_service() as service:
            result = service.rotate(cluster, scope, actor=app.settings.actor)
    except KeyvaultError as exc:
        if as_json:
            failed = RotationResult.failed(cluster, str(scope), exc)
            emit_json({"results": [failed.as_dict()], "summary": summary([failed])})
        raise
    if as_json:
        emit_json({"results": [result.as_dict()], "summary": summary([result])})
    else:
        print_rotated(result)
    return result


@contextmanager
def _progress(length: int, show: bool) -> Iterator[Any]:
    if not show:
        yield None
        return
    label = f"rotating {length} keys"
    with click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True) as bar:
        yield bar


def _rotate_many(
    app: AppContext, cluster: str, scopes: list[Scope], as_json: bool, concurrency: int
) -> list[RotationResult]:
    show_bar = not as_json and sys.stderr.isatty()
    lock = threading.Lock()
    with _progress(len(scopes), show_bar) as bar:

        def done(result: RotationResult) -> None:
            with lock:
                if bar is not None:
                    bar.update(1)
                elif not as_json:
                    _print_line(result)

        with app.rotation_service() as service:
            return service.rotate_many(
                cluster, scopes, actor=app.settings.actor, concurrency=concurrency, on_done=done
            )


def _print_line(result: RotationResult) -> None:
    if result.failure is not None:
        echo_safe(f"{result.scope}: FAILED: {result.failure}", err=True)
    else:
        old = f" (was v{result.old_version})" if result.old_version else ""
        click.echo(
            f"{result.scope}: v{result.new_version} {result.new_fingerprint}{old}, verify {result.verify_state}"
        )


def _summarise(results: list[RotationResult], as_json: bool) -> None:
    from keyvault.services.rotation import ResultStatus

    counts = summary(results)
    if as_json:
        emit_json({"results": [r.as_dict() for r in results], "summary": counts})
    else:
        click.echo(
            f"summary: {counts['rotated']} rotated, {counts['failed']} failed, "
            f"{counts['skipped']} skipped",
            err=True,
        )
        for r in results:
            if r.failure is not None:
                what = "skipped" if r.status is ResultStatus.REFUSED else "failed "
                echo_safe(f"  {what} {r.scope}: {r.failure}", err=True)
    # No exit here: the rotated scopes still get their old-key alert and their wait
    # (after_rotation), which then exits with the highest-priority code.


def _finish(app: AppContext, results: list[RotationResult], wait: float | None) -> None:
    """The alert, the wait and the exit code of a rotation run (one scope or many)."""
    after_rotation(app, results, wait, failed=summary(results)["failed"] > 0)


def _apps_target(params: dict) -> dict[str, str | None]:
    appids = list(dict.fromkeys(params["appids"]))
    if len(appids) == 1 and not params["all_apps"]:
        return {"cluster": params["cluster"], "scope": f"app:{appids[0]}"}
    return {"cluster": params["cluster"], "target": "apps: " + (" ".join(appids) or "--all")}


@click.group()
def rotate() -> None:
    """Generate new keys with ta-tool over SSH (the old key dies at once)."""


@rotate.command("root")
@click.option("--cluster", required=True, shell_complete=complete_clusters)
@propagation_options
@yes_option
@output_option
@click.pass_obj
@audited(
    "rotate.root",
    about=lambda p: {"cluster": p["cluster"], "scope": "root"},
    when=lambda p: not p["plan"],
)
def rotate_root(
    app: AppContext,
    cluster: str,
    plan: bool,
    wait_propagation: float | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Rotate the root key of a cluster."""
    from keyvault.scope import root_scope

    if plan:
        return show_plan(app, cluster, [root_scope()], as_json)
    confirm_rotation(yes, "root key (valid for every project)", cluster)
    _finish(app, _run(app, cluster, [root_scope()], as_json), wait_propagation)


def _all_appids(app: AppContext, cluster: str) -> list[str]:
    from keyvault.services.clusters import get_cluster
    from keyvault.services.policies import app_scopes_of

    with app.transaction() as session:
        appids = [s[4:] for s in app_scopes_of(session, get_cluster(session, name=cluster))]
    if not appids:
        raise click.UsageError(
            f"keyvault knows no apps of cluster {cluster}: import or rotate one first, "
            f"or map project ids with `keyvault cluster set {cluster} --project-id APPID=N`"
        )
    return appids


@rotate.command("app")
@click.option("--cluster", required=True, shell_complete=complete_clusters)
@click.argument("appids", nargs=-1, shell_complete=complete_appids)
@click.option("--all", "all_apps", is_flag=True, help="Every app keyvault knows for the cluster.")
@click.option(
    "--concurrency",
    default=4,
    show_default=True,
    type=click.IntRange(1, 32),
    help="Parallel channels over one SSH connection per host (keep within sshd's MaxSessions).",
)
@propagation_options
@yes_option
@output_option
@click.pass_obj
@audited("rotate.app", about=_apps_target, when=lambda p: not p["plan"])
def rotate_app(
    app: AppContext,
    cluster: str,
    appids: tuple[str, ...],
    all_apps: bool,
    concurrency: int,
    plan: bool,
    wait_propagation: float | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Rotate the key of one or more projects."""
    from keyvault.scope import app_scope

    if bool(appids) == all_apps:
        raise click.UsageError("give APPIDs or --all")
    names = _all_appids(app, cluster) if all_apps else list(appids)
    scopes = [app_scope(a, app.settings.appid_pattern) for a in dict.fromkeys(names)]
    if plan:
        return show_plan(app, cluster, scopes, as_json)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    confirm_rotation(yes, f"key of {shown}", cluster)
    _finish(app, _run(app, cluster, scopes, as_json, concurrency), wait_propagation)


@rotate.command("due")
@click.option("--cluster", help="Only this cluster.", shell_complete=complete_clusters)
@click.option(
    "--dry-run", is_flag=True, help="Show what is due and why the rest is not; rotate nothing."
)
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 32))
@output_option
@click.pass_obj
@audited("rotate.due", about=lambda p: {"cluster": p["cluster"]}, when=lambda p: not p["dry_run"])
def rotate_due(
    app: AppContext, cluster: str | None, dry_run: bool, concurrency: int, as_json: bool
) -> None:
    """Rotate every scope whose key is older than its policy allows (for cron/timers)."""
    from datetime import timedelta

    from keyvault.models import utcnow
    from keyvault.services.scheduler import Scheduler

    scheduler = Scheduler(
        app.factory,
        settings=app.settings,
        connector=app.connector,
        clock=utcnow,
        concurrency=concurrency,
        lease_ttl=timedelta(seconds=app.settings.lease_ttl),
        database_time=True,
    )
    report = scheduler.run(dry_run=dry_run, cluster_name=cluster)
    rows = [vars(r) for r in report.results]
    if as_json:
        lease = (
            "acquired"
            if report.lease_acquired
            else "held elsewhere"
            if report.lease_holder
            else "not needed"
        )
        emit_json({"lease": lease, "holder": report.lease_holder, "results": rows})
    elif not dry_run and not report.lease_acquired:
        click.echo(
            f"another runner holds the rotation lease ({report.lease_holder}); nothing to do here"
        )
    else:
        emit_table(
            rows, ("cluster", "scope", "status", "reason"), empty="no scope has a rotation policy"
        )
        if not dry_run:
            click.echo(
                f"summary: {report.count('rotated')} rotated, {report.count('failed')} failed, "
                f"{report.count('skipped')} skipped",
                err=True,
            )
    if report.count("failed"):
        sys.exit(1)


COMMANDS = [rotate]
