"""Liveness and readiness, for load balancers and orchestrators."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from keyvault.errors import DatabaseError
from keyvault.http.deps import State
from keyvault.http.schemas import StatusOut, error_responses

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=StatusOut)
async def healthz() -> StatusOut:
    """The process is up."""
    return StatusOut(status="ok")


@router.get("/readyz", response_model=StatusOut, responses=error_responses(503))
async def readyz(state: State) -> StatusOut:
    """The database is reachable and the master key is loaded (503 otherwise)."""
    if not await run_in_threadpool(state.ready):
        raise DatabaseError(
            "not ready: the database is unreachable or the master key is not loaded",
            hint="check the database and the server log",
        )
    return StatusOut(status="ready")
