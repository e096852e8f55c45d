"""Encrypted backup and restore of the whole store (every table but ``alembic_version``).

- ``fileformat``  the file (a clear header bound to an AES-256-GCM sealed, gzip'd JSON
                  body), reading and checking it, table values to and from JSON;
- ``export``      ``export_store``: the store, read from one snapshot, as such a file;
- ``restore``     ``import_store``: a file into this database, all or nothing.

Secret versions and webhook secrets stay in their stored, already-encrypted form inside
the body. The master keys themselves are NOT in the file: the keyring file must be backed
up separately, and restoring needs a keyring that holds the backup's master key.

Like every service, this one only flushes. ``import_store`` deletes and inserts in the
caller's transaction and raises on any problem: the caller must roll back then
(``keyvault.db.transaction`` does), so a restore is all or nothing.
"""

from keyvault.services.backup.export import export_store, use_snapshot
from keyvault.services.backup.fileformat import (
    FORMAT_VERSION,
    MAGIC,
    BackupContents,
    BackupHeader,
    backup_tables,
    body_aad,
    open_backup,
    read_header,
    table_counts,
)
from keyvault.services.backup.restore import RestoreReport, import_store

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "BackupContents",
    "BackupHeader",
    "RestoreReport",
    "backup_tables",
    "body_aad",
    "export_store",
    "import_store",
    "open_backup",
    "read_header",
    "table_counts",
    "use_snapshot",
]
