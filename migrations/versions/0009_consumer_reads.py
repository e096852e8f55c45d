"""Propagation: which consumer read which version of a scope, and what TA said of the old key.

``consumer_reads`` holds one row per (token, consumer, cluster, scope): the version it read
last, when it first read that version and when it last read at all (written by the HTTP
servers' consumer tracker, keyvault/http/consumer_tracker.py). ``rotations.old_key`` is the
outcome of calling TA with the previous key after a rotation (rejected, still_accepted,
unchecked); ``rotations.propagated_at`` is when every known consumer held the new key (set
once, by the process that noticed it first, with the ``rotation.propagated`` event).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

from keyvault.models import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "consumer_reads",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("token_name", sa.String(64), nullable=False),
        sa.Column("consumer", sa.String(64), nullable=False),
        sa.Column("cluster", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(80), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("version_seen_at", UTCDateTime, nullable=False),
        sa.Column("last_read_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint(
            "token_name", "consumer", "cluster", "scope", name="uq_consumer_reads_consumer"
        ),
    )
    op.create_index("ix_consumer_reads_scope", "consumer_reads", ["cluster", "scope"])
    with op.batch_alter_table("rotations") as batch:
        batch.add_column(sa.Column("old_key", sa.String(16)))
        batch.add_column(sa.Column("propagated_at", UTCDateTime))
        batch.create_check_constraint(
            "ck_rotations_old_key",
            "old_key IS NULL OR old_key IN ('rejected', 'still_accepted', 'unchecked')",
        )


def downgrade() -> None:
    with op.batch_alter_table("rotations") as batch:
        batch.drop_constraint("ck_rotations_old_key", type_="check")
        batch.drop_column("propagated_at")
        batch.drop_column("old_key")
    op.drop_index("ix_consumer_reads_scope", table_name="consumer_reads")
    op.drop_table("consumer_reads")
