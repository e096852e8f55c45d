"""Liveness and readiness, for load balancers and orchestrators."""

from __future__ import annotations

from fastapi import APIRouter

from keyvault.errors import DatabaseError
from keyvault.http.deps import State
from keyvault.http.schemas import StatusOut, error_responses

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=StatusOut, operation_id="healthz")
async def healthz() -> StatusOut:
    """The process is up (answered on the event loop, without the database)."""
    return StatusOut(status="ok")


@router.get(
    "/readyz", response_model=StatusOut, responses=error_responses(503), operation_id="readyz"
)
async def readyz(state: State) -> StatusOut:
    """The database answers, the master key is loaded and audit records can be written
    (503 otherwise: no key read could succeed)."""
    if not await state.ready():
        raise DatabaseError(
            "not ready: the database is unreachable, the master key is not loaded "
            "or audit records cannot be written",
            hint="check the database and the server log",
        )
    return StatusOut(status="ready")
