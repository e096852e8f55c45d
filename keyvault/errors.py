"""The one exception tree of keyvault.

Every error a user can meet is a ``KeyvaultError``. Each class carries the data
that explains it, an ``exit_code`` for the CLI and a ``code``/``http_status`` for
HTTP. Messages name the problem and what to do; they never contain a secret.

``http_status`` (sent by keyvault.http.errors.error_response): 4xx for the caller's
mistakes, 502 when a host or TA behind keyvault failed, 503 only when keyvault itself
cannot serve, 500 (the root's) for the rest; an exception outside this tree is a bug (500).

The root, InvalidInput, Unauthorized, Forbidden, NotFound, Conflict, PreconditionFailed and
Unavailable are defined in ``keyvault_client.errors`` (the client distribution) and
re-exported here.

    KeyvaultError                      exit 1
    ├── InvalidInput                   exit 2   bad APPID, scope, URL, pattern, ...
    ├── ConfigError                            unreadable or invalid configuration
    ├── NotInitialized                         no home / no schema: run `keyvault init`
    ├── MasterKeyError                         master key missing, unsafe or wrong
    │   ├── MasterKeyFileError                 missing file, bad mode or owner
    │   └── WrongMasterKey                     the key does not open this store
    ├── IntegrityError                         a ciphertext failed authentication
    │   ├── RowIntegrityError                  a configuration row failed its MAC (refused)
    │   └── AuditChainBroken                   an audit record deleted, altered or moved
    ├── Unauthorized                           HTTP: missing, unknown, expired or revoked token
    ├── Forbidden                              HTTP: the token does not cover this scope/action
    ├── NotFound                               cluster, secret, version, host, rotation
    ├── Conflict                               already exists, concurrent change
    │   ├── RotationUnresolved                 a previous rotation must be recovered
    │   ├── MasterKeyLocked                    the keyring file's lock is held (master-key rotate)
    │   ├── LeaseLost                          a runner lost its lease: it starts nothing more
    │   └── PreconditionFailed                 HTTP 412: If-Match named another version (nothing rotated)
    ├── Unavailable                            client: keyvault unreachable, no fresh cached key
    ├── DatabaseError                          the database refused or is unreachable
    │   └── DatabaseDriverError                the driver's own words (HTTP shows none of them)
    ├── SshError                               anything on the way to ta-tool
    │   ├── HostUnreachable                    TCP/SSH handshake failed (safe to fail over)
    │   ├── HostKeyError                       unknown or changed host key
    │   ├── AuthenticationFailed               SSH authentication refused
    │   ├── BecomeFailed                       su/sudo to the ta user failed
    │   ├── TaToolMissing                      ta-tool not on the ta user's PATH
    │   └── ConnectionLost                     dropped after the command started
    ├── IllegalTransition                      a rotation state change the table forbids (a bug)
    ├── RotationError                          a rotation could not complete
    │   ├── ResolvedMeanwhile                  a concurrent recovery stored another key
    │   ├── NeedsRecovery                      key may exist only remotely: recover it
    │   └── StoreFailed                        key spooled locally: recover it
    └── TaApiError                             the TA Open API answered an error
        └── TaTransportError                   the TA Open API could not be reached
"""

from __future__ import annotations

# The root and the classes an HTTP answer maps to are defined once, in the client
# distribution (ta-keyvault-client), so consumers get them without the server stack.
from keyvault_client.errors import (
    Conflict as Conflict,
)
from keyvault_client.errors import (
    Forbidden as Forbidden,
)
from keyvault_client.errors import (
    InvalidInput as InvalidInput,
)
from keyvault_client.errors import (
    KeyvaultError as KeyvaultError,
)
from keyvault_client.errors import (
    NotFound as NotFound,
)
from keyvault_client.errors import (
    PreconditionFailed as PreconditionFailed,
)
from keyvault_client.errors import (
    Unauthorized as Unauthorized,
)
from keyvault_client.errors import (
    Unavailable as Unavailable,
)


class ConfigError(KeyvaultError):
    """The configuration is unreadable or invalid."""

    code = "config_error"
    http_status = 503


class NotInitialized(KeyvaultError):
    """keyvault has no home, master key or schema yet."""

    code = "not_initialized"
    http_status = 503


class MasterKeyError(KeyvaultError):
    """The master key cannot be used."""

    code = "master_key_error"
    http_status = 503


class MasterKeyFileError(MasterKeyError):
    """The master key file is missing or unsafe."""

    def __init__(self, message: str, *, path: str, hint: str | None = None) -> None:
        self.path = path
        super().__init__(message, hint=hint)


class WrongMasterKey(MasterKeyError):
    """The master key does not open this store."""


