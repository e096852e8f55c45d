"""Row MACs: every security-relevant configuration row carries ``mac`` and ``mac_key_id``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

A migration holds no keyring, so it cannot compute MACs: the columns are added empty,
and rows without a MAC are refused on use until adopted (`keyvault db upgrade` adopts
them when it can open the keyring, or `keyvault integrity adopt`).
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TABLES = (
    "access_tokens",
    "clusters",
    "hosts",
    "webhooks",
    "rotation_policies",
    "scope_schedules",
)


def upgrade() -> None:
    for table in TABLES:
        op.add_column(table, sa.Column("mac", sa.String(64)))
        op.add_column(table, sa.Column("mac_key_id", sa.String(64)))


def downgrade() -> None:
    # In place, not in batch: a batch copy of `clusters` would break the foreign keys of the
    # tables that point at it (SQLite >= 3.35 drops an unindexed column in place).
    for table in TABLES:
        op.drop_column(table, "mac_key_id")
        op.drop_column(table, "mac")
