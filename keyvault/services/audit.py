"""The audit log: key reads and rotations through the HTTP API, and CLI actions.

The HTTP server writes its records (``keyvault.http.audit_writer.AuditWriter``, which
group-commits them). A CLI action writes two: ``record_intent`` before it acts and
``record_outcome`` after (``keyvault.cli.audited`` commits each in its own transaction).
Like every service these only flush; this module also reads the log back for
`keyvault audit list`.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from keyvault.models import AuditRecord, utcnow

PENDING = "pending"  # the outcome an intent carries until its outcome record says otherwise
_DETAIL_LIMIT = 1000


def _clip(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def record_intent(
    session: Session,
    *,
    actor: str,
    action: str,
    cluster: str | None = None,
    scope: str | None = None,
    target: str | None = None,
    detail: str | None = None,
    now: datetime | None = None,
) -> AuditRecord:
    """Record that ``actor`` is about to do ``action`` on ``target`` (flushed: it has an id)."""
    row = AuditRecord(
        at=now or utcnow(),
        actor=_clip(actor, 128),
        action=action,
        cluster=_clip(cluster, 64),
        scope=_clip(scope, 80),
        target=_clip(target, 255),
        phase="intent",
        outcome=PENDING,
        detail=_clip(detail, _DETAIL_LIMIT),
    )
    session.add(row)
    session.flush()
    return row


def record_outcome(
    session: Session,
    intent: AuditRecord,
    *,
    outcome: str,
    detail: str | None = None,
    now: datetime | None = None,
) -> AuditRecord:
    """Record how the action of ``intent`` ended: "ok" or an error code, with ``detail``
    (an error message: never a secret, as no error message holds one)."""
    row = AuditRecord(
        at=now or utcnow(),
        actor=intent.actor,
        action=intent.action,
        cluster=intent.cluster,
        scope=intent.scope,
        target=intent.target,
        phase="outcome",
        intent_id=intent.id,
        outcome=_clip(outcome, 32) or PENDING,
        detail=_clip(detail, _DETAIL_LIMIT),
    )
    session.add(row)
    session.flush()
    return row


def list_audit(
    session: Session,
    *,
    since: datetime | None = None,
    token_name: str | None = None,
    actor: str | None = None,
    limit: int = 1000,
) -> list[AuditRecord]:
    """Audit records, newest first."""
    stmt = select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit)
    if since is not None:
        stmt = stmt.where(AuditRecord.at >= since)
    if token_name is not None:
        stmt = stmt.where(AuditRecord.token_name == token_name)
    if actor is not None:
        stmt = stmt.where(AuditRecord.actor == actor)
    return list(session.scalars(stmt))


def audit_info(row: AuditRecord) -> dict:
    """A JSON-ready audit record."""
    return {
        "id": row.id,
        "at": row.at.isoformat(),
        "token": row.token_name,
        "actor": row.actor,
        "action": row.action,
        "cluster": row.cluster,
        "scope": row.scope,
        "target": row.target,
        "version": row.version,
        "client": row.client,
        "phase": row.phase,
        "intent_id": row.intent_id,
        "outcome": row.outcome,
        "detail": row.detail,
    }
