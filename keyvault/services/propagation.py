"""Propagation: which consumer holds which version of a key, and when a rotation reached all.

The HTTP servers record reads in ``consumer_reads`` (keyvault/http/consumer_tracker.py);
this module reads them back for people (`keyvault consumers`, `rotations show`, `rotate
--plan` and `--wait-propagation`) and decides when a rotation has propagated: every consumer
seen reading the scope in the last ``RETENTION`` (30 days) holds its new version. A consumer
of a token that can no longer read (revoked, expired or deleted) is not "known": it will never
fetch the new key, so it must not hold a rotation back. ``forget_consumers`` drops the rows of
a one-off or decommissioned consumer whose token lives on (`keyvault consumers forget`).

``claim_propagated`` records that once per rotation (``rotations.propagated_at`` set by a
conditional UPDATE, and the ``rotation.propagated`` event in the same transaction), so two
servers, or a server and a waiting CLI, noticing it at once record it exactly once: on
PostgreSQL the second UPDATE waits for the first's row lock and then matches nothing; on
SQLite writers are serialised (BEGIN IMMEDIATE).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, or_, select
from sqlalchemy.orm import Session

from keyvault.events import record_event
from keyvault.models import (
    CURRENT,
    AccessToken,
    Cluster,
    ConsumerRead,
    Rotation,
    Secret,
    SecretVersion,
    utcnow,
)
from keyvault.services.rotation import journal

RETENTION = timedelta(days=30)  # a consumer not seen for this long is no longer "known"
PROPAGATED_EVENT = "rotation.propagated"
_SETTLED = ("stored", "completed")  # rotations whose new key is in the store


def current_versions(session: Session, cluster: str | None = None) -> dict[tuple[str, str], int]:
    """The current version number of every scope (of one cluster), by (cluster, scope)."""
    stmt = (
        select(Cluster.name, Secret.scope, SecretVersion.number)
        .join(Secret, SecretVersion.secret_id == Secret.id)
        .join(Cluster, Secret.cluster_id == Cluster.id)
        .where(SecretVersion.state == CURRENT)
    )
    if cluster is not None:
        stmt = stmt.where(Cluster.name == cluster)
    return {(c, s): n for c, s, n in session.execute(stmt)}


def _stale(version: int, current: int | None) -> bool:
    return current is None or version < current


def consumer_row(read: ConsumerRead, current: int | None) -> dict[str, Any]:
    """One consumer of one scope as plain data (the shape of `keyvault consumers --json`)."""
    return {
        "token": read.token_name,
        "consumer": read.consumer,
        "cluster": read.cluster,
        "scope": read.scope,
        "version": read.version,
        "current_version": current,
        "version_seen_at": read.version_seen_at.isoformat(),
        "last_read_at": read.last_read_at.isoformat(),
        "stale": _stale(read.version, current),
    }


def list_consumers(
    session: Session, *, cluster: str | None = None, scope: str | None = None
) -> list[dict[str, Any]]:
    """Every recorded consumer (of a cluster, of a scope), stale ones first."""
    stmt = select(ConsumerRead)
    if cluster is not None:
        stmt = stmt.where(ConsumerRead.cluster == cluster)
    if scope is not None:
        stmt = stmt.where(ConsumerRead.scope == scope)
    current = current_versions(session, cluster)
    rows = [consumer_row(r, current.get((r.cluster, r.scope))) for r in session.scalars(stmt)]
    rows.sort(key=lambda r: (not r["stale"], r["cluster"], r["scope"], r["token"], r["consumer"]))
    return rows


def known(now: datetime) -> ColumnElement[bool]:
    """The condition on ``consumer_reads`` rows that are known consumers at ``now``: read
    within ``RETENTION``, with a token that still exists and is neither revoked nor expired."""
    live = select(AccessToken.name).where(
        AccessToken.revoked_at.is_(None),
        or_(AccessToken.expires_at.is_(None), AccessToken.expires_at > now),
    )
    return and_(ConsumerRead.last_read_at >= now - RETENTION, ConsumerRead.token_name.in_(live))


def known_consumers(
    session: Session, cluster: str, scope: str, now: datetime | None = None
) -> list[ConsumerRead]:
    """The known consumers of a scope (``known``)."""
    return list(
        session.scalars(
            select(ConsumerRead).where(
                ConsumerRead.cluster == cluster,
                ConsumerRead.scope == scope,
                known(now or utcnow()),
            )
        )
    )


def forget_consumers(
    session: Session,
    *,
    token: str,
    consumer: str | None = None,
    cluster: str | None = None,
    scope: str | None = None,
) -> tuple[int, list[str]]:
    """Delete the recorded reads of ``token`` (one consumer, cluster, scope if given): a
    consumer that is gone must not hold rotations back for 30 days. Returns how many rows
    went, and the rotations that propagated now that they are gone (recorded here)."""
    where = [ConsumerRead.token_name == token]
    if consumer is not None:
        where.append(ConsumerRead.consumer == consumer)
    if cluster is not None:
        where.append(ConsumerRead.cluster == cluster)
    if scope is not None:
        where.append(ConsumerRead.scope == scope)
    scopes = set(session.execute(select(ConsumerRead.cluster, ConsumerRead.scope).where(*where)))
    count = session.execute(delete(ConsumerRead).where(*where)).rowcount or 0  # type: ignore[attr-defined]
    return count, check_scopes(session, [(c, s) for c, s in scopes])


@dataclass(frozen=True)
class Propagation:
    """How far a rotation's new version has reached its scope's known consumers."""

    rotation_id: str
    cluster: str
    scope: str
    version: int | None
    consumers: int
    updated: int
    stale: list[dict[str, Any]] = field(default_factory=list)
    last_updated_at: datetime | None = None  # when the last of them first read the new version
    propagated_at: datetime | None = None  # recorded once every consumer held it

    @property
    def complete(self) -> bool:
        return self.version is not None and not self.stale

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "consumers": self.consumers,
            "updated": self.updated,
            "stale": self.stale,
            "complete": self.complete,
            "last_updated_at": _iso(self.last_updated_at),
            "propagated_at": _iso(self.propagated_at),
        }


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def propagation_of(
    session: Session, rotation: Rotation, now: datetime | None = None
) -> Propagation:
    """The propagation of ``rotation``'s new version (none yet if it stored no key)."""
    cluster, version = rotation.cluster.name, rotation.new_version
    readers = known_consumers(session, cluster, rotation.scope, now)
    updated = [r for r in readers if version is not None and r.version >= version]
    stale = [r for r in readers if version is None or r.version < version]
    return Propagation(
        rotation_id=rotation.id,
        cluster=cluster,
        scope=rotation.scope,
        version=version,
        consumers=len(readers),
        updated=len(updated),
        stale=[consumer_row(r, version) for r in sorted(stale, key=_by_name)],
        last_updated_at=max((r.version_seen_at for r in updated), default=None),
        propagated_at=rotation.propagated_at,
    )


