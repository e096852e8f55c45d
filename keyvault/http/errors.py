"""Errors become JSON ``{"error": CODE, "detail": ...}`` here and nowhere else."""

from __future__ import annotations

from keyvault.errors import KeyvaultError

ALLOWED = {400, 401, 403, 404, 409, 503}


def error_status(exc: KeyvaultError) -> int:
    """The HTTP status of an error: one of 400, 401, 403, 404, 409, 503."""
    return exc.http_status if exc.http_status in ALLOWED else 503


def error_body(exc: KeyvaultError) -> dict:
    """The JSON body of an error (its message never holds a key)."""
    return {"error": exc.code, "detail": str(exc)}
