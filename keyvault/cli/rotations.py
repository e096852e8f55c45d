"""`keyvault rotations list|show|recover`: inspect and finish rotations.

`rotations recover` prints one JSON shape, for one ID or ``--all``:
``{"results": [...], "summary": {"examined", "settled", "unresolved"}}``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from keyvault.cli.audited import audited
from keyvault.cli.confirm import yes_option
from keyvault.cli.consumers import rotation_propagation, show_propagation
from keyvault.cli.output import echo_safe, emit_json, emit_table, output_option
from keyvault.cli.params import complete_clusters, complete_rotation_ids
from keyvault.cli.rotate import confirm_rotation, print_rotated
from keyvault.rotation_states import RotationState

if TYPE_CHECKING:
    from keyvault.cli.context import AppContext
    from keyvault.services.rotation import RotationResult


@click.group()
def rotations() -> None:
    """Inspect and recover rotations."""


@rotations.command("list")
@click.option("--state", type=click.Choice([s.value for s in RotationState]))
@click.option("--cluster", shell_complete=complete_clusters)
@output_option
@click.pass_obj
def rotations_list(app: AppContext, state: str | None, cluster: str | None, as_json: bool) -> None:
    """List rotations, newest first."""
    from keyvault.services.rotation.journal import list_rotations, rotation_info

    with app.transaction() as session:
        found = list_rotations(session, state=state, cluster_name=cluster)
        rows = [rotation_info(r) for r in found]
    emit_json(rows) if as_json else emit_table(
        rows,
        ("id", "cluster", "scope", "state", "created_at", "new_version", "verify_state", "host"),
    )


@rotations.command("show")
@click.argument("rotation_id", shell_complete=complete_rotation_ids)
@output_option
@click.pass_obj
def rotations_show(app: AppContext, rotation_id: str, as_json: bool) -> None:
    """Show one rotation."""
    from keyvault.services.rotation.journal import get_rotation, rotation_info

    with app.transaction() as session:
        rotation = get_rotation(session, rotation_id)
        row = rotation_info(rotation) | rotation_propagation(session, rotation)
    if as_json:
        emit_json(row)
    else:
        propagation = row.pop("propagation")
        for name, value in row.items():
            echo_safe(f"{name:16} {'' if value is None else value}")
        show_propagation(propagation)


@rotations.command("recover")
@click.argument("rotation_id", required=False, shell_complete=complete_rotation_ids)
@click.option(
    "--all",
    "all_rotations",
    is_flag=True,
    help="Every unresolved rotation, and every stored one not cleaned up (after a crash or a "
    "dropped bulk run).",
)
@click.option("--cluster", help="With --all: only this cluster.", shell_complete=complete_clusters)
@click.option("--regenerate", is_flag=True, help="Give up this rotation and run ta-tool again.")
@yes_option
@output_option
@click.pass_obj
@audited(
    "rotations.recover",
    about=lambda p: {
        "cluster": p["cluster"],
        "target": f"rotation:{p['rotation_id']}" if p["rotation_id"] else "rotations: --all",
        "detail": "--regenerate (abandon, then rotate again)" if p["regenerate"] else None,
    },
)
def rotations_recover(
    app: AppContext,
    rotation_id: str | None,
    all_rotations: bool,
    cluster: str | None,
    regenerate: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Complete an interrupted rotation without running ta-tool again."""
    if (
        all_rotations == bool(rotation_id)
        or (cluster and not all_rotations)
        or (all_rotations and regenerate)
    ):
        raise click.UsageError(
            "give one ROTATION_ID, or --all [--cluster C] (--regenerate takes one ID)"
        )
    if regenerate and rotation_id is not None:
        result = _regenerate(app, rotation_id, yes)
    else:
        with app.rotation_service() as service:
            if rotation_id is None:
                results = service.recover_all(actor=app.settings.actor, cluster_name=cluster)
                _recover_summary(results, as_json)
                return
            result = service.recover(rotation_id, actor=app.settings.actor)
    if as_json:
        emit_json({"results": [result.as_dict()], "summary": recover_summary([result])})
        return
    click.echo(f"rotation {result.rotation_id}: {result.state}")
    if result.new_version:
        print_rotated(result)
    for warning in result.warnings:
        echo_safe(f"  {warning}")


def _regenerate(app: AppContext, rotation_id: str, yes: bool) -> RotationResult:
    """Abandon the rotation (confirmed), then rotate its scope again."""
    from keyvault.scope import parse_scope
    from keyvault.services.rotation.journal import get_rotation

    with app.transaction() as session:
        r = get_rotation(session, rotation_id)
        cluster, scope = r.cluster.name, parse_scope(r.scope, r".+")
    what = f"{scope} key (the key ta-tool may already have generated for {rotation_id} is dropped)"
    confirm_rotation(yes, what, cluster)
    with app.rotation_service() as service:
        service.abandon(rotation_id, reason="abandoned for --regenerate")
        return service.rotate(cluster, scope, actor=app.settings.actor)


def recover_summary(results: list[RotationResult]) -> dict[str, int]:
    """How many rotations were examined, settled, and are still unresolved."""
    left = sum(1 for r in results if r.failure is not None)
    return {"examined": len(results), "settled": len(results) - left, "unresolved": left}


def _recover_summary(results: list[RotationResult], as_json: bool) -> None:
    counts = recover_summary(results)
    if as_json:
        emit_json({"results": [r.as_dict() for r in results], "summary": counts})
    else:
        rows = [
            {
                "id": r.rotation_id,
                "scope": r.scope,
                "state": "unresolved" if r.failure is not None else r.state,
                "detail": str(r.failure) if r.failure is not None else "; ".join(r.warnings),
            }
            for r in results
        ]
        if rows:
            emit_table(rows, ("id", "scope", "state", "detail"))
        click.echo(
            f"summary: {counts['examined']} examined, {counts['settled']} settled, "
            f"{counts['unresolved']} still unresolved",
            err=True,
        )
    if counts["unresolved"]:
        sys.exit(1)


COMMANDS = [rotations]
