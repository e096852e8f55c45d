"""A commit that succeeds while its caller sees an error.

PostgreSQL can apply a COMMIT and lose the connection before its reply arrives
(``pg_terminate_backend``, a failover). The rotation then spooled its key, as it must, and
said "COULD NOT BE STORED", but the row said ``stored``; `rotations recover` skipped the
spool of a resolved rotation, so the file stayed for good (`status` asked for attention
forever, `master-key rotate` refused to run). Now the rotation reads its row after a failed
commit (stored with its key: a success, the spool file removed); if the database is still
away, recovery removes a spool file whose key is the stored one, `recover --all` visits
every rotation with a spool file, and one that does not match the stored key is kept and
reported. Both databases, local transport, the lost reply injected through the session
factory.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from keyvault import crypto
from keyvault.db import transaction
from keyvault.errors import RotationError, StoreFailed
from keyvault.sandbox import state
from keyvault.scope import app_scope
from keyvault.services import spool
from keyvault.services.rotation import RotationService
from keyvault.services.store import open_keyring
from tests.integration.test_rotation_local import (  # the same world, one fixture
    rotation_row,
    service,
    stored_key,
    world,  # noqa: F401 - a fixture
)


def commit_then_error_service(world, *, stays_down: bool) -> tuple[RotationService, dict]:
    """A service whose store commit is applied, then reported as a lost connection; with
    ``stays_down`` every later session fails too, until ``state["down"]`` is cleared."""
    real, state_ = world["factory"], {"armed": False, "down": False}

    def factory():
        if state_["down"]:
            raise OperationalError("connect", {}, Exception("the database is away"))
        session = real()
        commit = session.commit

        def commit_then_drop() -> None:
            commit()
            if state_["armed"]:
                state_["armed"], state_["down"] = False, stays_down
                raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

        session.commit = commit_then_drop  # type: ignore[method-assign]
        return session

    def on_step(step: str, _rid: str) -> None:
        if step == "sealed":  # inside the store transaction: its commit is the next one
            state_["armed"] = True

    svc = RotationService(
        factory, settings=world["settings"], connector=world["connector"], on_step=on_step
    )
    return svc, state_


def test_a_commit_applied_but_reported_lost_is_a_stored_rotation(world):
    """The rotation looks at its row after the failed commit: stored, with its key."""
    settings, scope = world["settings"], app_scope("app1")
    svc, _ = commit_then_error_service(world, stays_down=False)
    outcome = svc.rotate("c", scope, actor="t")
    assert outcome.state == "completed" and outcome.new_version == 1, outcome
    assert any("but the key is stored" in w for w in outcome.warnings), outcome.warnings
    assert spool.spooled_rotations(settings) == []
    assert stored_key(world, scope) == state.current_key(world["state"], str(scope))


def test_a_commit_reported_lost_while_the_database_stays_away_is_settled_by_recover(world):
    settings, scope = world["settings"], app_scope("app1")
    svc, db = commit_then_error_service(world, stays_down=True)
    with pytest.raises(StoreFailed) as info:
        svc.rotate("c", scope, actor="t")
    rid = info.value.rotation_id
    db["down"] = False  # the database is back
    assert rotation_row(world, rid).state == "stored"  # the commit was applied
    assert spool.spooled_rotations(settings) == [rid]  # and the key spooled all the same

    [outcome] = service(world).recover_all(actor="t")
    assert outcome.failure is None and outcome.state == "completed", outcome
    assert any("removed the spool file" in w for w in outcome.warnings), outcome.warnings
    assert spool.spooled_rotations(settings) == []
    assert stored_key(world, scope) == state.current_key(world["state"], str(scope))
    assert state.generations(world["state"], str(scope)) == 1


def _spool_key(world, rid: str, key: str) -> None:
    with transaction(world["factory"]) as s:
        keyring = open_keyring(s, settings=world["settings"])
    spool.write_spool(
        world["settings"], keyring, rotation_id=rid, cluster="c", scope="app:app2", key=key
    )


def test_recover_all_visits_a_completed_rotation_with_a_spool_file(world):
    settings, scope = world["settings"], app_scope("app2")
    done = service(world).rotate("c", scope, actor="t")
    assert done.state == "completed"
    _spool_key(world, done.rotation_id, stored_key(world, scope))  # its own key: a copy

    [outcome] = service(world).recover_all(actor="t")
    assert outcome.failure is None and outcome.state == "completed"
    assert spool.spooled_rotations(settings) == []


def test_a_spool_file_that_is_not_the_stored_key_is_kept_and_reported(world):
    settings, scope = world["settings"], app_scope("app2")
    done = service(world).rotate("c", scope, actor="t")
    _spool_key(world, done.rotation_id, "B" * 64)  # not the key this rotation stored

    [outcome] = service(world).recover_all(actor="t")
    assert outcome.failure is not None and "not its stored one" in outcome.failure.message
    assert spool.spooled_rotations(settings) == [done.rotation_id]
    with pytest.raises(RotationError, match="not its stored one"):
        service(world).recover(done.rotation_id, actor="t")


def test_a_row_that_names_the_spooled_key_without_storing_it_keeps_the_spool(world):
    """The row alone is never trusted with a key's only copy: a database writer who set the
    row's fingerprint to the spooled key's does not get the spool file deleted."""
    settings, scope = world["settings"], app_scope("app2")
    done = service(world).rotate("c", scope, actor="t")
    only_copy = "C" * 64  # a key that is in no version of the scope
    _spool_key(world, done.rotation_id, only_copy)
    with transaction(world["factory"]) as s:
        s.execute(
            text("UPDATE rotations SET new_fingerprint = :f WHERE id = :id"),
            {"f": crypto.fingerprint(only_copy), "id": done.rotation_id},
        )

    [outcome] = service(world).recover_all(actor="t")
    assert outcome.failure is not None and "not its stored one" in outcome.failure.message
    assert spool.spooled_rotations(settings) == [done.rotation_id]
