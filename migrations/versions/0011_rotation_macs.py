"""Rotation rows carry a MAC over their identity (id, cluster, scope, host, created_at).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03

Recovery routes a rotation's key by its row (which cluster's root or app key, fetched from
which host, verified against which Open API URL), so the row is MACed like the
configuration rows of 0008 (``keyvault.services.integrity``). A migration holds no keyring:
the columns are added empty. Rotations journaled before this revision are adopted with the
other rows without a MAC (`keyvault db adopt`, or `keyvault db upgrade` when it can open the
keyring; trust on first use) and refused by recovery and abandon until then.
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("rotations", sa.Column("mac", sa.String(64)))
    op.add_column("rotations", sa.Column("mac_key_id", sa.String(64)))


def downgrade() -> None:
    # In place, not in batch (as 0008): SQLite >= 3.35 drops an unindexed column in place.
    op.drop_column("rotations", "mac_key_id")
    op.drop_column("rotations", "mac")
