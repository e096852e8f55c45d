"""What a restore must not destroy or bring back, and how it keeps it.

- Key versions newer than the backup: per (cluster, scope), a version of the store whose
  number the backup lacks, or whose fingerprint differs from the backup's version of that
  number (the store moved on along another line). Such a version may be the only key TA
  accepts; a restore deletes it only when the operator named each one (``--discard-newer``).
- Unresolved rotations (pending, needs_recovery) and keys in the local spool: their key
  may be committed after the restore, or be live at TA already. Treated as a loss too.
- Access tokens: a restore into a store that has data keeps the store's tokens as they
  are (ids, scopes, revocations) and never brings back a token the store no longer has.
  A revocation in the backup is kept as well: restore can revoke, never un-revoke.
- The audit log is never deleted, and its hash chain is kept: the backup's records the
  store lacks are appended to it (``audit_merge``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.orm import Session

from keyvault.models import AccessToken, AuditRecord, Cluster, Rotation, Secret, SecretVersion

KEPT_TABLES = (AccessToken.__tablename__, AuditRecord.__tablename__)
PLAN_TABLES = (Cluster.__tablename__, Secret.__tablename__, SecretVersion.__tablename__)
_UNRESOLVED = ("pending", "needs_recovery")
_BATCH = 500


@dataclass(frozen=True)
class LostVersion:
    """A key version of the store that restoring the backup would delete (never the key)."""

    cluster: str
    scope: str
    version: int
    fingerprint: str
    created_at: datetime

    def describe(self) -> str:
        return (
            f"{self.cluster} {self.scope} v{self.version} "
            f"(fingerprint {self.fingerprint}, created {self.created_at.isoformat()})"
        )


@dataclass(frozen=True)
class UnresolvedRotation:
    """A rotation of the store not yet resolved, or a key waiting in the local spool."""

    rotation_id: str
    cluster: str
    scope: str
    state: str

    def describe(self) -> str:
        if not self.cluster:
            return f"rotation {self.rotation_id} (a key waiting in the local spool)"
        return f"rotation {self.rotation_id} ({self.cluster} {self.scope}, {self.state})"


@dataclass(frozen=True)
class RestorePlan:
    """What restoring a backup into this store would lose."""

    lost_versions: tuple[LostVersion, ...]
    unresolved: tuple[UnresolvedRotation, ...]

    @property
    def losses(self) -> frozenset[LostVersion | UnresolvedRotation]:
        return frozenset((*self.lost_versions, *self.unresolved))

    def summary(self) -> str:
        """One line: how many versions of which scopes, and which rotations."""
        parts = []
        if self.lost_versions:
            by_scope: dict[str, list[int]] = defaultdict(list)
            for v in self.lost_versions:
                by_scope[f"{v.cluster} {v.scope}"].append(v.version)
            scopes = "; ".join(
                f"{scope} v{', v'.join(map(str, sorted(ns)))}" for scope, ns in by_scope.items()
            )
            n = len(self.lost_versions)
            parts.append(
                f"{n} key version{'s' if n != 1 else ''} newer than the backup in "
                f"{len(by_scope)} scope{'s' if len(by_scope) != 1 else ''} ({scopes})"
            )
        if self.unresolved:
            ids = ", ".join(r.rotation_id for r in self.unresolved)
            parts.append(f"{len(self.unresolved)} unresolved rotation(s) ({ids})")
        return " and ".join(parts)

    def listing(self) -> list[str]:
        items: list[LostVersion | UnresolvedRotation] = [*self.lost_versions, *self.unresolved]
        return [x.describe() for x in items]


def _backup_versions(rows_by_table: dict[str, list[dict[str, Any]]]) -> set[tuple]:
    clusters = {c["id"]: c["name"] for c in rows_by_table["clusters"]}
    secrets = {
        s["id"]: (clusters.get(s["cluster_id"]), s["scope"]) for s in rows_by_table["secrets"]
    }
    return {
        (*secrets.get(v["secret_id"], (None, None)), v["number"], v["fingerprint"])
        for v in rows_by_table["secret_versions"]
    }


def newer_versions(
    session: Session, rows_by_table: dict[str, list[dict[str, Any]]]
) -> list[LostVersion]:
    """The store's key versions the backup does not hold (by number and fingerprint)."""
    known = _backup_versions(rows_by_table)
    stmt = (
        select(
            Cluster.name,
            Secret.scope,
            SecretVersion.number,
            SecretVersion.fingerprint,
            SecretVersion.created_at,
        )
        .join(Secret, SecretVersion.secret_id == Secret.id)
        .join(Cluster, Secret.cluster_id == Cluster.id)
        .order_by(Cluster.name, Secret.scope, SecretVersion.number)
    )
    return [LostVersion(*row) for row in session.execute(stmt) if tuple(row[:4]) not in known]


def unresolved_rotations(session: Session, spooled: Iterable[str]) -> list[UnresolvedRotation]:
    """Rotations of the store in pending or needs_recovery, and spooled keys of any other."""
    stmt = (
        select(Rotation.id, Cluster.name, Rotation.scope, Rotation.state)
        .join(Cluster, Rotation.cluster_id == Cluster.id)
        .where(Rotation.state.in_(_UNRESOLVED))
        .order_by(Rotation.created_at)
    )
    found = [UnresolvedRotation(*row) for row in session.execute(stmt)]
    seen = {r.rotation_id for r in found}
    found += [UnresolvedRotation(rid, "", "", "spooled") for rid in spooled if rid not in seen]
    return found


def plan_restore(
    session: Session, rows_by_table: dict[str, list[dict[str, Any]]], spooled: Iterable[str] = ()
) -> RestorePlan:
    return RestorePlan(
        lost_versions=tuple(newer_versions(session, rows_by_table)),
        unresolved=tuple(unresolved_rotations(session, spooled)),
    )


def merge_tokens(
    session: Session,
    backup_rows: list[dict[str, Any]],
    store_had_data: bool,
    verifies: Callable[[AccessToken], bool],
) -> list[int]:
    """Keep the store's tokens; take revocations from the backup; restore the backup's
    tokens only into a store that had no data. Returns the ids of the store's tokens the
    backup revoked whose row MAC verified (``verifies``) before: re-MAC them once every
    row is in (``integrity.check_restored``)."""
    table = cast(Table, AccessToken.__table__)
    if not store_had_data:
        if backup_rows:
            session.execute(insert(table), backup_rows)
        return []
    revoked = []
    for row in backup_rows:
        if row["revoked_at"] is None:
            continue
        held = session.scalar(
            select(AccessToken).where(
                AccessToken.token_hash == row["token_hash"], AccessToken.revoked_at.is_(None)
            )
        )
        if held is not None:
            if verifies(held):
                revoked.append(held.id)
            held.revoked_at = row["revoked_at"]
    session.flush()
    return revoked
