"""rotate root|app, rotations list|show|recover, verify."""

from __future__ import annotations

import sys

import click

from keyvault.cli.output import emit_json, emit_table, output_option, resolve_scope, scope_options

WARNING = (
    "ta-tool invalidates the current {what} of cluster {cluster} AT ONCE: every consumer still "
    "holding it fails until it fetches the new one."
)


def _confirm(yes: bool, what: str, cluster: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(
            "rotation needs confirmation: pass --yes when not running on a terminal"
        )
    click.echo(WARNING.format(what=what, cluster=cluster), err=True)
    click.confirm("Rotate now?", abort=True, err=True)


def _print_outcome(o) -> None:
    old = f"v{o.old_version} {o.old_fingerprint} (invalidated)" if o.old_version else "none"
    click.echo(f"{o.cluster} {o.scope}: rotated ({o.rotation_id} on {o.host})")
    click.echo(f"  old: {old}")
    click.echo(f"  new: v{o.new_version} {o.new_fingerprint}")
    click.echo(f"  verify: {o.verify_state} - {o.verify_message}")
    for warning in o.warnings:
        click.echo(f"  warning: {warning}", err=True)


def _run(app, cluster: str, scopes: list, as_json: bool, concurrency: int = 4) -> None:
    if len(scopes) == 1:
        with app.rotation_service() as service:
            outcome = service.rotate(cluster, scopes[0], actor=app.settings.actor)
        # A list, as for every rotate command since issue 3 (scripts index [0]).
        emit_json([outcome.as_dict()]) if as_json else _print_outcome(outcome)
        return
    results = _rotate_many(app, cluster, scopes, as_json, concurrency)
    _summarise(results, as_json)


def _rotate_many(app, cluster, scopes, as_json, concurrency) -> list:
    import threading

    show_bar = not as_json and sys.stderr.isatty()
    lock = threading.Lock()
    with (
        click.progressbar(
            length=len(scopes), label=f"rotating {len(scopes)} keys", file=sys.stderr, show_pos=True
        )
        if show_bar
        else _NoBar() as bar
    ):

        def done(scope, result):
            with lock:
                bar.update(1)
                if not show_bar and not as_json:
                    _print_line(scope, result)

        with app.rotation_service() as service:
            return service.rotate_many(
                cluster, scopes, actor=app.settings.actor, concurrency=concurrency, on_done=done
            )


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        pass


def _print_line(scope, result) -> None:
    if isinstance(result, Exception):
        click.echo(f"{scope}: FAILED: {result}", err=True)
    else:
        old = f" (was v{result.old_version})" if result.old_version else ""
        click.echo(
            f"{scope}: v{result.new_version} {result.new_fingerprint}{old}, verify {result.verify_state}"
        )


def _summarise(results: list, as_json: bool) -> None:
    from keyvault.errors import KeyvaultError, RotationUnresolved

    rotated = [r.as_dict() for _, r in results if not isinstance(r, Exception)]
    skipped = [
        {"scope": str(s), "reason": str(r), "rotation_id": r.rotation_id}
        for s, r in results
        if isinstance(r, RotationUnresolved)
    ]
    failed = [
        {
            "scope": str(s),
            "reason": str(r)
            if isinstance(r, KeyvaultError)
            else f"internal error ({type(r).__name__})",
            "rotation_id": getattr(r, "rotation_id", None),
        }
        for s, r in results
        if isinstance(r, Exception) and not isinstance(r, RotationUnresolved)
    ]
    if as_json:
        emit_json({"rotated": rotated, "failed": failed, "skipped": skipped})
    else:
        click.echo(
            f"summary: {len(rotated)} rotated, {len(failed)} failed, {len(skipped)} skipped",
            err=True,
        )
        for item in failed:
            click.echo(f"  failed  {item['scope']}: {item['reason']}", err=True)
        for item in skipped:
            click.echo(f"  skipped {item['scope']}: {item['reason']}", err=True)
    if failed:
        sys.exit(1)


@click.group()
def rotate() -> None:
    """Generate new keys with ta-tool over SSH (the old key dies at once)."""


@rotate.command("root")
@click.option("--cluster", required=True)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@output_option
@click.pass_obj
def rotate_root(app, cluster, yes, as_json) -> None:
    """Rotate the root key of a cluster."""
    from keyvault.scope import root_scope

    _confirm(yes, "root key (valid for every project)", cluster)
    _run(app, cluster, [root_scope()], as_json)


@rotate.command("app")
@click.option("--cluster", required=True)
@click.argument("appids", nargs=-1)
@click.option("--all", "all_apps", is_flag=True, help="Every app keyvault knows for the cluster.")
@click.option(
    "--concurrency",
    default=4,
    show_default=True,
    type=click.IntRange(1, 32),
    help="Parallel channels over one SSH connection per host (keep within sshd's MaxSessions).",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@output_option
@click.pass_obj
def rotate_app(app, cluster, appids, all_apps, concurrency, yes, as_json) -> None:
    """Rotate the key of one or more projects."""
    from keyvault.scope import app_scope

    if bool(appids) == all_apps:
        raise click.UsageError("give APPIDs or --all")
    if all_apps:
        from keyvault.services.clusters import get_cluster
        from keyvault.services.policies import app_scopes_of

        with app.transaction() as session:
            appids = [s[4:] for s in app_scopes_of(session, get_cluster(session, name=cluster))]
        if not appids:
            raise click.UsageError(
                f"keyvault knows no apps of cluster {cluster}: import or rotate one first, "
                f"or map project ids with `keyvault cluster set {cluster} --project-id APPID=N`"
            )
    scopes = [app_scope(a, app.settings.appid_pattern) for a in dict.fromkeys(appids)]
    shown = ", ".join(appids[:5]) + (f" and {len(appids) - 5} more" if len(appids) > 5 else "")
    _confirm(yes, f"key of {shown}", cluster)
    _run(app, cluster, scopes, as_json, concurrency)


@rotate.command("due")
@click.option("--cluster", help="Only this cluster.")
@click.option(
    "--dry-run", is_flag=True, help="Show what is due and why the rest is not; rotate nothing."
)
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 32))
@output_option
@click.pass_obj
def rotate_due(app, cluster, dry_run, concurrency, as_json) -> None:
    """Rotate every scope whose key is older than its policy allows (for cron/timers)."""
    from keyvault.models import utcnow
    from keyvault.services.scheduler import Scheduler

    scheduler = Scheduler(
        app.factory,
        settings=app.settings,
        connector=app.connector,
        clock=utcnow,
        concurrency=concurrency,
    )
    report = scheduler.run(dry_run=dry_run, cluster_name=cluster)
    rows = [vars(r) for r in report.results]
    if as_json:
        emit_json(
            {
                "lease": "acquired"
                if report.lease_acquired
                else "held elsewhere"
                if report.lease_holder
                else "not needed",
                "holder": report.lease_holder,
                "results": rows,
            }
        )
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


