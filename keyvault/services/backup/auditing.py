"""The audit record of a restore, written in the restore's own transaction.

It commits (or not) with the restored rows, so it says what the restore did; the CLI's
intent and outcome records (``cli/audited.py``) say that it was attempted. Columns:
``actor``, ``action`` "restore", ``target`` (the backup file's name and SHA-256),
``client`` "cli", ``outcome`` ("ok" or "ok-discarded-newer").
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from keyvault.services.audit import record_event
from keyvault.services.audit_chain import AuditChain

_TARGET_MAX = 255  # audit_log.target
_ACTOR_MAX = 128  # audit_log.actor


def restore_target(file_name: str, digest: str) -> str:
    """The backup file's name and digest, cut to fit the column (the digest part first)."""
    tail = f" sha256:{digest[:32]}"
    return file_name[: _TARGET_MAX - len(tail)] + tail


def record_restore(
    session: Session, *, chain: AuditChain, actor: str, target: str, outcome: str
) -> None:
    """Append the restore's record to the store's audit chain."""
    record_event(
        session,
        chain=chain,
        actor=actor[:_ACTOR_MAX],
        action="restore",
        target=target[:_TARGET_MAX],
        client="cli",
        outcome=outcome,
    )
