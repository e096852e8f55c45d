"""Foundation: master keys, clusters, secrets, their versions and the event outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

from keyvault.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "master_keys",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("check_value", sa.LargeBinary, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("retired_at", UTCDateTime),
    )
    op.create_table(
        "clusters",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("open_api_url", sa.String(512), nullable=False),
        sa.Column("key_pattern", sa.String(256), nullable=False),
        sa.Column("options", sa.Text, nullable=False, server_default="{}"),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "secrets",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id"), nullable=False),
        sa.Column("scope", sa.String(80), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("cluster_id", "scope", name="uq_secrets_cluster_scope"),
    )
    op.create_table(
        "secret_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("secret_id", sa.Integer, sa.ForeignKey("secrets.id"), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
        sa.Column("master_key_id", sa.String(64), sa.ForeignKey("master_keys.id"), nullable=False),
        sa.Column("fingerprint", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("invalidated_at", UTCDateTime),
        sa.Column("superseded_by_id", sa.Integer, sa.ForeignKey("secret_versions.id")),
        sa.Column("rotation_id", sa.String(32)),
        sa.UniqueConstraint("secret_id", "number", name="uq_secret_versions_number"),
        sa.CheckConstraint("state IN ('current', 'invalidated')", name="ck_secret_versions_state"),
        sa.CheckConstraint(
            "(state = 'current' AND invalidated_at IS NULL)"
            " OR (state = 'invalidated' AND invalidated_at IS NOT NULL)",
            name="ck_secret_versions_invalidated_at",
        ),
        sa.CheckConstraint(
            "source IN ('import', 'rotation', 'restore')", name="ck_secret_versions_source"
        ),
    )
    # The database itself guarantees at most one current version per secret.
    op.create_index(
        "uq_secret_versions_one_current",
        "secret_versions",
        ["secret_id"],
        unique=True,
        sqlite_where=sa.text("state = 'current'"),
        postgresql_where=sa.text("state = 'current'"),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("cluster", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(80), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("events")
    op.drop_index("uq_secret_versions_one_current", table_name="secret_versions")
    op.drop_table("secret_versions")
    op.drop_table("secrets")
    op.drop_table("clusters")
    op.drop_table("master_keys")