@click.group()
def rotations() -> None:
    """Inspect and recover rotations."""


def _rotation_row(r) -> dict:
    return {
        "id": r.id,
        "cluster": r.cluster.name,
        "scope": r.scope,
        "state": r.state,
        "host": r.host_label,
        "actor": r.actor,
        "created_at": r.created_at.isoformat(),
        "updated_at": r.updated_at.isoformat(),
        "old_version": r.old_version,
        "new_version": r.new_version,
        "new_fingerprint": r.new_fingerprint,
        "cleaned_up": bool(r.cleaned_up),
        "verify_state": r.verify_state,
        "verify_code": r.verify_code,
        "verify_message": r.verify_message,
        "error": r.error,
    }


@rotations.command("list")
@click.option("--state", help="pending, needs_recovery, failed, stored, completed or abandoned")
@click.option("--cluster")
@output_option
@click.pass_obj
def rotations_list(app, state, cluster, as_json) -> None:
    """List rotations, newest first."""
    from sqlalchemy import select

    from keyvault.models import Cluster, Rotation

    with app.transaction() as session:
        stmt = select(Rotation).join(Cluster).order_by(Rotation.created_at.desc()).limit(500)
        if state:
            stmt = stmt.where(Rotation.state == state)
        if cluster:
            stmt = stmt.where(Cluster.name == cluster)
        rows = [_rotation_row(r) for r in session.scalars(stmt)]
    emit_json(rows) if as_json else emit_table(
        rows,
        ("id", "cluster", "scope", "state", "created_at", "new_version", "verify_state", "host"),
    )


