"""`keyvault backup / restore`."""

from __future__ import annotations

from pathlib import Path

import click

from keyvault.cli.confirm import confirm
from keyvault.cli.output import emit_json, output_option


def _summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in counts.items())


REPLACE_WARNING = (
    "restore --replace DELETES every cluster, key version, host, rotation, token, webhook and "
    "event of this store and puts the backup's in their place (one transaction)."
)


@click.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@output_option
@click.pass_obj
def backup(app, file: Path, force: bool, as_json: bool) -> None:
    """Write an encrypted backup of the whole store to FILE (mode 0600).

    The master keyring is NOT in the backup: keep a copy of the keyring file
    (KEYVAULT_MASTER_KEY_FILE) with it, or the backup cannot be restored.
    """
    from keyvault import crypto
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
        data = service.export_store(session, keyring=keyring)
        counts = service.table_counts(session)
    crypto.write_private_file(file, data)
    info = {
        "file": str(file),
        "bytes": len(data),
        "master_key_id": keyring.active,
        "counts": counts,
    }
    if as_json:
        emit_json(info)
    else:
        click.echo(f"backup written to {file} ({len(data)} bytes): {_summary(counts)}")
        click.echo(f"restoring it needs master key {keyring.active}")
    click.echo(
        f"warning: the master key is not in the backup; keep a copy of {app.settings.master_key_file} "
        f"(holding {keyring.active}) with it",
        err=True,
    )


@click.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--replace", is_flag=True, help="Delete everything in the store and replace it with the backup."
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation of --replace.")
@output_option
@click.pass_obj
def restore(app, file: Path, replace: bool, yes: bool, as_json: bool) -> None:
    """Restore the store from FILE, all or nothing.

    The database must be at schema head (`keyvault init` on a fresh machine, with the
    keyring file of the backup already in place) and empty, unless --replace.
    """
    from keyvault import crypto
    from keyvault.services import backup as service

    data = file.read_bytes()
    keyring = crypto.load_keyring(app.settings.master_key_file)
    header = service.open_backup(data, keyring=keyring).header  # refuse a bad file before asking
    factory = app.factory  # the schema must be at head
    if replace:
        confirm(
            yes,
            command="restore --replace",
            warning=f"{REPLACE_WARNING}\nbackup of {header.created_at.isoformat()} "
            f"(master key {header.master_key_id})",
            question="Replace the store now?",
        )
    from keyvault.db import transaction

    with transaction(factory) as session:
        report = service.import_store(session, keyring=keyring, data=data, replace=replace)
    if as_json:
        emit_json(
            {
                "file": str(file),
                "master_key_id": report.master_key_id,
                "schema_revision": report.schema_revision,
                "backup_created_at": report.backup_created_at.isoformat(),
                "replaced": report.replaced,
                "counts": report.counts,
                "deleted": report.deleted,
                "versions_verified": report.versions_verified,
                "webhooks_verified": report.webhooks_verified,
            }
        )
        return
    if report.replaced and report.deleted:
        click.echo(f"deleted: {_summary(report.deleted)}")
    click.echo(
        f"restored from {file} (backup of {report.backup_created_at.isoformat()}, "
        f"master key {report.master_key_id}): {_summary(report.counts)}"
    )
    click.echo(f"every secret version decrypts ({report.versions_verified} checked)")


COMMANDS = [backup, restore]
