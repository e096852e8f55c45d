"""Typed rotation results and the clean-up policy: plain data, no exceptions in lists."""

from __future__ import annotations

import pytest

from keyvault.errors import (
    BecomeFailed,
    InvalidInput,
    NeedsRecovery,
    RotationUnresolved,
    StoreFailed,
)
from keyvault.services.rotation import CleanupPolicy, ResultStatus, RotationResult


def stored(**changes) -> RotationResult:
    base = RotationResult("c", "app:a1", "r1", "stored", "ta@h:22", new_version=2)
    return base.with_(**changes)


@pytest.mark.parametrize(
    ("exc", "status", "exit_code"),
    [
        (RotationUnresolved("busy", rotation_id="r0"), ResultStatus.REFUSED, 1),
        (NeedsRecovery("lost", rotation_id="r1"), ResultStatus.NEEDS_RECOVERY, 1),
        (StoreFailed("db", rotation_id="r1"), ResultStatus.NEEDS_RECOVERY, 1),
        (BecomeFailed("su refused", host="h"), ResultStatus.FAILED, 1),
        (InvalidInput("bad appid"), ResultStatus.FAILED, 2),
    ],
)
def test_a_failure_is_data_with_its_code_message_hint_and_exit_code(exc, status, exit_code):
    exc.hint = "do this"
    result = RotationResult.failed("c", "app:a1", exc, rotation_id="r9")
    assert result.status is status and not result.ok
    assert result.failure.exit_code == exit_code and result.failure.code == exc.code
    assert str(result.failure) == str(exc)
    assert result.rotation_id == getattr(exc, "rotation_id", "r9")
    shown = result.as_dict()
    assert shown["status"] == status.value
    assert shown["error"] == {"code": exc.code, "message": exc.message, "hint": "do this"}
    assert "exception" not in repr(result.failure)


def test_an_unexpected_error_is_an_internal_error_without_its_text():
    result = RotationResult.failed("c", "root", ValueError("secret-ish detail"))
    assert result.status is ResultStatus.FAILED
    assert result.failure.code == "internal_error" and "secret-ish" not in str(result.failure)


def test_status_follows_the_state_and_clean_up_completes_a_checked_rotation():
    assert stored().status is ResultStatus.STORED and stored().ok
    assert stored().cleaned() == stored(cleaned_up=True)
    checked = stored(verify_state="skipped")
    assert checked.cleaned().status is ResultStatus.COMPLETED
    assert stored(state="failed").status is ResultStatus.FAILED
    assert stored(state="needs_recovery").status is ResultStatus.NEEDS_RECOVERY


def test_results_are_frozen_and_warnings_accumulate():
    result = stored().warn("one").warn("two")
    assert result.warnings == ("one", "two") and result.as_dict()["warnings"] == ["one", "two"]
    with pytest.raises(AttributeError):
        result.state = "completed"


def test_inline_clean_up_needs_stdin():
    assert CleanupPolicy.INLINE.for_batch(None) is CleanupPolicy.INLINE
    assert CleanupPolicy.INLINE.for_batch("su password") is CleanupPolicy.DEFERRED
    assert CleanupPolicy.IMMEDIATE.for_batch("su password") is CleanupPolicy.IMMEDIATE
    assert CleanupPolicy.DEFERRED.for_batch(None) is CleanupPolicy.DEFERRED
