"""The states of a rotation row and the one table of allowed transitions.

This module sits beside ``models`` (not in the rotation service package) so that the
models can name the states without importing any service. The database column stays
a plain string; ``RotationState`` is a ``StrEnum``, so its members compare equal to
the stored strings. ``docs/rotation.md`` draws this table.
"""

from __future__ import annotations

from enum import StrEnum

from keyvault.errors import IllegalTransition

__all__ = ["IllegalTransition", "RotationState"]


class RotationState(StrEnum):
    """Where a rotation stands (the ``rotations.state`` column)."""

    PENDING = "pending"  # journaled; ta-tool may be running
    NEEDS_RECOVERY = "needs_recovery"  # a key may exist only on the host or in the spool
    FAILED = "failed"  # nothing was generated (or kept): rotate again
    STORED = "stored"  # the key is committed; clean-up or verification still to record
    COMPLETED = "completed"  # stored, cleaned up and checked
    ABANDONED = "abandoned"  # given up by an operator (`recover --regenerate`)


# One unresolved rotation per scope at a time (a partial unique index enforces it).
UNRESOLVED: frozenset[RotationState] = frozenset(
    {RotationState.PENDING, RotationState.NEEDS_RECOVERY}
)

_S = RotationState
# Every write of a rotation's state goes through this table (see journal.py). A state
# written again over itself records more facts (a new error, clean-up, a check).
TRANSITIONS: dict[RotationState, frozenset[RotationState]] = {
    _S.PENDING: frozenset({_S.NEEDS_RECOVERY, _S.FAILED, _S.STORED, _S.ABANDONED}),
    _S.NEEDS_RECOVERY: frozenset({_S.NEEDS_RECOVERY, _S.FAILED, _S.STORED, _S.ABANDONED}),
    _S.STORED: frozenset({_S.STORED, _S.COMPLETED}),
    # A concurrent recovery may record clean-up or a check again on a finished rotation.
    _S.COMPLETED: frozenset({_S.COMPLETED}),
    _S.FAILED: frozenset(),
    _S.ABANDONED: frozenset(),
}


def is_unresolved(state: str) -> bool:
    """True for ``pending`` and ``needs_recovery``."""
    return state in UNRESOLVED


def check_transition(rotation_id: str, old: str, new: RotationState) -> RotationState:
    """``new`` if the table allows ``old -> new``; else raise :class:`IllegalTransition`."""
    if new not in TRANSITIONS.get(RotationState(old), frozenset()):
        raise IllegalTransition(rotation_id, old, new)
    return new
