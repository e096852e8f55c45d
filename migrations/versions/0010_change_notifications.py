"""Change notifications: PostgreSQL NOTIFY on every revision bump and every recorded event.

Triggers, not calls in keyvault's code, so every writer notifies: ``bump_revision``, a restore,
an older keyvault during a rolling upgrade, a hand-made fix in psql. NOTIFY is transactional:
the listeners hear of a change only once it is committed (keyvault/http/revision_listener.py).

- ``keyvault_revision``: payload the new ``revision.value``.
- ``keyvault_events``: empty payload (PostgreSQL sends one per transaction, however many
  events it recorded); wakes the long-polls of ``/v1/events``.

SQLite has no NOTIFY: nothing to do there.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE FUNCTION keyvault_notify_revision() RETURNS trigger AS $$
        BEGIN
            PERFORM pg_notify('keyvault_revision', NEW.value::text);
            RETURN NULL;
        END $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        "CREATE TRIGGER keyvault_revision_notify AFTER INSERT OR UPDATE ON revision "
        "FOR EACH ROW EXECUTE FUNCTION keyvault_notify_revision()"
    )
    op.execute(
        """
        CREATE FUNCTION keyvault_notify_events() RETURNS trigger AS $$
        BEGIN
            PERFORM pg_notify('keyvault_events', '');
            RETURN NULL;
        END $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        "CREATE TRIGGER keyvault_events_notify AFTER INSERT ON events "
        "FOR EACH STATEMENT EXECUTE FUNCTION keyvault_notify_events()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS keyvault_events_notify ON events")
    op.execute("DROP FUNCTION IF EXISTS keyvault_notify_events()")
    op.execute("DROP TRIGGER IF EXISTS keyvault_revision_notify ON revision")
    op.execute("DROP FUNCTION IF EXISTS keyvault_notify_revision()")