class IntegrityError(KeyvaultError):
    """A stored ciphertext failed authentication (tampered or moved)."""

    code = "integrity_error"

    def __init__(self, message: str, *, what: str, hint: str | None = None) -> None:
        self.what = what
        super().__init__(message, hint=hint)


class RotationUnresolved(Conflict):
    """A previous rotation of this scope is not resolved."""

    code = "rotation_unresolved"

    def __init__(self, message: str, *, rotation_id: str, hint: str | None = None) -> None:
        self.rotation_id = rotation_id
        super().__init__(message, hint=hint)


class MasterKeyLocked(Conflict):
    """The keyring file's lock is held (another `master-key rotate`, a spool write)."""

    code = "master_key_locked"


class LeaseLost(Conflict):
    """This runner no longer holds its lease (not renewed in time, or taken over): the
    scheduler starts no more rotations, the webhook worker claims no more deliveries."""

    code = "lease_lost"


class DatabaseError(KeyvaultError):
    """The database refused an operation or cannot be reached."""

    code = "database_error"
    http_status = 503


class DatabaseDriverError(DatabaseError):
    """A DatabaseError carrying the driver's message, which may name the database's host,
    port and name: the CLI shows it to the operator; an HTTP answer gives none of it."""


class SshError(KeyvaultError):
    """Something failed on the way to ta-tool over SSH."""

    code = "ssh_error"
    http_status = 502

    def __init__(self, message: str, *, host: str = "", hint: str | None = None) -> None:
        self.host = host
        super().__init__(message, hint=hint)


class HostUnreachable(SshError):
    """The host could not be reached or the SSH handshake failed."""


class HostKeyError(SshError):
    """The host offered a key that is not pinned (unknown or changed)."""

    def __init__(
        self, message: str, *, host: str, offered: str, pinned: str | None, hint: str | None = None
    ) -> None:
        self.offered = offered
        self.pinned = pinned
        super().__init__(message, host=host, hint=hint)


class AuthenticationFailed(SshError):
    """The SSH server refused our credentials."""


class BecomeFailed(SshError):
    """Switching to the ta user (su/sudo) failed."""


class TaToolMissing(SshError):
    """ta-tool is not on the ta user's PATH."""


class ConnectionLost(SshError):
    """The connection dropped after the remote command started."""


class RotationError(KeyvaultError):
    """A rotation could not complete."""

    code = "rotation_error"
    http_status = 502  # ta-tool or the host failed, not keyvault

    def __init__(self, message: str, *, rotation_id: str, hint: str | None = None) -> None:
        self.rotation_id = rotation_id
        super().__init__(message, hint=hint)


class ResolvedMeanwhile(RotationError):
    """A concurrent recovery stored another key for this rotation (only the same key is accepted)."""

    code = "resolved_meanwhile"


class NeedsRecovery(RotationError):
    """ta-tool may have run; the key must be recovered, not regenerated."""

    code = "needs_recovery"


class StoreFailed(RotationError):
    """The new key could not be committed; it waits in the local spool."""

    code = "store_failed"
    http_status = 503  # the database refused the new key


class TaApiError(KeyvaultError):
    """The TA Open API answered with a non-zero return_code."""

    code = "ta_api_error"
    http_status = 502
    # What TA's envelope said (scrubbed of the token) and which API path answered.
    stack_message: str = ""
    api_path: str = ""

    def __init__(
        self,
        message: str,
        *,
        return_code: int | None = None,
        return_message: str = "",
        meaning: str = "",
        hint: str | None = None,
    ) -> None:
        self.return_code = return_code
        self.return_message = return_message
        self.meaning = meaning
        super().__init__(message, hint=hint)


class TaTransportError(TaApiError):
    """The TA Open API could not be reached or answered garbage."""


class IllegalTransition(KeyvaultError):
    """A write of a rotation's state that the transition table forbids: a bug."""

    code = "illegal_transition"

    def __init__(self, rotation_id: str, old: str, new: str) -> None:
        self.rotation_id, self.old, self.new = rotation_id, old, new
        super().__init__(
            f"rotation {rotation_id}: {old} -> {new} is not an allowed transition",
            hint="this is a bug in keyvault; the rotation row was left unchanged",
        )


class RowIntegrityError(IntegrityError):
    """A configuration row (token, cluster, host, webhook, policy, schedule) failed its MAC:
    changed outside keyvault, so it is not used. Over HTTP keyvault cannot serve (503)."""

    http_status = 503


class AuditChainBroken(IntegrityError):
    """The audit log's hash chain does not verify: a record was deleted, altered, inserted
    or moved (``record_id`` names the first bad one; None: the chain's head or tail)."""

    code = "audit_chain_broken"

    def __init__(self, message: str, *, record_id: int | None, hint: str | None = None) -> None:
        self.record_id = record_id
        super().__init__(message, what="audit log", hint=hint)
