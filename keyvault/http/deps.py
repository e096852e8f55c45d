"""FastAPI dependencies: the server state, the target of a request, the caller's grant.

Order matters and is kept from the first version of the API: a request is validated
(path parameters, the APPID grammar) before it is authenticated, so a target dependency is
solved first and the grant is computed only once it succeeded. That is why the grant is a
dependency *of the target*, not a sibling (FastAPI would still call a sibling after a
validation error).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request

from keyvault.config import Settings
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


def authenticate(request: Request, state: ServerState) -> Grant:
    """The grant of the request's bearer token (caches refreshed first), or ``Unauthorized``."""
    state.ensure_fresh()
    return state.authenticate(request.headers.get("authorization"))


@dataclass(frozen=True)
class Target:
    """The key a request is about."""

    cluster: str
    scope: Scope


@dataclass(frozen=True)
class Access:
    """An authenticated caller allowed to read ``target``."""

    grant: Grant
    target: Target


def root_target(cluster: ClusterName) -> Target:
    return Target(cluster, root_scope())


def app_target(
    cluster: ClusterName,
    appid: AppId,
    settings: Annotated[Settings, Depends(server_settings)],
) -> Target:
    return Target(cluster, app_scope(appid, settings.appid_pattern))


def scoped(target_of: Callable[..., Target]) -> Callable[..., Access]:
    """A dependency: the grant of the caller, refused unless it covers the target's scope."""

    def access(
        request: Request,
        # Defaults, not Annotated: the string annotations could not name ``target_of``.
        target: Target = Depends(target_of),  # noqa: B008 - FastAPI's dependency syntax
        state: ServerState = Depends(server_state),  # noqa: B008
    ) -> Access:
        grant = authenticate(request, state)
        require_scope(grant, target.cluster, str(target.scope))
        return Access(grant, target)

    return access


State = Annotated[ServerState, Depends(server_state)]
RootAccess = Annotated[Access, Depends(scoped(root_target))]
AppAccess = Annotated[Access, Depends(scoped(app_target))]
