"""The FastAPI application: routes, error mapping, lifespan (audit writer, webhooks).

``create_app()`` is uvicorn's factory; it builds the settings itself because each
worker process is an entrypoint. The key read is served by ``FastKeyPath`` before
routing; the routes below declare it too so that /openapi.json is complete.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from keyvault.config import Settings, load_settings
from keyvault.db import transaction
from keyvault.errors import Forbidden, KeyvaultError
from keyvault.http.errors import error_body, error_status
from keyvault.http.fastpath import FastKeyPath
from keyvault.http.metrics import Metrics
from keyvault.http.state import ServerState, require_scope
from keyvault.models import Event, utcnow
from keyvault.scope import app_scope, root_scope
from keyvault.services.audit import AuditEntry

log = logging.getLogger("keyvault.http")
NAME = "[^/]{1,64}"


class KeyOut(BaseModel):
    cluster: str
    scope: str
    version: int
    fingerprint: str
    created_at: str
    key: str


class VersionOut(BaseModel):
    version: int
    fingerprint: str
    state: str
    source: str
    created_at: str
    invalidated_at: str | None
    superseded_by: int | None


class VersionsOut(BaseModel):
    cluster: str
    scope: str
    versions: list[VersionOut]


class EventOut(BaseModel):
    id: int
    type: str
    cluster: str
    scope: str
    payload: dict
    created_at: str


class EventsOut(BaseModel):
    events: list[EventOut]
    last_id: int


class RotationOut(BaseModel):
    rotation_id: str
    cluster: str
    scope: str
    state: str
    old_version: int | None
    new_version: int | None
    old_fingerprint: str | None
    new_fingerprint: str | None
    verify_state: str | None
    verify_message: str | None


class ErrorOut(BaseModel):
    error: str
    detail: str


ERRORS = {code: {"model": ErrorOut} for code in (400, 401, 403, 404, 503)}
# The key read answers If-None-Match itself (FastKeyPath): declare its ETag and its 304.
KEY_RESPONSES = {
    **ERRORS,
    200: {
        "headers": {"ETag": {"description": 'The version, e.g. "v3"', "schema": {"type": "string"}}}
    },
    304: {
        "description": "Not Modified: If-None-Match named the current version (no body)",
        "headers": {"ETag": {"description": "The current version", "schema": {"type": "string"}}},
    },
}


def _schema_pattern(pattern: str) -> str:
    """A pattern keyvault applies with re.fullmatch, anchored for JSON Schema (which searches)."""
    return pattern if pattern.startswith("^") and pattern.endswith("$") else f"^(?:{pattern})$"


def create_app(settings: Settings | None = None, *, webhooks: bool | None = None) -> FastAPI:
    """Build the application (uvicorn factory)."""
    settings = settings or load_settings(actor="http")
    # Declared, not enforced by FastAPI (the pattern is Python's): app_scope() validates it.
    appid_param = {"json_schema_extra": {"pattern": _schema_pattern(settings.appid_pattern)}}
    metrics = Metrics()
    holder: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = ServerState(settings)
        state.start()
        metrics.attach_database(state.factory)
        holder["state"] = state
        worker = None
        if webhooks if webhooks is not None else settings.serve_webhooks:
            from keyvault.services.webhook_worker import WebhookWorker

            worker = WebhookWorker(state.factory, settings=settings)
            worker.start()
        scheduler = None
        if settings.serve_scheduler:
            from keyvault.services.scheduler import SchedulerThread

            scheduler = SchedulerThread(state.factory, settings=settings)
            scheduler.start()
        try:
            yield
        finally:
            if scheduler is not None:
                scheduler.stop()
            if worker is not None:
                worker.stop()
            await state.aclose()

    app = FastAPI(
        title="keyvault",
        version="1",
        lifespan=lifespan,
        description="Current TA API keys for services, with scoped tokens, audit and an event feed.",
    )

    def state() -> ServerState:
        return holder["state"]

    @app.exception_handler(KeyvaultError)
    async def keyvault_error(request: Request, exc: KeyvaultError):
        headers = {"www-authenticate": "Bearer"} if error_status(exc) == 401 else None
        return JSONResponse(error_body(exc), status_code=error_status(exc), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse({"error": "invalid_input", "detail": detail[:500]}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        return JSONResponse(
            {"error": code, "detail": str(exc.detail)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )  # e.g. Allow on a 405

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(
            {"error": "unavailable", "detail": f"internal error ({type(exc).__name__})"},
            status_code=503,
        )

    @app.middleware("http")
    async def timing(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.observe(
            getattr(route, "path", "unmatched"), response.status_code, time.perf_counter() - started
        )
        return response

    def grant_for(request: Request, cluster: str, scope: str):
        st = state()
        st.ensure_fresh()
        grant = st.authenticate(request.headers.get("authorization"))
        require_scope(grant, cluster, scope)
        return grant

    @app.get(
        "/v1/clusters/{cluster}/root",
        response_model=KeyOut,
        responses=KEY_RESPONSES,
        tags=["keys"],
        summary="The current root key (ETag: its version; If-None-Match answers 304)",
    )
    async def get_root(
        cluster: str = Path(pattern=f"^{NAME}$"),
        if_none_match: str | None = Header(None, alias="If-None-Match"),
    ):
        raise AssertionError("served by FastKeyPath")  # pragma: no cover

    @app.get(
        "/v1/clusters/{cluster}/apps/{appid}",
        response_model=KeyOut,
        responses=KEY_RESPONSES,
        tags=["keys"],
        summary="The current key of one project (ETag: its version; If-None-Match answers 304)",
    )
    async def get_app(
        cluster: str = Path(pattern=f"^{NAME}$"),
        appid: str = Path(**appid_param),
        if_none_match: str | None = Header(None, alias="If-None-Match"),
    ):
        raise AssertionError("served by FastKeyPath")  # pragma: no cover

    def versions(request: Request, cluster: str, scope) -> VersionsOut:
        from keyvault.services.secrets import history

        grant_for(request, cluster, str(scope))
        with transaction(state().factory) as session:
            rows = history(session, cluster_name=cluster, scope=scope)
            out = [
                VersionOut(
                    version=v.number,
                    fingerprint=v.fingerprint,
                    state=v.state,
                    source=v.source,
                    created_at=v.created_at.isoformat(),
                    invalidated_at=v.invalidated_at.isoformat() if v.invalidated_at else None,
                    superseded_by=v.superseded_by.number if v.superseded_by else None,
                )
                for v in rows
            ]
        return VersionsOut(cluster=cluster, scope=str(scope), versions=out)

    @app.get(
        "/v1/clusters/{cluster}/root/versions",
        response_model=VersionsOut,
        responses=ERRORS,
        tags=["keys"],
    )
    def root_versions(request: Request, cluster: str = Path(pattern=f"^{NAME}$")):
        """The history of the root key, as metadata (never keys)."""
        return versions(request, cluster, root_scope())

    @app.get(
        "/v1/clusters/{cluster}/apps/{appid}/versions",
        response_model=VersionsOut,
        responses=ERRORS,
        tags=["keys"],
    )
    def app_versions(
        request: Request, cluster: str = Path(pattern=f"^{NAME}$"), appid: str = Path(**appid_param)
    ):
        """The history of a project key, as metadata (never keys)."""
        return versions(request, cluster, app_scope(appid, settings.appid_pattern))

    async def rotate(request: Request, cluster: str, scope) -> RotationOut:
        from keyvault.services.rotation import RotationService
        from keyvault.ssh.paramiko_transport import connector_from_settings

        grant = grant_for(request, cluster, str(scope))
        if not grant.can_rotate:
            raise Forbidden(
                f"token {grant.name!r} may read but not rotate", hint="create one with --rotate"
            )
        st, client = state(), request.client.host if request.client else None
        connector = connector_from_settings(settings)

        def run():
            with RotationService(st.factory, settings=settings, connector=connector) as service:
                return service.rotate(cluster, scope, actor=f"token:{grant.name}")

        try:
            outcome = await run_in_threadpool(run)
        except KeyvaultError as exc:
            await st.audit.record(
                AuditEntry(
                    utcnow(), grant.name, "rotate", cluster, str(scope), None, client, exc.code
                )
            )
            raise
        await st.audit.record(
            AuditEntry(
                utcnow(),
                grant.name,
                "rotate",
                cluster,
                str(scope),
                outcome.new_version,
                client,
                "ok",
            )
        )
        return RotationOut(
            **{k: v for k, v in outcome.as_dict().items() if k in RotationOut.model_fields}
        )

    rotate_errors = {**ERRORS, 409: {"model": ErrorOut}}

    @app.post(
        "/v1/clusters/{cluster}/root/rotate",
        response_model=RotationOut,
        responses=rotate_errors,
        tags=["rotation"],
    )
    async def rotate_root(request: Request, cluster: str = Path(pattern=f"^{NAME}$")):
        """Rotate the root key with ta-tool (the old key dies at once)."""
        return await rotate(request, cluster, root_scope())

    @app.post(
        "/v1/clusters/{cluster}/apps/{appid}/rotate",
        response_model=RotationOut,
        responses=rotate_errors,
        tags=["rotation"],
    )
    async def rotate_app(
        request: Request, cluster: str = Path(pattern=f"^{NAME}$"), appid: str = Path(**appid_param)
    ):
        """Rotate a project key with ta-tool (the old key dies at once)."""
        return await rotate(request, cluster, app_scope(appid, settings.appid_pattern))

    # events.id is a 32-bit INTEGER on PostgreSQL: a larger ``after`` is invalid input, not a 503.
    @app.get("/v1/events", response_model=EventsOut, responses=ERRORS, tags=["events"])
    async def events(
        request: Request,
        after: int = Query(0, ge=0, le=2**31 - 1),
        wait: float = Query(0, ge=0, le=60),
    ):
        """Events of the token's scopes after ``after``; with ``wait``, long-poll up to that many seconds."""
        st = state()
        st.ensure_fresh()
        grant = st.authenticate(request.headers.get("authorization"))
        deadline = time.monotonic() + wait
        while True:
            found, last = await run_in_threadpool(_events_after, st, grant, after)
            if found or time.monotonic() >= deadline:
                return EventsOut(events=found, last_id=last)
            after = last
            await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    @app.get("/healthz", tags=["ops"])
    async def healthz():
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"model": ErrorOut}})
    async def readyz():
        """The database is reachable and the master key is loaded."""
        if await run_in_threadpool(state().ready):
            return {"status": "ready"}
        return JSONResponse(
            {"error": "unavailable", "detail": "database unreachable or master key not loaded"},
            status_code=503,
        )

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics_endpoint():
        """Prometheus text exposition."""
        body = await run_in_threadpool(metrics.render)
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4")

    return FastKeyPath(app, state_getter=state, metrics=metrics)  # type: ignore[return-value]


def _events_after(st: ServerState, grant, after: int) -> tuple[list[EventOut], int]:
    with transaction(st.factory) as session:
        rows = list(
            session.scalars(select(Event).where(Event.id > after).order_by(Event.id).limit(500))
        )
    last = rows[-1].id if rows else after
    found = [
        EventOut(
            id=e.id,
            type=e.type,
            cluster=e.cluster,
            scope=e.scope,
            payload=json.loads(e.payload),
            created_at=e.created_at.isoformat(),
        )
        for e in rows
        if grant.allows(e.cluster, e.scope)
    ][:100]
    if len(found) == 100:
        last = found[-1].id
    return found, last
