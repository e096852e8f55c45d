"""Rotating a key over HTTP (tokens created with ``--rotate``); every attempt is audited.

A rotation kills the old key at TA the moment ta-tool makes the new one, so it records its
intent before it acts and its outcome after:

1. the intent (outcome ``started``) is committed first; if it cannot be, the answer is 503
   and nothing is rotated (as Vault refuses a request no audit device can log);
2. the rotation runs;
3. its outcome is recorded, and the rotation's own answer is returned whatever that write
   does: a client told 503 after the key was rotated would retry and kill the key it never
   received. A failed rotation's error names its ``rotation_id``; a GET of the key returns
   whatever was stored.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from keyvault.config import Settings
from keyvault.errors import Forbidden, KeyvaultError
from keyvault.http.deps import Access, AppRotate, RootRotate, State
from keyvault.http.schemas import ROTATE_ERRORS, RotationOut
from keyvault.http.state import ServerState
from keyvault.services.rotation import RotationService

router = APIRouter(tags=["rotation"])
STARTED = "started"  # the outcome of an intent record


@router.post(
    "/v1/clusters/{cluster}/root/rotate", response_model=RotationOut, responses=ROTATE_ERRORS
)
async def rotate_root(access: RootRotate, state: State) -> RotationOut:
    """Rotate the root key with ta-tool (the old key dies at once)."""
    return await _rotate(access, state)


@router.post(
    "/v1/clusters/{cluster}/apps/{appid}/rotate",
    response_model=RotationOut,
    responses=ROTATE_ERRORS,
)
async def rotate_app(access: AppRotate, state: State) -> RotationOut:
    """Rotate a project key with ta-tool (the old key dies at once)."""
    return await _rotate(access, state)


async def _rotate(access: Access, state: ServerState) -> RotationOut:
    grant, target, audit = access.grant, access.target, access.audit
    if not grant.can_rotate:
        raise await audit.refused(
            Forbidden(
                f"token {grant.name!r} may read but not rotate", hint="create one with --rotate"
            )
        )
    await audit.record(STARTED)  # AuditUnavailable (503): not recorded, so not done
    try:
        outcome = await run_in_threadpool(
            run_rotation, state, target.cluster, target.scope, f"token:{grant.name}"
        )
    except KeyvaultError as exc:
        await audit.outcome(exc.code)
        raise
    except Exception:
        await audit.outcome("internal_error")
        raise
    audit.version = outcome.new_version
    await audit.outcome("ok")
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
