"""The audit log becomes a hash chain: a MAC per record, sealed chain keys, one head row.

Existing records get no MAC (the migration has no keyring to compute one): the head's
anchor is put after them, so the chain begins with the next record and `audit verify`
counts them as written before the chain began.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

from keyvault.models import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.add_column(sa.Column("chain_key_id", sa.String(32)))
        batch.add_column(sa.Column("chain_mac", sa.String(64)))
    op.create_table(
        "audit_chain_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
        sa.Column("master_key_id", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "audit_chain",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("last_id", sa.Integer, nullable=False),
        sa.Column("last_mac", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32)),
        sa.Column("anchor_id", sa.Integer, nullable=False),
        sa.Column("anchor_mac", sa.String(64), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_audit_chain_one_row"),
    )
    # The chain starts after the records already written ("" is the start of a chain).
    op.execute(
        "INSERT INTO audit_chain (id, last_id, last_mac, key_id, anchor_id, anchor_mac) "
        "SELECT 1, COALESCE(MAX(id), 0), '', NULL, COALESCE(MAX(id), 0), '' FROM audit_log"
    )


def downgrade() -> None:
    # The records stay; only their MACs and the chain's bookkeeping go.
    op.drop_table("audit_chain")
    op.drop_table("audit_chain_keys")
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("chain_mac")
        batch.drop_column("chain_key_id")
