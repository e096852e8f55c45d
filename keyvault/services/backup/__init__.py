"""Encrypted backup and restore of the whole store (every table but ``alembic_version``).

- ``fileformat``  the file (a clear header bound to an AES-256-GCM sealed, gzip'd JSON
                  body), its header, table values to and from JSON;
- ``stream``      the sealed body written and read chunk by chunk, with a size limit;
- ``reader``      ``read_backup``/``open_backup_file``: a file checked and decrypted;
- ``export``      ``write_backup``: the store, read from one snapshot in row batches;
- ``merge``       what a restore must not lose (newer key versions, unresolved rotations)
                  and what it keeps (tokens, revocations, audit records);
- ``restore``     ``import_store``: a file into this database, all or nothing, audited.

Secret versions and webhook secrets stay in their stored, already-encrypted form inside
the body. The master keys themselves are NOT in the file: the keyring file must be backed
up separately, and restoring needs a keyring that holds the backup's master key.

Like every service, this one only flushes. ``import_store`` deletes and inserts in the
caller's transaction and raises on any problem: the caller must roll back then
(``keyvault.db.transaction`` does), so a restore is all or nothing.
"""

from keyvault.services.backup.export import (
    export_store,
    use_snapshot,
    write_backup,
    write_backup_file,
)
from keyvault.services.backup.fileformat import (
    FORMAT_VERSION,
    MAGIC,
    BackupContents,
    BackupHeader,
    backup_tables,
    body_aad,
    read_header,
    table_counts,
)
from keyvault.services.backup.merge import (
    LostVersion,
    RestorePlan,
    UnresolvedRotation,
    plan_restore,
)
from keyvault.services.backup.reader import open_backup, open_backup_file, read_backup
from keyvault.services.backup.restore import (
    RestoreReport,
    check_losses,
    import_store,
    preview_restore,
)
from keyvault.services.backup.stream import DEFAULT_MAX_BODY

__all__ = [
    "DEFAULT_MAX_BODY",
    "FORMAT_VERSION",
    "MAGIC",
    "BackupContents",
    "BackupHeader",
    "LostVersion",
    "RestorePlan",
    "RestoreReport",
    "UnresolvedRotation",
    "backup_tables",
    "body_aad",
    "check_losses",
    "export_store",
    "import_store",
    "open_backup",
    "open_backup_file",
    "plan_restore",
    "preview_restore",
    "read_backup",
    "read_header",
    "table_counts",
    "use_snapshot",
    "write_backup",
    "write_backup_file",
]
