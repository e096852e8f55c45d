"""The errors a keyvault client meets: the root of keyvault's one exception tree.

``KeyvaultError`` and the classes an HTTP answer maps to live here, in the client
distribution, so that a consumer installs them without the server stack; the server
package's ``keyvault.errors`` re-exports these very classes and adds the rest of the
tree (drawn there). ``except keyvault.errors.Unauthorized`` and ``except
keyvault_client.Unauthorized`` catch the same thing.
"""

from __future__ import annotations


class KeyvaultError(Exception):
    """Root of all keyvault errors; ``str()`` is one line for the user."""

    exit_code = 1
    http_status = 500
    code = "error"
    # Structured detail an HTTP error body carried (set by the client).
    detail: object = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message)

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}; {self.hint}"
        return self.message


class InvalidInput(KeyvaultError):
    """The user gave a value keyvault cannot accept."""

    exit_code = 2
    http_status = 400
    code = "invalid_input"


class Unauthorized(KeyvaultError):
    """No valid bearer token (missing, unknown, expired or revoked)."""

    code = "unauthorized"
    http_status = 401
    # The name of the token that was refused (expired or revoked), for the audit log.
    token_name: str | None = None


class Forbidden(KeyvaultError):
    """The token is valid but does not cover this scope or action."""

    code = "forbidden"
    http_status = 403


class NotFound(KeyvaultError):
    """A named object does not exist."""

    code = "not_found"
    http_status = 404


class Conflict(KeyvaultError):
    """The request conflicts with the current state."""

    code = "conflict"
    http_status = 409


class PreconditionFailed(Conflict):
    """A precondition (HTTP ``If-Match``) did not hold: nothing was changed (412)."""

    code = "precondition_failed"
    http_status = 412


class Unavailable(KeyvaultError):
    """keyvault could not be reached (no answer, or 5xx from every address) and no cached
    key was fresh enough to serve instead (``max_stale``)."""

    code = "unavailable"
    http_status = 503
