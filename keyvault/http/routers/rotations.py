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

``If-Match: "vN"`` (the version the caller expects to replace; ``*``: any current one)
makes a retried request safe: the rotation service checks it once the rotation holds the
scope (its journal row), so of two requests expecting vN exactly one rotates and the other
gets 412 Precondition Failed (or 409 while the first still runs), with nothing rotated.
As RFC 9110 orders it, the header is looked at only once the caller may rotate (a 401 or
403 comes first); a malformed one is then refused (400, audited), never ignored.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from keyvault.config import Settings
from keyvault.errors import Forbidden, KeyvaultError, PreconditionFailed
from keyvault.http.deps import Access, AppRotate, RootRotate, State
from keyvault.http.headers import VersionCondition, if_match
from keyvault.http.schemas import ROTATE_ERRORS, RotationOut
from keyvault.http.state import ServerState
from keyvault.services.rotation import Precondition, RotationService

router = APIRouter(tags=["rotation"])
STARTED = "started"  # the outcome of an intent record
IF_MATCH_DOC = (
    'The version you expect to replace, as its ETag ("v3"), or * for any current version. '
    "If the current version is another one, nothing is rotated (412): send it on every "
    "rotate, so that a retry after a timeout cannot rotate twice."
)


def if_match_lines(
    request: Request,
    # Declared for the OpenAPI document; the value read is every If-Match line (one list).
    if_match_header: Annotated[
        str | None, Header(alias="If-Match", description=IF_MATCH_DOC)
    ] = None,
) -> list[str]:
    """Every If-Match line of the request (parsed once the caller may rotate)."""
    return request.headers.getlist("if-match")


IfMatch = Annotated[list[str], Depends(if_match_lines)]


@router.post(
    "/v1/clusters/{cluster}/root/rotate",
    response_model=RotationOut,
    responses=ROTATE_ERRORS,
    operation_id="rotate_root_key",
)
async def rotate_root(access: RootRotate, state: State, if_match: IfMatch) -> RotationOut:
    """Rotate the root key with ta-tool (the old key dies at once)."""
    return await _rotate(access, state, if_match)


@router.post(
    "/v1/clusters/{cluster}/apps/{appid}/rotate",
    response_model=RotationOut,
    responses=ROTATE_ERRORS,
    operation_id="rotate_app_key",
)
async def rotate_app(access: AppRotate, state: State, if_match: IfMatch) -> RotationOut:
    """Rotate a project key with ta-tool (the old key dies at once)."""
    return await _rotate(access, state, if_match)


async def _rotate(access: Access, state: ServerState, if_match_values: list[str]) -> RotationOut:
    grant, target, audit = access.grant, access.target, access.audit
    try:
        if not grant.can_rotate:
            raise Forbidden(
                f"token {grant.name!r} may read but not rotate", hint="create one with --rotate"
            )
        # RFC 9110 §13.2.1: preconditions only once the request would otherwise succeed.
        condition = if_match(if_match_values)
    except KeyvaultError as exc:
        raise await audit.refused(exc) from None
    await audit.record(STARTED)  # AuditUnavailable (503): not recorded, so not done
    try:
        outcome = await run_in_threadpool(
            run_rotation,
            state,
            target.cluster,
            target.scope,
            f"token:{grant.name}",
            None if condition is None else precondition_of(condition),
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


def precondition_of(condition: VersionCondition) -> Precondition:
    """The rotation service's precondition for If-Match: ``PreconditionFailed`` (412) unless
    the scope's current version is one the caller named."""

    def check(current: int | None) -> None:
        if condition.holds(current):
            return
        found = "the scope has no current key" if current is None else f"the current is v{current}"
        raise PreconditionFailed(
            f"If-Match expected {condition.describe()}, but {found}: nothing was rotated",
            hint="GET the key for its current version (an earlier request may have rotated it)",
        )

    return check


def run_rotation(
    state: ServerState,
    cluster: str,
    scope: Any,
    actor: str,
    precondition: Precondition | None = None,
) -> Any:
    """The one call into the rotation service (blocking: run it in a thread).

    Returns the service's outcome: ``.as_dict()`` and ``.new_version``.
    """
    from keyvault.ssh.paramiko_transport import connector_from_settings  # noqa: PLC0415 - paramiko: ~0.13 s, on demand

    settings: Settings = state.settings
    connector = connector_from_settings(settings)
    with RotationService(state.factory, settings=settings, connector=connector) as service:
        return service.rotate(cluster, scope, actor=actor, precondition=precondition)
