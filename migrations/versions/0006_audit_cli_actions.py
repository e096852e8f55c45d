"""The audit log records CLI actions too: who (the OS user), what object, intent then outcome.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

COLUMNS = (
    ("actor", sa.String(128)),
    ("target", sa.String(255)),
    ("phase", sa.String(8)),
    ("intent_id", sa.Integer),
    ("detail", sa.Text),
)


def upgrade() -> None:
    # batch: SQLite cannot drop NOT NULL or add a CHECK constraint in place. A CLI record has
    # an actor and no token.
    with op.batch_alter_table("audit_log") as batch:
        for name, type_ in COLUMNS:
            batch.add_column(sa.Column(name, type_))
        batch.alter_column("token_name", existing_type=sa.String(64), nullable=True)
        batch.create_check_constraint(
            "ck_audit_log_phase", "phase IS NULL OR phase IN ('intent', 'outcome')"
        )


def downgrade() -> None:
    # Keep the CLI records (an audit trail is not dropped by a downgrade), under a token name
    # no token can have.
    op.execute("UPDATE audit_log SET token_name = '(cli)' WHERE token_name IS NULL")
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_constraint("ck_audit_log_phase", type_="check")
        batch.alter_column("token_name", existing_type=sa.String(64), nullable=False)
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
