"""`keyvault backup / restore`."""

from __future__ import annotations

from pathlib import Path

import click

from keyvault.cli.audited import app_chain, audited
from keyvault.cli.confirm import confirm, yes_option
from keyvault.cli.output import emit_json, output_option


def _summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in counts.items())


REPLACE_WARNING = (
    "restore --replace DELETES every cluster, key version, host, rotation, webhook and event "
    "of this store and puts the backup's in their place (one transaction); tokens, their "
    "revocations and the audit log are kept."
)


@click.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@output_option
@click.pass_obj
@audited("backup", about=lambda p: {"target": str(p["file"])})
def backup(app, file: Path, force: bool, as_json: bool) -> None:
    """Write an encrypted backup of the whole store to FILE (mode 0600).

    The master keyring is NOT in the backup: keep a copy of the keyring file
    (KEYVAULT_MASTER_KEY_FILE) with it, or the backup cannot be restored.
    """
    from keyvault.db import transaction
    from keyvault.errors import Conflict
    from keyvault.services import backup as service

    if (file.exists() or file.is_symlink()) and not force:
        raise Conflict(
            f"{file} already exists", hint="choose another name or pass --force to overwrite it"
        )
    with transaction(app.factory) as session:
        service.use_snapshot(session)
        keyring = app.keyring(session)
        size = service.write_backup_file(session, keyring=keyring, path=file)
        counts = service.table_counts(session)
    info = {
        "file": str(file),
        "bytes": size,
        "master_key_id": keyring.active,
        "counts": counts,
    }
    if as_json:
        emit_json(info)
    else:
        click.echo(f"backup written to {file} ({size} bytes): {_summary(counts)}")
        click.echo(f"restoring it needs master key {keyring.active}")
    click.echo(
        f"warning: the master key is not in the backup; keep a copy of {app.settings.master_key_file} "
        f"(holding {keyring.active}) with it",
        err=True,
    )


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class SizeType(click.ParamType):
    """A byte count: 1073741824, 512M, 1G, 2GiB."""

    name = "size"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
        unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
        number = text[: len(text) - len(unit)]
        if not number.isdigit() or int(number) <= 0:
            self.fail(f"{value!r} is not a size (examples: 1073741824, 512M, 1G)", param, ctx)
        return int(number) * _SIZE_UNITS[unit]


def _loss_warning(plan, replace: bool) -> str:
    lines = [REPLACE_WARNING] if replace else []
    if plan.losses:
        lines.append(
            "These key versions and rotations are NOT in the backup and will be deleted "
            "(they may be the only keys TA accepts now):"
        )
        lines += [f"  {line}" for line in plan.listing()]
    return "\n".join(lines)


def _restore_info(file: Path, report) -> dict:
    return {
        "file": str(file),
        "master_key_id": report.master_key_id,
        "schema_revision": report.schema_revision,
        "backup_created_at": report.backup_created_at.isoformat(),
        "replaced": report.replaced,
        "counts": report.counts,
        "deleted": report.deleted,
        "discarded": list(report.discarded),
        "audit_records_merged": report.audit_records_merged,
        "versions_verified": report.versions_verified,
        "webhooks_verified": report.webhooks_verified,
    }


@click.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--replace", is_flag=True, help="Delete everything in the store and replace it with the backup."
)
@click.option(
    "--discard-newer",
    is_flag=True,
    help="Allow deleting key versions newer than the backup and unresolved rotations "
    "(lists each one and asks).",
)
@click.option(
    "--max-size",
    type=SizeType(),
    default="1G",
    show_default=True,
    envvar="KEYVAULT_RESTORE_MAX_SIZE",
    help="Refuse a backup whose decompressed content is larger.",
)
@yes_option
@output_option
@click.pass_obj
@audited(
    "restore",
    about=lambda p: {"target": str(p["file"]), "detail": "--replace" if p["replace"] else None},
)
def restore(
    app, file: Path, replace: bool, discard_newer: bool, max_size: int, yes: bool, as_json: bool
) -> None:
    """Restore the store from FILE, all or nothing.

    The database must be at schema head (`keyvault init` on a fresh machine, with the
    keyring file of the backup already in place) and empty, unless --replace. Key
    versions newer than the backup are never deleted without --discard-newer; tokens,
    revocations and audit records are kept (docs/backup.md).
    """
    from keyvault import crypto
    from keyvault.db import transaction
    from keyvault.services import backup as service
    from keyvault.services.spool import spooled_rotations

    keyring = crypto.load_keyring(app.settings.master_key_file)
    # The file is checked (and refused if bad) before anything is asked or touched.
    contents = service.open_backup_file(file, keyring=keyring, max_body=max_size)
    header = contents.header
    spooled = spooled_rotations(app.settings)
    with transaction(app.factory) as session:  # the schema must be at head
        plan = service.preview_restore(session, contents=contents, spooled=spooled)
    if replace and not discard_newer:  # without --replace, a store with data is refused anyway
        service.check_losses(plan, None)
    if replace or (discard_newer and plan.losses):
        confirm(
            yes,
            command="restore --discard-newer" if plan.losses else "restore --replace",
            warning=f"{_loss_warning(plan, replace)}\nbackup of {header.created_at.isoformat()} "
            f"(master key {header.master_key_id})",
            question="Delete them and restore now?" if plan.losses else "Replace the store now?",
        )
    # Shared with other writers, exclusive to `master-key rotate`: the rows written here
    # are checked against the keyring as it is while no rotation can retire a key of it.
    with crypto.keyring_file_lock(app.settings.master_key_file, exclusive=False):
        keyring = crypto.load_keyring(app.settings.master_key_file)
        with transaction(app.factory) as session:
            report = service.import_store(
                session,
                keyring=keyring,
                contents=contents,
                replace=replace,
                discard=plan.losses if discard_newer else None,
                spooled=spooled,
                actor=app.settings.actor,
                file_name=file.name,
                audit_chain=app_chain(app),
            )
    if as_json:
        emit_json(_restore_info(file, report))
        return
    if report.replaced and report.deleted:
        click.echo(f"deleted: {_summary(report.deleted)}")
    for line in report.discarded:
        click.echo(f"discarded: {line}")
    click.echo(
        f"restored from {file} (backup of {report.backup_created_at.isoformat()}, "
        f"master key {report.master_key_id}): {_summary(report.counts)}"
    )
    click.echo(f"every secret version decrypts ({report.versions_verified} checked)")


COMMANDS = [backup, restore]
