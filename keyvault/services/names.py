"""Names the store knows (clusters, APPIDs, rotations, tokens, hosts), for shell completion."""

from __future__ import annotations

from sqlalchemy import case, select
from sqlalchemy.orm import Session

from keyvault.models import UNRESOLVED_ROTATION_STATES, AccessToken, Cluster, Host, Rotation
from keyvault.services.clusters import list_clusters
from keyvault.services.policies import app_scopes_of

# Enough for a shell to show; more would only scroll.
MAX_ROTATIONS = 200


def cluster_names(session: Session) -> list[str]:
    """Every cluster name, sorted."""
    return list(session.scalars(select(Cluster.name).order_by(Cluster.name)))


def appids(session: Session, *, cluster_name: str | None = None) -> list[str]:
    """APPIDs with a stored key or a project id, of one cluster or of all, sorted."""
    found: set[str] = set()
    for cluster in list_clusters(session):
        if cluster_name is None or cluster.name == cluster_name:
            found.update(scope[4:] for scope in app_scopes_of(session, cluster) if scope[4:])
    return sorted(found)


def rotation_ids(session: Session) -> list[str]:
    """Rotation ids: unresolved first, then the newest."""
    unresolved_first = case((Rotation.state.in_(UNRESOLVED_ROTATION_STATES), 0), else_=1)
    stmt = (
        select(Rotation.id)
        .order_by(unresolved_first, Rotation.created_at.desc())
        .limit(MAX_ROTATIONS)
    )
    return list(session.scalars(stmt))


def token_names(session: Session) -> list[str]:
    """Names of tokens not revoked, sorted."""
    stmt = select(AccessToken.name).where(AccessToken.revoked_at.is_(None))
    return sorted(session.scalars(stmt))


def host_addresses(session: Session, *, cluster_name: str | None = None) -> list[str]:
    """Host addresses, of one cluster or of all, without duplicates, sorted."""
    stmt = select(Host.address).join(Cluster, Host.cluster_id == Cluster.id)
    if cluster_name is not None:
        stmt = stmt.where(Cluster.name == cluster_name)
    return sorted(set(session.scalars(stmt)))