@rotations.command("show")
@click.argument("rotation_id")
@output_option
@click.pass_obj
def rotations_show(app, rotation_id, as_json) -> None:
    """Show one rotation."""
    from keyvault.errors import NotFound
    from keyvault.models import Rotation

    with app.transaction() as session:
        r = session.get(Rotation, rotation_id)
        if r is None:
            raise NotFound(f"no rotation {rotation_id!r}", hint="see `keyvault rotations list`")
        row = _rotation_row(r)
    if as_json:
        emit_json(row)
    else:
        for name, value in row.items():
            click.echo(f"{name:16} {'' if value is None else value}")


@rotations.command("recover")
@click.argument("rotation_id", required=False)
@click.option(
    "--all",
    "all_rotations",
    is_flag=True,
    help="Every unresolved rotation, and every stored one not cleaned up (after a crash or a "
    "dropped bulk run).",
)
@click.option("--cluster", help="With --all: only this cluster.")
@click.option("--regenerate", is_flag=True, help="Give up this rotation and run ta-tool again.")
@click.option("--yes", is_flag=True)
@output_option
@click.pass_obj
def rotations_recover(app, rotation_id, all_rotations, cluster, regenerate, yes, as_json) -> None:
    """Complete an interrupted rotation without running ta-tool again."""
    from keyvault.models import Rotation
    from keyvault.scope import parse_scope

    if (
        all_rotations == bool(rotation_id)
        or (cluster and not all_rotations)
        or (all_rotations and regenerate)
    ):
        raise click.UsageError(
            "give one ROTATION_ID, or --all [--cluster C] (--regenerate takes one ID)"
        )
    service = app.rotation_service()
    if all_rotations:
        with service:
            _recover_summary(
                service.recover_all(actor=app.settings.actor, cluster_name=cluster), as_json
            )
        return
    if regenerate:
        with app.transaction() as session:
            r = session.get(Rotation, rotation_id)
            cluster, scope = (r.cluster.name, parse_scope(r.scope, r".+")) if r else (None, None)
        if r is None:
            raise click.UsageError(f"no rotation {rotation_id!r}")
        _confirm(
            yes,
            f"{scope} key (the key ta-tool may already have generated for {rotation_id} is dropped)",
            cluster,
        )
        service.abandon(rotation_id, reason="abandoned for --regenerate")
        outcome = service.rotate(cluster, scope, actor=app.settings.actor)
    else:
        outcome = service.recover(rotation_id, actor=app.settings.actor)
    if as_json:
        emit_json(outcome.as_dict())
        return
    click.echo(f"rotation {outcome.rotation_id}: {outcome.state}")
    if outcome.new_version:
        _print_outcome(outcome)
    for warning in outcome.warnings:
        click.echo(f"  {warning}")


def _recover_summary(results: list, as_json: bool) -> None:
    from keyvault.errors import KeyvaultError

    rows = []
    for rid, scope, result in results:
        if isinstance(result, Exception):
            reason = (
                str(result)
                if isinstance(result, KeyvaultError)
                else f"internal error ({type(result).__name__})"
            )
            rows.append({"id": rid, "scope": scope, "state": "unresolved", "detail": reason})
        else:
            rows.append(
                {
                    "id": rid,
                    "scope": scope,
                    "state": result.state,
                    "detail": "; ".join(result.warnings),
                }
            )
    left = [row for row in rows if row["state"] == "unresolved"]
    if as_json:
        emit_json(rows)
    else:
        if rows:
            emit_table(rows, ("id", "scope", "state", "detail"))
        click.echo(
            f"summary: {len(rows)} examined, {len(rows) - len(left)} settled, {len(left)} still unresolved",
            err=True,
        )
    if left:
        sys.exit(1)


@click.command()
@scope_options
@output_option
@click.pass_obj
def verify(app, cluster, is_root, appid, as_json) -> None:
    """Call the TA Open API with the current key of a scope."""
    from keyvault.services.verify import verify_current

    scope = resolve_scope(is_root, appid, app.settings)
    with app.transaction() as session:
        number, result = verify_current(
            session,
            keyring=app.keyring(session),
            cluster_name=cluster,
            scope=scope,
            settings=app.settings,
        )
    info = {
        "cluster": cluster,
        "scope": str(scope),
        "version": number,
        "state": result.state,
        "return_code": result.return_code,
        "message": result.message,
    }
    emit_json(info) if as_json else click.echo(
        f"{cluster} {scope} v{number}: {result.state} - {result.message}"
    )
    if result.state == "failed":
        sys.exit(1)


COMMANDS = [rotate, rotations, verify]
