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
    404: "No such cluster, key or route",
    409: "A previous rotation of this scope is unresolved, or another conflict",
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


ERRORS = error_responses(400, 401, 403, 404, 500, 503)
ROTATE_ERRORS = error_responses(400, 401, 403, 404, 409, 500, 502, 503)
_ETAG = {"ETag": {"description": 'The version, e.g. "v3"', "schema": {"type": "string"}}}
# The key read answers If-None-Match itself (FastKeyPath): declare its ETag and its 304.
KEY_RESPONSES: Responses = {
    **ERRORS,
    200: {"headers": _ETAG},
    304: {
        "description": "Not Modified: If-None-Match named the current version (no body)",
        "headers": _ETAG,
    },
}