def _by_name(r: ConsumerRead) -> tuple[str, str]:
    return r.token_name, r.consumer


def latest_rotation(session: Session, cluster: str, scope: str) -> Rotation | None:
    """The rotation that made the current key of a scope, if a rotation did."""
    current = current_versions(session, cluster).get((cluster, scope))
    if current is None:
        return None
    return session.scalar(
        select(Rotation)
        .join(Cluster, Rotation.cluster_id == Cluster.id)
        .where(
            and_(Cluster.name == cluster, Rotation.scope == scope),
            Rotation.new_version == current,
            Rotation.state.in_(_SETTLED),
        )
        .order_by(Rotation.created_at.desc())
        .limit(1)
    )


def claim_propagated(session: Session, figures: Propagation, now: datetime | None = None) -> bool:
    """Record that a rotation propagated (``propagated_at`` and the event), once; True if this
    call recorded it, False if it was recorded before (by any process)."""
    at = now or utcnow()
    if not journal.claim_propagated(session, figures.rotation_id, at):
        return False
    payload = {
        "rotation_id": figures.rotation_id,
        "cluster": figures.cluster,
        "scope": figures.scope,
        "version": figures.version,
        "consumers": figures.consumers,
        "last_updated_at": _iso(figures.last_updated_at),
    }
    record_event(
        session, kind=PROPAGATED_EVENT, cluster=figures.cluster, scope=figures.scope,
        payload=payload, at=at,
    )  # fmt: skip
    return True


def check_scopes(session: Session, scopes: Iterable[tuple[str, str]]) -> list[str]:
    """For each (cluster, scope): if its latest rotation has reached every known consumer and
    that is not recorded yet, record it. Returns the ids of the rotations recorded here."""
    recorded = []
    for cluster, scope in sorted(set(scopes)):
        rotation = latest_rotation(session, cluster, scope)
        if rotation is None or rotation.propagated_at is not None:
            continue
        figures = propagation_of(session, rotation)
        if figures.complete and figures.consumers and claim_propagated(session, figures):
            recorded.append(rotation.id)
    return recorded


def plan(session: Session, cluster: str, scopes: Iterable[str]) -> list[dict[str, Any]]:
    """Who loses their key if ``scopes`` are rotated now: every consumer seen within
    ``RETENTION``, each with the version it holds (a stale one fails already)."""
    current = current_versions(session, cluster)
    out = []
    for scope in scopes:
        readers = sorted(known_consumers(session, cluster, scope), key=_by_name)
        version = current.get((cluster, scope))
        out.append(
            {
                "cluster": cluster,
                "scope": scope,
                "current_version": version,
                "consumers": [consumer_row(r, version) for r in readers],
            }
        )
    return out


def last_old_key_checks(session: Session) -> list[tuple[str, str, str, str]]:
    """(cluster, scope, rotation id, old_key) of the last rotation of each scope whose
    previous key was checked at TA."""
    last = (
        select(Rotation.cluster_id, Rotation.scope, func.max(Rotation.created_at).label("at"))
        .where(Rotation.old_key.is_not(None))
        .group_by(Rotation.cluster_id, Rotation.scope)
        .subquery()
    )
    rows = session.execute(
        select(Cluster.name, Rotation.scope, Rotation.id, Rotation.old_key)
        .join(Cluster, Rotation.cluster_id == Cluster.id)
        .join(
            last,
            (last.c.cluster_id == Rotation.cluster_id)
            & (last.c.scope == Rotation.scope)
            & (last.c.at == Rotation.created_at),
        )
        .order_by(Cluster.name, Rotation.scope)
    )
    return [(c, s, rid, old or "") for c, s, rid, old in rows]


def old_keys_accepted(session: Session) -> list[tuple[str, str, str]]:
    """(cluster, scope, rotation id) of each scope whose last checked rotation found TA still
    accepting the previous key."""
    return [
        (c, s, rid) for c, s, rid, old in last_old_key_checks(session) if old == "still_accepted"
    ]
