"""Short renewable leases (services/leases.py): who took a lease when, a fencing epoch, the
webhook deliveries' lease row, and which lease holder claimed a delivery in flight.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

from keyvault.models import UTCDateTime

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.add_column(sa.Column("acquired_at", UTCDateTime))
        batch.add_column(sa.Column("epoch", sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(200)))
    op.execute("INSERT INTO leases (name) VALUES ('webhook-deliveries')")


def downgrade() -> None:
    op.execute("DELETE FROM leases WHERE name = 'webhook-deliveries'")
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_column("claimed_by")
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("epoch")
        batch.drop_column("acquired_at")
