"""The Prometheus scrape endpoint (what it exports: keyvault/http/metrics.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from keyvault.http.metrics import CONTENT_TYPE, Metrics

router = APIRouter(tags=["ops"])


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text exposition: this process's requests, and the store's state."""
    registry: Metrics = request.app.state.metrics
    body = await run_in_threadpool(registry.render)
    return PlainTextResponse(body, media_type=CONTENT_TYPE)
