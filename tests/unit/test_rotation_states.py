"""The rotation states and their one transition table."""

from __future__ import annotations

import pytest

from keyvault.errors import KeyvaultError
from keyvault.models import UNRESOLVED_ROTATION_STATES, Rotation
from keyvault.rotation_states import (
    TRANSITIONS,
    UNRESOLVED,
    IllegalTransition,
    RotationState,
    check_transition,
    is_unresolved,
)

S = RotationState
ALLOWED = {(old, new) for old, targets in TRANSITIONS.items() for new in targets}


def test_the_table_names_every_state_and_only_states():
    assert set(TRANSITIONS) == set(RotationState)
    assert all(targets <= set(RotationState) for targets in TRANSITIONS.values())


def test_finished_states_are_final_and_nothing_returns_to_pending():
    assert TRANSITIONS[S.FAILED] == TRANSITIONS[S.ABANDONED] == frozenset()
    assert all(S.PENDING not in targets for targets in TRANSITIONS.values())
    # Once the key is stored the rotation never becomes unresolved or failed again.
    for state in (S.STORED, S.COMPLETED):
        assert TRANSITIONS[state] <= {S.STORED, S.COMPLETED}


@pytest.mark.parametrize("old", list(RotationState))
@pytest.mark.parametrize("new", list(RotationState))
def test_check_transition_follows_the_table(old, new):
    if (old, new) in ALLOWED:
        assert check_transition("r1", old.value, new) is new
    else:
        with pytest.raises(IllegalTransition) as info:
            check_transition("r1", old.value, new)
        assert isinstance(info.value, KeyvaultError)
        assert f"{old.value} -> {new.value}" in str(info.value) and "bug" in str(info.value)


def test_unresolved_states_agree_with_the_models_and_the_schema():
    assert set(UNRESOLVED_ROTATION_STATES) == {s.value for s in UNRESOLVED}
    assert all(is_unresolved(s) for s in UNRESOLVED_ROTATION_STATES)
    assert not is_unresolved("stored")
    table = Rotation.__table__
    (check,) = [c for c in table.constraints if getattr(c, "name", "") == "ck_rotations_state"]
    listed = str(check.sqltext).split("(", 1)[1].rstrip(")").replace("'", "").split(", ")
    assert set(listed) == {s.value for s in RotationState}
    (index,) = [i for i in table.indexes if i.name == "uq_rotations_one_unresolved"]
    where = str(index.dialect_options["sqlite"]["where"])
    assert set(where.split("(", 1)[1].rstrip(")").replace("'", "").split(", ")) == set(
        UNRESOLVED_ROTATION_STATES
    )
