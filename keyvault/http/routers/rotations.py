"""Rotating a key over HTTP (tokens created with ``--rotate``); every attempt is audited."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from keyvault.config import Settings
from keyvault.errors import Forbidden, KeyvaultError
from keyvault.http.audit_writer import AuditEntry
from keyvault.http.deps import Access, AppAccess, RootAccess, State
from keyvault.http.schemas import ROTATE_ERRORS, RotationOut
from keyvault.http.state import ServerState
from keyvault.models import utcnow
from keyvault.services.rotation import RotationService

router = APIRouter(tags=["rotation"])


@router.post(
    "/v1/clusters/{cluster}/root/rotate", response_model=RotationOut, responses=ROTATE_ERRORS
)
async def rotate_root(request: Request, access: RootAccess, state: State) -> RotationOut:
    """Rotate the root key with ta-tool (the old key dies at once)."""
    return await _rotate(request, access, state)


@router.post(
    "/v1/clusters/{cluster}/apps/{appid}/rotate",
    response_model=RotationOut,
    responses=ROTATE_ERRORS,
)
async def rotate_app(request: Request, access: AppAccess, state: State) -> RotationOut:
    """Rotate a project key with ta-tool (the old key dies at once)."""
    return await _rotate(request, access, state)


async def _rotate(request: Request, access: Access, state: ServerState) -> RotationOut:
    grant, target = access.grant, access.target
    if not grant.can_rotate:
        raise Forbidden(
            f"token {grant.name!r} may read but not rotate", hint="create one with --rotate"
        )
    client = request.client.host if request.client else None

    def entry(version: int | None, outcome: str) -> AuditEntry:
        return AuditEntry(
            utcnow(),
            grant.name,
            "rotate",
            target.cluster,
            str(target.scope),
            version,
            client,
            outcome,
        )

    try:
        outcome = await run_in_threadpool(
            run_rotation, state, target.cluster, target.scope, f"token:{grant.name}"
        )
    except KeyvaultError as exc:
        await state.audit.record(entry(None, exc.code))
        raise
    await state.audit.record(entry(outcome.new_version, "ok"))
    fields = {k: v for k, v in outcome.as_dict().items() if k in RotationOut.model_fields}
    return RotationOut(**fields)


def run_rotation(state: ServerState, cluster: str, scope: Any, actor: str) -> Any:
    """The one call into the rotation service (blocking: run it in a thread).

    Returns the service's outcome: ``.as_dict()`` and ``.new_version``.
    """
    from keyvault.ssh.paramiko_transport import connector_from_settings  # noqa: PLC0415 - paramiko: ~0.13 s, on demand

    settings: Settings = state.settings
    connector = connector_from_settings(settings)
    with RotationService(state.factory, settings=settings, connector=connector) as service:
        return service.rotate(cluster, scope, actor=actor)
