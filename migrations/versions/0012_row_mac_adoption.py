"""Row MAC adoption happens once: the rows an upgrade found without a MAC, recorded here.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03

``row_mac_adoption`` holds, per MAC table, the ids of the rows that had no MAC at this
migration (the rows made before row MACs existed). `keyvault db adopt` (and the `db upgrade`
that applies this migration) MAC only those, once; a row inserted or stripped of its MAC
later is never adopted. A store that already carries a MAC anywhere (adopted by an earlier
keyvault, or made after 0008) or has nothing to adopt is recorded as closed at once.
"""

import json

import sqlalchemy as sa
from alembic import op

from keyvault.models import UTCDateTime, utcnow

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

TABLES = (
    "clusters",
    "hosts",
    "access_tokens",
    "webhooks",
    "rotation_policies",
    "scope_schedules",
    "rotations",  # MACed since 0011: rows journaled before it have none
)


def upgrade() -> None:
    adoption = op.create_table(
        "row_mac_adoption",
        sa.Column("table_name", sa.String(32), primary_key=True),
        sa.Column("row_ids", sa.Text, nullable=False),
        sa.Column("closed_at", UTCDateTime),
    )
    conn = op.get_bind()
    missing = {
        table: [
            row[0]
            for row in conn.execute(
                sa.text(f"SELECT id FROM {table} WHERE mac IS NULL ORDER BY id")
            )
        ]
        for table in TABLES
    }
    macs = sum(
        conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE mac IS NOT NULL")).scalar_one()
        for table in TABLES
    )
    # Rows MACed already: the store's chain of MACs began before this migration (an earlier
    # keyvault adopted on every upgrade), so a row without a MAC now was stripped or inserted.
    closed = utcnow() if macs or not any(missing.values()) else None
    op.bulk_insert(
        adoption,
        [
            {"table_name": table, "row_ids": json.dumps(ids), "closed_at": closed}
            for table, ids in missing.items()
        ],
    )


def downgrade() -> None:
    op.drop_table("row_mac_adoption")
