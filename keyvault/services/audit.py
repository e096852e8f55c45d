"""The audit log: key reads and rotations through the HTTP API, and CLI actions.

The HTTP server writes its records (``keyvault.http.audit_writer.AuditWriter``, which
group-commits them). A CLI action writes two: ``record_intent`` before it acts and
``record_outcome`` after (``keyvault.cli.audited`` commits each in its own transaction).
Every record is appended to the hash chain (``audit_chain.append``). Like every service
these only flush; this module also reads the log back for `keyvault audit list`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from keyvault.models import AuditRecord, utcnow
from keyvault.services.audit_chain import AuditChain, append

PENDING = "pending"  # the outcome an intent carries until its outcome record says otherwise
_DETAIL_LIMIT = 1000


def _clip(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def record_intent(
    session: Session,
    *,
    chain: AuditChain,
    actor: str,
    action: str,
    cluster: str | None = None,
    scope: str | None = None,
    target: str | None = None,
    detail: str | None = None,
    now: datetime | None = None,
) -> AuditRecord:
    """Record that ``actor`` is about to do ``action`` on ``target`` (appended to the chain:
    it has an id)."""
    return _append(
        session,
        chain,
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


def record_outcome(
    session: Session,
    intent: AuditRecord,
    *,
    chain: AuditChain,
    outcome: str,
    detail: str | None = None,
    now: datetime | None = None,
) -> AuditRecord:
    """Record how the action of ``intent`` ended: "ok" or an error code, with ``detail``
    (an error message: never a secret, as no error message holds one)."""
    return _append(
        session,
        chain,
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


def record_event(session: Session, *, chain: AuditChain, **fields: object) -> AuditRecord:
    """Append one record of its own (not an intent/outcome pair): ``fields`` are its columns."""
    return _append(session, chain, **{"at": utcnow(), **fields})


def _append(session: Session, chain: AuditChain, **fields: object) -> AuditRecord:
    # PostgreSQL text cannot hold NUL: a name holding one must not lose the record.
    clean = {k: v.replace("\x00", "\\x00") if isinstance(v, str) else v for k, v in fields.items()}
    (row,) = append(session, chain=chain, records=[clean])
    return as_record(row)


def as_record(row: dict) -> AuditRecord:
    """A chain row (``audit_chain.append``) as a detached ``AuditRecord``."""
    values = {k: v for k, v in row.items() if k != "prev_mac"}
    values["at"] = datetime.fromisoformat(values["at"]).replace(tzinfo=UTC)
    return AuditRecord(**values)


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
        "chain_key_id": row.chain_key_id,
        "chain_mac": row.chain_mac,
    }
