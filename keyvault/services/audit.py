"""The audit log: one record per key read and per rotation through the HTTP API.

The HTTP server writes the records (``keyvault.http.audit_writer.AuditWriter``, which
group-commits them); this module reads them back for `keyvault audit list`.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from keyvault.models import AuditRecord


def list_audit(
    session: Session,
    *,
    since: datetime | None = None,
    token_name: str | None = None,
    limit: int = 1000,
) -> list[AuditRecord]:
    """Audit records, newest first."""
    stmt = select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit)
    if since is not None:
        stmt = stmt.where(AuditRecord.at >= since)
    if token_name is not None:
        stmt = stmt.where(AuditRecord.token_name == token_name)
    return list(session.scalars(stmt))


def audit_info(row: AuditRecord) -> dict:
    """A JSON-ready audit record."""
    return {
        "id": row.id,
        "at": row.at.isoformat(),
        "token": row.token_name,
        "action": row.action,
        "cluster": row.cluster,
        "scope": row.scope,
        "version": row.version,
        "client": row.client,
        "outcome": row.outcome,
    }
