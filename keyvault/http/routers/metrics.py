"""The Prometheus scrape endpoint (what it exports: keyvault/http/metrics.py).

With ``serve --metrics-token-file`` a scrape must send ``Authorization: Bearer <that token>``
(the scrape shows cluster names and rotation counts). The exposition never holds the database
URL, and a failed scrape answers with the error's type only.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from keyvault.errors import ConfigError, Unauthorized
from keyvault.http.headers import bearer_token
from keyvault.http.metrics import CONTENT_TYPE, Metrics
from keyvault.http.schemas import error_responses
from keyvault.http.state import ServerState

router = APIRouter(tags=["ops"])
_TOKEN_FILE_LIMIT = 4096


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses=error_responses(401, 500, 503),
    operation_id="metrics",
)
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text exposition: this process's requests, and the store's state."""
    _check_scrape_token(request.app.state.metrics_token, request.headers.get("authorization"))
    registry: Metrics = request.app.state.metrics
    state: ServerState = request.app.state.server
    body = await state.blocking(registry.render)  # the store's gauges read the database
    return PlainTextResponse(body, media_type=CONTENT_TYPE)


def _check_scrape_token(expected: str | None, authorization: str | None) -> None:
    if expected is None:
        return
    given = bearer_token(authorization) or ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized(
            "/metrics needs the scrape token",
            hint="send `Authorization: Bearer <the token in --metrics-token-file>`",
        )


def read_metrics_token(path: str) -> str:
    """The scrape token in ``path`` (its first line); ``ConfigError`` if there is none."""
    try:
        with open(Path(path), encoding="utf-8") as file:
            token = file.read(_TOKEN_FILE_LIMIT).strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read the metrics token file {path}: {type(exc).__name__}",
            hint="check --metrics-token-file",
        ) from None
    if not token or not token[0].strip():
        raise ConfigError(
            f"the metrics token file {path} is empty", hint="write one token line into it"
        )
    return token[0].strip()
