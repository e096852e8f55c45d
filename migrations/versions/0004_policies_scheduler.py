"""Rotation policies, per-scope scheduler state (backoff, pause) and leases.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

from keyvault.models import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rotation_policies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id"), nullable=False),
        sa.Column("target", sa.String(80), nullable=False),
        sa.Column("max_age_seconds", sa.Integer, nullable=False),
        sa.Column("window", sa.String(120)),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("cluster_id", "target", name="uq_rotation_policies_target"),
    )
    op.create_table(
        "scope_schedules",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id"), nullable=False),
        sa.Column("scope", sa.String(80), nullable=False),
        sa.Column("consecutive_failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", UTCDateTime),
        sa.Column("paused_at", UTCDateTime),
        sa.Column("last_error", sa.Text),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("cluster_id", "scope", name="uq_scope_schedules_scope"),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(200)),
        sa.Column("expires_at", UTCDateTime),
    )
    # The row exists from the start, so taking the lease is one conditional UPDATE.
    op.execute("INSERT INTO leases (name) VALUES ('rotate-due')")


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_table("scope_schedules")
    op.drop_table("rotation_policies")
