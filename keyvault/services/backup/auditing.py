"""The audit record of a restore, written in the restore's own transaction.

It commits (or not) with the restored rows, so it says what the restore did; the CLI's
intent and outcome records (``cli/audited.py``) say that it was attempted. Columns:
``actor``, ``action`` "restore", ``target`` (the backup file's name and SHA-256),
``client`` "cli", ``outcome`` ("ok" or "ok-discarded-newer").
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from keyvault.models import AuditRecord, utcnow

_TARGET_MAX = 255  # audit_log.target
_ACTOR_MAX = 128  # audit_log.actor


def restore_target(file_name: str, digest: str) -> str:
    """The backup file's name and digest, cut to fit the column (the digest part first)."""
    tail = f" sha256:{digest[:32]}"
    return file_name[: _TARGET_MAX - len(tail)] + tail


def record_restore(session: Session, *, actor: str, target: str, outcome: str) -> None:
    session.add(
        AuditRecord(
            at=utcnow(),
            actor=actor[:_ACTOR_MAX],
            action="restore",
            cluster=None,
            target=target[:_TARGET_MAX],
            version=None,
            client="cli",
            outcome=outcome,
        )
    )
    session.flush()
