"""FastAPI dependencies: the server state, the target of a request, the caller's grant.

Order matters and is kept from the first version of the API: a request is validated
(path parameters, the APPID grammar) before it is authenticated, so a target dependency is
solved first and the grant is computed only once it succeeded. That is why the grant is a
dependency *of the target*, not a sibling (FastAPI would still call a sibling after a
validation error).

Authentication reads the database, so it runs in a database thread within the budget
(``ServerState.blocking``); a refused request is audited (``Access.audit`` continues the
record for the route).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Request

from keyvault.config import Settings
from keyvault.errors import KeyvaultError
from keyvault.http.access_audit import AccessAudit, client_of
from keyvault.http.state import ServerState, require_scope
from keyvault.scope import Scope, app_scope, root_scope
from keyvault.services.tokens import Grant

CLUSTER_PATTERN = "^[^/]{1,64}$"
ClusterName = Annotated[str, Path(pattern=CLUSTER_PATTERN, description="The cluster's name")]
# The APPID grammar is configurable (validation.appid_pattern): app.py declares it in the
# OpenAPI document; app_scope() enforces it (with Python's re.fullmatch).
AppId = Annotated[str, Path(description="The project's APPID, as TA shows it")]


def server_state(request: Request) -> ServerState:
    """The state of this server process (created by the lifespan)."""
    state: ServerState = request.app.state.server
    return state


def server_settings(request: Request) -> Settings:
    """The settings this process was started with."""
    settings: Settings = request.app.state.settings
    return settings


def authenticate(state: ServerState, authorization: str | None) -> Grant:
    """The grant of a bearer header (caches refreshed first), or ``Unauthorized``.

    Blocking (the database): call it through ``state.blocking``.
    """
    state.ensure_fresh()
    return state.authenticate(authorization)


async def audited_grant(request: Request, state: ServerState, audit: AccessAudit) -> Grant:
    """The caller's grant, named in ``audit``; a refusal is audited, then raised."""
    try:
        grant = await state.blocking(
            authenticate, state, request.headers.get("authorization"), deadline=audit.deadline
        )
    except KeyvaultError as exc:
        raise await audit.refused(exc) from None
    audit.token_name = grant.name
    return grant


@dataclass(frozen=True)
class Target:
    """The key a request is about."""

    cluster: str
    scope: Scope


@dataclass(frozen=True)
class Access:
    """An authenticated caller allowed to read ``target``, and the request's audit record."""

    grant: Grant
    target: Target
    audit: AccessAudit


def root_target(cluster: ClusterName) -> Target:
    return Target(cluster, root_scope())


def app_target(
    cluster: ClusterName,
    appid: AppId,
    settings: Annotated[Settings, Depends(server_settings)],
) -> Target:
    return Target(cluster, app_scope(appid, settings.appid_pattern))


def scoped(target_of: Callable[..., Target], action: str) -> Callable[..., Any]:
    """A dependency: the grant of the caller, refused (and audited as ``action``) unless it
    covers the target's scope."""

    async def access(
        request: Request,
        # Defaults, not Annotated: the string annotations could not name ``target_of``.
        target: Target = Depends(target_of),  # noqa: B008 - FastAPI's dependency syntax
        state: ServerState = Depends(server_state),  # noqa: B008
    ) -> Access:
        audit = AccessAudit(
            state.audit,
            action,
            target.cluster,
            str(target.scope),
            client_of(request.scope),
            deadline=state.deadline(),
        )
        grant = await audited_grant(request, state, audit)
        try:
            require_scope(grant, target.cluster, str(target.scope))
        except KeyvaultError as exc:
            raise await audit.refused(exc) from None
        return Access(grant, target, audit)

    return access


State = Annotated[ServerState, Depends(server_state)]
RootRead = Annotated[Access, Depends(scoped(root_target, "versions"))]
AppRead = Annotated[Access, Depends(scoped(app_target, "versions"))]
RootRotate = Annotated[Access, Depends(scoped(root_target, "rotate"))]
AppRotate = Annotated[Access, Depends(scoped(app_target, "rotate"))]
