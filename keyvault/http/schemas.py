"""The shapes the HTTP API answers with, as declared in /openapi.json."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


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
    payload: dict[str, Any]
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
    """Every error (keyvault.http.errors.error_response)."""

    error: str = Field(description="A stable code, e.g. not_found, database_error, internal_error")
    detail: str = Field(description="One line for a person: the problem and what to do")
    request_id: str | None = Field(
        None, description="The request's id, as in the X-Request-ID header and the server log"
    )
    rotation_id: str | None = Field(
        None,
        description="On an error about a rotation: its id (`keyvault rotations show` tells "
        "what became of it; do not retry blindly, the old key may be dead)",
    )


class StatusOut(BaseModel):
    status: str


Responses = dict[int | str, dict[str, Any]]

_ERROR_DESCRIPTIONS = {
    400: "Invalid input (a path, query or header value)",
    401: "Missing, unknown, expired or revoked token (WWW-Authenticate: Bearer)",
    403: "The token does not cover this scope or action",
    404: "No such cluster or key (or, for a rotation, no SSH host)",
    409: "A previous rotation of this scope is unresolved (or still running), or another conflict",
    412: "If-Match named another version than the current one: nothing was rotated",
    500: "A bug in keyvault (internal_error); the log holds the traceback under the request id",
    502: "A host or the TA Open API behind keyvault failed (SSH, ta-tool)",
    503: "keyvault cannot serve: database unreachable, audit not written, master key missing",
}


def error_responses(*statuses: int) -> Responses:
    """OpenAPI ``responses`` declaring the given error statuses with the error body."""
    return {
        status: {"model": ErrorOut, "description": _ERROR_DESCRIPTIONS[status]}
        for status in statuses
    }


# Per route, the statuses it really sends (a test checks them against the code paths).
_KEY_STATUSES = (400, 401, 403, 404, 500, 503)
KEY_ERRORS = error_responses(*_KEY_STATUSES)
VERSIONS_ERRORS = KEY_ERRORS
EVENTS_ERRORS = error_responses(400, 401, 500, 503)  # any token may follow the feed: no 403
ROTATE_ERRORS = error_responses(400, 401, 403, 404, 409, 412, 500, 502, 503)
_ETAG = {"ETag": {"description": 'The version, e.g. "v3"', "schema": {"type": "string"}}}
_NOT_MODIFIED = {
    "description": "Not Modified: If-None-Match named the current version (no body)",
    "headers": _ETAG,
}
# The key read answers If-None-Match itself (FastKeyPath): declare its ETag and its 304.
KEY_RESPONSES: Responses = {**KEY_ERRORS, 200: {"headers": _ETAG}, 304: _NOT_MODIFIED}
# HEAD: the same statuses, headers only (a HEAD response has no body).
HEAD_RESPONSES: Responses = {
    200: {"description": "The key exists and the token may read it (no body)", "headers": _ETAG},
    304: _NOT_MODIFIED,
    **{status: {"description": _ERROR_DESCRIPTIONS[status]} for status in _KEY_STATUSES},
}


# --- webhooks (declared in /openapi.json under `webhooks`) ----------------------------------


class WebhookEventData(BaseModel):
    """Metadata of the event (keyvault.services.webhooks.outbox.PAYLOAD_FIELDS): never a key."""

    event_id: int = Field(description="The event's id, as in /v1/events (webhook-id: msg_<id>)")
    cluster: str
    scope: str = Field(description="root or app:<APPID>")
    at: str = Field(description="When it happened (ISO 8601, UTC)")
    old_version: int | None = None
    new_version: int | None = None
    old_fingerprint: str | None = None
    new_fingerprint: str | None = None
    fingerprint: str | None = None
    rotation_id: str | None = None
    source: str | None = Field(None, description="How a version came: rotation, import, ...")
    state: str | None = Field(None, description="A rotation's state (rotation.* events)")
    return_code: int | None = Field(None, description="TA's return code of a failed check")


class WebhookPayload(BaseModel):
    """The JSON body of every webhook request (Standard Webhooks)."""

    type: str = Field(description="The event type, e.g. secret.rotated")
    timestamp: str = Field(description="When the event was recorded (ISO 8601, UTC)")
    data: WebhookEventData
