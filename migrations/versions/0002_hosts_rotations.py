"""SSH hosts of a cluster and the rotation journal.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

from keyvault.models import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id"), nullable=False),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("identity_file", sa.String(1024)),
        sa.Column("become", sa.String(8), nullable=False),
        sa.Column("ta_user", sa.String(64), nullable=False),
        sa.Column("host_key_fingerprint", sa.String(128)),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("cluster_id", "address", "port", name="uq_hosts_address"),
        sa.CheckConstraint("become IN ('su', 'sudo', 'none')", name="ck_hosts_become"),
    )
    op.create_table(
        "rotations",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id"), nullable=False),
        sa.Column("scope", sa.String(80), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("host_id", sa.Integer, sa.ForeignKey("hosts.id")),
        sa.Column("host_label", sa.String(400), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("old_version", sa.Integer),
        sa.Column("new_version", sa.Integer),
        sa.Column("new_fingerprint", sa.String(16)),
        sa.Column("error", sa.Text),
        sa.Column("cleaned_up", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("verify_state", sa.String(16)),
        sa.Column("verify_code", sa.Integer),
        sa.Column("verify_message", sa.Text),
        sa.Column("verified_at", UTCDateTime),
        sa.CheckConstraint(
            "state IN ('pending', 'needs_recovery', 'failed', 'stored', 'completed', 'abandoned')",
            name="ck_rotations_state",
        ),
    )
    # At most one unresolved rotation per scope, across processes and machines.
    op.create_index(
        "uq_rotations_one_unresolved",
        "rotations",
        ["cluster_id", "scope"],
        unique=True,
        sqlite_where=sa.text("state IN ('pending', 'needs_recovery')"),
        postgresql_where=sa.text("state IN ('pending', 'needs_recovery')"),
    )


def downgrade() -> None:
    op.drop_index("uq_rotations_one_unresolved", table_name="rotations")
    op.drop_table("rotations")
    op.drop_table("hosts")
