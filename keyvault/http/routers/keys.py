"""Reading keys and their history.

The key reads themselves (GET and HEAD) are answered by ``FastKeyPath`` (fastpath.py)
before routing, as plain ASGI; they are declared here too so that /openapi.json describes
them completely (``fastpath.FAST_ROUTES`` names the same routes; a test keeps both in line).
"""

from __future__ import annotations

from typing import Annotated, NoReturn

from fastapi import APIRouter, Header

from keyvault.db import transaction
from keyvault.errors import KeyvaultError
from keyvault.http.deps import Access, AppId, AppRead, ClusterName, RootRead, State, Target
from keyvault.http.schemas import (
    HEAD_RESPONSES,
    KEY_RESPONSES,
    VERSIONS_ERRORS,
    KeyOut,
    VersionOut,
    VersionsOut,
)
from keyvault.http.state import ServerState
from keyvault.models import SecretVersion
from keyvault.services.secrets import history

router = APIRouter(tags=["keys"])
IfNoneMatch = Annotated[
    str | None,
    Header(
        alias="If-None-Match",
        description='ETags you hold, e.g. "v3" (weak W/"v3" and lists match too; * matches '
        "any current key): 304 if one is current. A malformed value is ignored.",
    ),
]
ROOT_KEY = "/v1/clusters/{cluster}/root"
APP_KEY = "/v1/clusters/{cluster}/apps/{appid}"
_HEAD_NOTE = (
    " HEAD answers the GET's headers (ETag: the current version) without the key; "
    "it is audited as `head`."
)


def _served_by_fast_path() -> NoReturn:
    raise AssertionError("served by FastKeyPath")  # pragma: no cover


@router.get(
    ROOT_KEY,
    response_model=KeyOut,
    responses=KEY_RESPONSES,
    operation_id="get_root_key",
    summary="The current root key (ETag: its version; If-None-Match answers 304)",
)
async def get_root(cluster: ClusterName, if_none_match: IfNoneMatch = None) -> NoReturn:
    _served_by_fast_path()  # pragma: no cover


@router.head(
    ROOT_KEY,
    response_model=None,
    responses=HEAD_RESPONSES,
    operation_id="head_root_key",
    summary="The current root key's version (ETag), without the key",
    description=_HEAD_NOTE.strip(),
)
async def head_root(cluster: ClusterName, if_none_match: IfNoneMatch = None) -> NoReturn:
    _served_by_fast_path()  # pragma: no cover


@router.get(
    APP_KEY,
    response_model=KeyOut,
    responses=KEY_RESPONSES,
    operation_id="get_app_key",
    summary="The current key of one project (ETag: its version; If-None-Match answers 304)",
)
async def get_app(
    cluster: ClusterName, appid: AppId, if_none_match: IfNoneMatch = None
) -> NoReturn:
    _served_by_fast_path()  # pragma: no cover


@router.head(
    APP_KEY,
    response_model=None,
    responses=HEAD_RESPONSES,
    operation_id="head_app_key",
    summary="The current version (ETag) of one project's key, without the key",
    description=_HEAD_NOTE.strip(),
)
async def head_app(
    cluster: ClusterName, appid: AppId, if_none_match: IfNoneMatch = None
) -> NoReturn:
    _served_by_fast_path()  # pragma: no cover


@router.get(
    "/v1/clusters/{cluster}/root/versions",
    response_model=VersionsOut,
    responses=VERSIONS_ERRORS,
    operation_id="list_root_versions",
)
async def root_versions(access: RootRead, state: State) -> VersionsOut:
    """The history of the root key, as metadata (never keys)."""
    return await _audited_versions(state, access)


@router.get(
    "/v1/clusters/{cluster}/apps/{appid}/versions",
    response_model=VersionsOut,
    responses=VERSIONS_ERRORS,
    operation_id="list_app_versions",
)
async def app_versions(access: AppRead, state: State) -> VersionsOut:
    """The history of a project key, as metadata (never keys)."""
    return await _audited_versions(state, access)


async def _audited_versions(state: ServerState, access: Access) -> VersionsOut:
    """The history, in a database thread; answered only once its audit record is written."""
    try:
        versions = await state.blocking(
            _versions, state, access.target, deadline=access.audit.deadline
        )
    except KeyvaultError as exc:
        raise await access.audit.refused(exc) from None
    await access.audit.record("ok")
    return versions


def _versions(state: ServerState, target: Target) -> VersionsOut:
    with transaction(state.factory) as session:
        rows = history(session, cluster_name=target.cluster, scope=target.scope)
        versions = [_version_out(v) for v in rows]
    return VersionsOut(cluster=target.cluster, scope=str(target.scope), versions=versions)


def _version_out(v: SecretVersion) -> VersionOut:
    return VersionOut(
        version=v.number,
        fingerprint=v.fingerprint,
        state=v.state,
        source=v.source,
        created_at=v.created_at.isoformat(),
        invalidated_at=v.invalidated_at.isoformat() if v.invalidated_at else None,
        superseded_by=v.superseded_by.number if v.superseded_by else None,
    )
