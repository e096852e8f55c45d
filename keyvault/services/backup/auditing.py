"""The audit record of a restore, written in the restore's own transaction.

A local writer on purpose: the general CLI audit helper (keyvault/services/audit.py) is
being built at the same time; this should switch to it (see
/work/wt/notes/restore-requests.md). Until then the existing audit_log columns carry it:
``token_name`` the actor, ``action`` "restore", ``scope`` the target (the backup file's
name and SHA-256), ``client`` "cli", ``outcome`` "ok".
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from keyvault.models import AuditRecord, utcnow

_TARGET_MAX = 80  # audit_log.scope
_ACTOR_MAX = 64  # audit_log.token_name


def restore_target(file_name: str, digest: str) -> str:
    """The backup file's name and digest, cut to fit the column (the digest part first)."""
    tail = f" sha256:{digest[:32]}"
    return file_name[: _TARGET_MAX - len(tail)] + tail


def record_restore(session: Session, *, actor: str, target: str, outcome: str) -> None:
    session.add(
        AuditRecord(
            at=utcnow(),
            token_name=actor[:_ACTOR_MAX],
            action="restore",
            cluster=None,
            scope=target[:_TARGET_MAX],
            version=None,
            client="cli",
            outcome=outcome,
        )
    )
    session.flush()
