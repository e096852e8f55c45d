"""The end of the scheduler's last run on its lease row: when, who, outcome, counts.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

from keyvault.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COLUMNS = (
    ("last_started_at", UTCDateTime),
    ("last_finished_at", UTCDateTime),
    ("last_holder", sa.String(200)),
    ("last_outcome", sa.String(16)),
    ("last_rotated", sa.Integer),
    ("last_failed", sa.Integer),
    ("last_skipped", sa.Integer),
    ("last_error", sa.Text),
    ("last_success_at", UTCDateTime),
    ("last_failure_at", UTCDateTime),
)


def upgrade() -> None:
    # batch: SQLite cannot add a CHECK constraint to an existing table in place.
    with op.batch_alter_table("leases") as batch:
        for name, type_ in COLUMNS:
            batch.add_column(sa.Column(name, type_))
        batch.create_check_constraint(
            "ck_leases_last_outcome", "last_outcome IN ('ok', 'partial', 'failed')"
        )


def downgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.drop_constraint("ck_leases_last_outcome", type_="check")
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
