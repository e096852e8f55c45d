"""The one error surface of the HTTP server (keyvault.http.errors) and the request
middleware around it, in process: statuses from the error tree, a bug as a 500 (never a
503), request ids, metrics by route template, access lines without secrets.

The fast path is exercised with an injected server state whose methods fail (a fake by
injection); everything else about HTTP runs against a real server in tests/integration.
"""

from __future__ import annotations

import asyncio
import logging
import re

import httpx
import pytest
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from keyvault import logs
from keyvault.errors import (
    ConfigError,
    DatabaseDriverError,
    DatabaseError,
    Forbidden,
    HostUnreachable,
    IntegrityError,
    InvalidInput,
    NeedsRecovery,
    NotFound,
    RotationUnresolved,
    StoreFailed,
    TaApiError,
    Unauthorized,
)
from keyvault.http.errors import error_response
from keyvault.http.fastpath import APP_ROUTE, FastKeyPath
from keyvault.http.metrics import Metrics
from keyvault.http.middleware import UNMATCHED, RequestContext

TOKEN = "kvt_this-token-must-never-be-logged"
MADE_UP_ID = "[0-9a-f]{12}-[0-9a-f]+"  # made by the server: per-process prefix, counter


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (InvalidInput("bad APPID"), 400, "invalid_input"),
        (Unauthorized("missing bearer token"), 401, "unauthorized"),
        (Forbidden("not yours"), 403, "forbidden"),
        (NotFound("no such key"), 404, "not_found"),
        (RotationUnresolved("stuck", rotation_id="r1"), 409, "rotation_unresolved"),
        (IntegrityError("tampered", what="a key"), 500, "integrity_error"),
        (HostUnreachable("ta1 is down", host="ta1"), 502, "ssh_error"),
        (NeedsRecovery("ta-tool may have run", rotation_id="r1"), 502, "needs_recovery"),
        (TaApiError("TA refused"), 502, "ta_api_error"),
        (DatabaseError("database away"), 503, "database_error"),
        (StoreFailed("commit failed", rotation_id="r1"), 503, "store_failed"),
        (ConfigError("bad config"), 503, "config_error"),
    ],
)
def test_keyvault_errors_answer_with_the_status_of_the_error_tree(exc, status, code):
    answer = error_response(exc)
    rotation = {"rotation_id": "r1"} if hasattr(exc, "rotation_id") else {}
    assert (answer.status, answer.body) == (
        status,
        {"error": code, "detail": str(exc), **rotation},
    )
    assert answer.headers == ({"www-authenticate": "Bearer"} if status == 401 else {})


def test_a_database_error_tells_the_client_nothing_of_the_database(caplog):
    driver_text = 'connection to server at "db.internal" (10.1.2.3), port 5432 failed: FATAL'
    answer = error_response(DatabaseDriverError(f"database error: {driver_text}"))
    assert answer.status == 503
    assert answer.body == {
        "error": "database_error",
        "detail": "the database is unavailable; retry later",
    }
    assert "db.internal" in caplog.text  # the operator still learns why


def test_a_bug_is_a_500_internal_error_logged_with_its_traceback(caplog):
    caplog.set_level(logging.ERROR, logger="keyvault.http")
    answer = error_response(RuntimeError("some internal state"))
    assert answer.status == 500  # never a 503: that would eject a healthy node
    assert answer.body == {"error": "internal_error", "detail": "internal error (RuntimeError)"}
    [record] = [r for r in caplog.records if r.name == "keyvault.http"]
    assert record.getMessage().startswith("bug:") and record.exc_info is not None


def test_routing_and_validation_errors_share_the_body():
    allowed = error_response(HTTPException(405, headers={"Allow": "GET"}))
    assert (allowed.status, allowed.body["error"], allowed.headers) == (
        405,
        "method_not_allowed",
        {"Allow": "GET"},
    )
    missing = error_response(HTTPException(404))
    assert (missing.status, missing.body["error"]) == (404, "not_found")
    invalid = error_response(
        RequestValidationError([{"loc": ("query", "after"), "msg": "too small", "type": "x"}])
    )
    assert (invalid.status, invalid.body) == (
        400,
        {"error": "invalid_input", "detail": "query.after: too small"},
    )


def test_the_request_id_of_the_context_is_in_the_body():
    token = logs.request_id.set("req-42")
    try:
        assert error_response(NotFound("x")).body["request_id"] == "req-42"
    finally:
        logs.request_id.reset(token)


# --- the middleware and the fast path, in process -------------------------------------------


class _BrokenState:
    """A server state whose first step fails unexpectedly (a bug on the hot path)."""

    audit = None  # never reached: the read fails first

    def deadline(self) -> float:
        return 0.0

    async def blocking(self, call, *args, deadline=None):
        return call(*args)

    def ensure_fresh(self) -> None:
        raise RuntimeError("unexpected")


async def _inner(scope, receive, send) -> None:
    if scope["path"] == "/crash":
        raise ValueError("a bug behind the fast path")
    raise HTTPException(404)  # never reached by these requests otherwise


def _serve(*requests: tuple[str, dict[str, str]]) -> tuple[list[httpx.Response], Metrics]:
    metrics = Metrics()
    app = RequestContext(FastKeyPath(_inner, state=_BrokenState), metrics=metrics)  # type: ignore[arg-type]

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kv") as client:
            return [await client.get(path, headers=headers) for path, headers in requests]

    return asyncio.run(run()), metrics


def test_a_bug_on_the_fast_path_is_a_500_with_the_request_id(caplog):
    caplog.set_level(logging.INFO)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    [sent_id, made_id, bad_id, crash], metrics = _serve(
        ("/v1/clusters/c/apps/secret-project", {**auth, "X-Request-ID": "client-7"}),
        ("/v1/clusters/c/apps/secret-project", auth),
        ("/v1/clusters/c/root", {"X-Request-ID": "has spaces in it"}),
        ("/crash", {}),
    )
    for response in (sent_id, made_id, bad_id, crash):
        assert response.status_code == 500
        body = response.json()
        assert body["error"] == "internal_error"
        assert body["request_id"] == response.headers["x-request-id"]
    assert sent_id.headers["x-request-id"] == "client-7"
    assert re.fullmatch(MADE_UP_ID, made_id.headers["x-request-id"])
    assert re.fullmatch(MADE_UP_ID, bad_id.headers["x-request-id"])

    scraped = metrics.render().decode()
    assert (
        f'keyvault_http_requests_total{{code="500",method="GET",route="{APP_ROUTE}"}} 2.0'
        in scraped
    )
    assert (
        f'keyvault_http_requests_total{{code="500",method="GET",route="{UNMATCHED}"}} 1.0'
        in scraped
    )

    access = [r for r in caplog.records if r.name == "keyvault.http.access"]
    assert [(r.method, r.route, r.status) for r in access][:2] == [("GET", APP_ROUTE, 500)] * 2
    ours = [r for r in caplog.records if r.name.startswith("keyvault")]
    logged = "\n".join(logs.JsonFormatter().format(r) for r in ours)
    assert TOKEN not in logged and "secret-project" not in logged
    assert '"route":"/v1/clusters/{cluster}/root"' in logged  # the template, not the path
