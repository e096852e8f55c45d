"""What a rotation (or a recovery) ended with: a typed result, never an exception in a list."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from keyvault.errors import KeyvaultError, NeedsRecovery, RotationUnresolved, StoreFailed
from keyvault.models import Rotation
from keyvault.rotation_states import RotationState, is_unresolved

log = logging.getLogger("keyvault.rotation")


class ResultStatus(StrEnum):
    """How one scope's rotation ended, for people and for the scheduler."""

    COMPLETED = "completed"  # stored, cleaned up and checked
    STORED = "stored"  # stored; clean-up or the check is left to `rotations recover`
    REFUSED = "refused"  # another rotation of the scope is unresolved: nothing ran
    NEEDS_RECOVERY = "needs_recovery"  # a key may exist on the host or in the spool
    FAILED = "failed"  # nothing was generated, or the run could not start
    ABANDONED = "abandoned"  # (recover of a rotation an operator gave up)


@dataclass(frozen=True)
class Failure:
    """Why a rotation failed, as data: what the error says and the exit code it carries.

    ``exception`` is kept (never shown, never compared) only so that the single-scope
    ``RotationService.rotate`` can raise exactly what happened.
    """

    code: str
    message: str
    hint: str | None
    exit_code: int
    rotation_id: str | None = None
    exception: Exception | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, exc: Exception, scope: str) -> Failure:
        """The failure an exception stands for (a non-keyvault one is a bug, and logged)."""
        if not isinstance(exc, KeyvaultError):
            log.error("rotation of %s failed unexpectedly", scope, exc_info=exc)
            message = f"internal error ({type(exc).__name__})"
            return cls("internal_error", message, None, 1, None, exc)
        rid = getattr(exc, "rotation_id", None)
        return cls(exc.code, exc.message, exc.hint, exc.exit_code, rid, exc)

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "hint": self.hint}


@dataclass(frozen=True)
class RotationResult:
    """One scope's rotation or recovery (fingerprints only, never keys)."""

    cluster: str
    scope: str
    rotation_id: str | None = None
    state: str | None = None
    host: str | None = None
    old_version: int | None = None
    old_fingerprint: str | None = None
    new_version: int | None = None
    new_fingerprint: str | None = None
    cleaned_up: bool = False
    verify_state: str | None = None
    verify_message: str | None = None
    old_key: str | None = None  # rejected | still_accepted | unchecked (services/verify.py)
    warnings: tuple[str, ...] = ()
    failure: Failure | None = None

    @classmethod
    def of_row(cls, rotation: Rotation) -> RotationResult:
        """The result a journal row records."""
        return cls(
            rotation_id=rotation.id,
            cluster=rotation.cluster.name,
            scope=rotation.scope,
            state=rotation.state,
            host=rotation.host_label,
            old_version=rotation.old_version,
            new_version=rotation.new_version,
            new_fingerprint=rotation.new_fingerprint,
            cleaned_up=bool(rotation.cleaned_up),
            verify_state=rotation.verify_state,
            verify_message=rotation.verify_message,
            old_key=rotation.old_key,
        )

    @classmethod
    def failed(
        cls,
        cluster: str,
        scope: str,
        exc: Exception,
        rotation_id: str | None = None,
        host: str | None = None,
    ) -> RotationResult:
        """The result of a rotation that raised ``exc`` (on ``host``, once one was chosen)."""
        failure = Failure.of(exc, scope)
        rid = failure.rotation_id or rotation_id
        return cls(cluster, scope, rotation_id=rid, host=host, failure=failure)

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def status(self) -> ResultStatus:
        if self.failure is not None:
            exc = self.failure.exception
            if isinstance(exc, RotationUnresolved):
                return ResultStatus.REFUSED
            if isinstance(exc, NeedsRecovery | StoreFailed):
                return ResultStatus.NEEDS_RECOVERY
            return ResultStatus.FAILED
        if self.state is None or is_unresolved(self.state):
            return ResultStatus.NEEDS_RECOVERY
        return ResultStatus(RotationState(self.state).value)

    def warn(self, warning: str) -> RotationResult:
        return dataclasses.replace(self, warnings=(*self.warnings, warning))

    def with_(self, **changes: Any) -> RotationResult:
        return dataclasses.replace(self, **changes)

    def cleaned(self) -> RotationResult:
        """This result once its remote clean-up is done (completed if also checked)."""
        done = self.state == RotationState.STORED and self.verify_state is not None
        return self.with_(cleaned_up=True, state=RotationState.COMPLETED if done else self.state)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the outcome fields, ``status``, and ``error`` when it failed."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["warnings"] = list(self.warnings)
        fields["state"] = None if self.state is None else str(self.state)
        fields.pop("failure")
        return {
            "status": str(self.status),
            **fields,
            "error": None if self.failure is None else self.failure.as_dict(),
        }
