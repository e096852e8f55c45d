"""Check a key against the cluster's TA Open API with a cheap, configurable call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from keyvault.config import Settings
from keyvault.models import Cluster
from keyvault.scope import Scope
from keyvault.services.clusters import checked_cluster, cluster_options
from keyvault.services.secrets import get_version, reveal
from keyvault.ta import TaClient, verify_key


@dataclass(frozen=True)
class KeyCheckOutcome:
    """``state`` is verified, failed or skipped; never carries the key."""

    state: str
    return_code: int | None
    message: str


def make_client(cluster: Cluster, settings: Settings, client_factory: Callable | None = None):
    """A TA Open API client for ``cluster`` (``client_factory`` is for injection)."""
    factory = client_factory or TaClient
    return factory(
        cluster.open_api_url, timeout=settings.ta_timeout, error_codes=dict(settings.ta_error_codes)
    )


def unverifiable(cluster: Cluster, scope: Scope) -> KeyCheckOutcome | None:
    """The ``skipped`` outcome when no check of ``scope`` is possible (no key needed); else None."""
    if scope.is_root or cluster_options(cluster)["project_ids"].get(scope.appid) is not None:
        return None
    return KeyCheckOutcome(
        "skipped",
        None,
        f"no TA project id known for {scope.appid}; set it with "
        f"`keyvault cluster set {cluster.name} --project-id {scope.appid}=N`",
    )


def verify_scope_key(
    cluster: Cluster,
    scope: Scope,
    key: str,
    *,
    settings: Settings,
    client_factory: Callable | None = None,
) -> KeyCheckOutcome:
    """Call the cluster's check endpoint for ``scope`` with ``key``."""
    skipped = unverifiable(cluster, scope)
    if skipped is not None:
        return skipped
    options = cluster_options(cluster)
    if scope.is_root:
        method, path = options["verify_root_method"], options["verify_root_path"]
        params = {"loginName": options["login_name"] or "root"}
    else:
        project_id = options["project_ids"][scope.appid]
        method, path = options["verify_app_method"], options["verify_app_path"]
        params = {"projectId": project_id}
    result = verify_key(
        make_client(cluster, settings, client_factory),
        token=key,
        method=method,
        api_path=path,
        params=params,
    )
    if result.ok:
        return KeyCheckOutcome("verified", 0, result.detail)
    return KeyCheckOutcome("failed", result.return_code, result.detail)


def verify_current(
    session: Session,
    *,
    keyring,
    cluster_name: str,
    scope: Scope,
    settings: Settings,
    client_factory: Callable | None = None,
) -> tuple[int, KeyCheckOutcome]:
    """Verify the current stored key of a scope; returns (version, outcome). The cluster's
    row MAC is checked before the key is sent to its Open API URL."""
    cluster = checked_cluster(session, name=cluster_name, keyring=keyring)
    version = get_version(session, cluster_name=cluster_name, scope=scope)
    key = reveal(keyring, version)
    return version.number, verify_scope_key(
        cluster,
        scope,
        key,
        settings=settings,
        client_factory=client_factory,
    )
