"""Check a key against the cluster's TA Open API with a cheap, configurable call.

After a rotation the same call is made with the previous key (``check_previous_key``): TA must
refuse it. The journal records the outcome on the rotation (``old_key``: rejected, still_accepted or
unchecked); a previous key TA still accepts is an alert (``rotation.old_key_accepted``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from keyvault.config import Settings
from keyvault.db import transaction
from keyvault.errors import KeyvaultError
from keyvault.models import Cluster
from keyvault.scope import Scope
from keyvault.services.clusters import checked_cluster, cluster_options
from keyvault.services.secrets import get_version, reveal
from keyvault.services.store import open_keyring
from keyvault.ta import TaClient, verify_key

log = logging.getLogger("keyvault.rotation")


@dataclass(frozen=True)
class KeyCheckOutcome:
    """``state`` is verified, failed or skipped; never carries the key."""

    state: str
    return_code: int | None
    message: str
    key_rejected: bool = False  # failed because TA refused the key (not busy, not a bad call)


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
    return KeyCheckOutcome("failed", result.return_code, result.detail, result.key_rejected)


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


# -- evidence that the previous key is dead ----------------------------------------------------
OLD_KEY_REJECTED, OLD_KEY_ACCEPTED, OLD_KEY_UNCHECKED = "rejected", "still_accepted", "unchecked"
OLD_KEY_EVENT = "rotation.old_key_accepted"


def check_old_key(
    cluster: Cluster,
    scope: Scope,
    old_key: str | None,
    new_check: KeyCheckOutcome,
    *,
    settings: Settings,
    client_factory: Callable | None = None,
) -> tuple[str, KeyCheckOutcome | None]:
    """Call the same check endpoint with the previous key: TA must refuse it.

    ``rejected`` when TA refused the key itself (``ta.is_key_rejected``: a configured
    invalid-key code or a key-refusal message; the same call succeeded with the new key),
    ``still_accepted`` when it answered 0, ``unchecked`` when there is nothing to compare (no
    previous key, the new key was not verified), TA could not be reached, or it failed for
    another reason (e.g. 1500 "system busy": that proves nothing about the old key).
    """
    if old_key is None or new_check.state != "verified":
        return OLD_KEY_UNCHECKED, None
    outcome = verify_scope_key(
        cluster, scope, old_key, settings=settings, client_factory=client_factory
    )
    if outcome.state == "verified":
        return OLD_KEY_ACCEPTED, outcome
    if outcome.state == "failed" and outcome.key_rejected:
        return OLD_KEY_REJECTED, outcome
    return OLD_KEY_UNCHECKED, outcome


def previous_key(
    factory: Callable[[], Session],
    *,
    cluster_name: str,
    scope: Scope,
    number: int | None,
    settings: Settings,
) -> str | None:
    """The key of version ``number`` of a scope (the one a rotation replaced), or None."""
    if number is None:
        return None
    with transaction(factory) as session:
        version = get_version(session, cluster_name=cluster_name, scope=scope, number=number)
        return reveal(open_keyring(session, settings=settings), version)


def check_previous_key(
    factory: Callable[[], Session],
    rotation_id: str,
    cluster: Cluster,
    scope: Scope,
    old_version: int | None,
    new_check: KeyCheckOutcome,
    *,
    settings: Settings,
    client_factory: Callable | None = None,
) -> tuple[str, KeyCheckOutcome | None]:
    """After a rotation's new key was checked: check the previous one (``check_old_key``).
    The journal records the outcome on the rotation (``Journal.record_old_key``)."""
    try:
        old = previous_key(
            factory, cluster_name=cluster.name, scope=scope, number=old_version, settings=settings
        )
    except KeyvaultError as exc:
        log.warning("rotation %s: cannot read the previous key to check it: %s", rotation_id, exc)
        old = None
    return check_old_key(
        cluster, scope, old, new_check, settings=settings, client_factory=client_factory
    )
