"""Stored rotations a dead process left behind are settled, and the operator is told.

A rotation killed after its key was committed stays ``stored``: the pending file on the TA
host (a copy of the current key) is never removed and the key never checked. The scheduler
finishes such rotations once they are older than ``SETTLE_AFTER`` (a run still finishing its
own is left alone), and ``keyvault status`` reports any it could not settle.

SQLite and PostgreSQL, the local transport and the ta-tool emulator (injected); time comes
from the scheduler's injected clock, never from waiting.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from keyvault.config import load_settings
from keyvault.db import make_engine, session_factory, transaction
from keyvault.models import Rotation
from keyvault.sandbox import state
from keyvault.scope import app_scope
from keyvault.services.rotation import SETTLE_AFTER, RotationService
from keyvault.services.scheduler import Scheduler
from keyvault.services.status import check_rotations
from tests.support.cluster import add_emulated_cluster, install_ta_tool, local_connector


class Crash(Exception):
    """Raised by the step hook: the rotating process "dies" right after the commit."""


@pytest.fixture
def world(tmp_path, cli):
    assert cli("init").exit_code == 0
    settings = load_settings()
    engine = make_engine(settings.database_url)
    factory = session_factory(engine)
    ta = install_ta_tool(tmp_path / "ta-c", ["app1"])
    with transaction(factory) as s:
        add_emulated_cluster(s, "c", ta, host="ta-c")
    ta_home = tmp_path / "ta-home"
    yield {
        "settings": settings,
        "factory": factory,
        "connector": local_connector(ta_home),
        "state": ta.state_dir,
        "pending": ta_home / ".keyvault" / "pending",
    }
    engine.dispose()


def stored_but_unsettled(world) -> str:
    """Rotate app1 and "die" right after the key is committed; the rotation id."""

    def die_after_store(step: str, rid: str) -> None:
        if step == "stored":
            raise Crash(rid)

    service = RotationService(
        world["factory"],
        settings=world["settings"],
        connector=world["connector"],
        on_step=die_after_store,
    )
    with service, pytest.raises(Crash) as info:
        service.rotate("c", app_scope("app1"), actor="t")
    rid = str(info.value)
    row = rotation(world, rid)
    assert row.state == "stored" and not row.cleaned_up
    assert (world["pending"] / f"{rid}.out").exists()  # the copy of the key on the host
    return rid


def rotation(world, rid: str) -> Rotation:
    with transaction(world["factory"]) as s:
        row = s.get(Rotation, rid)
        assert row is not None
        return row


def scheduler(world, at: datetime, **kwargs) -> Scheduler:
    return Scheduler(
        world["factory"],
        settings=world["settings"],
        connector=world["connector"],
        clock=lambda: at,
        holder="test-runner",
        **kwargs,
    )


def test_the_scheduler_settles_an_old_stored_rotation_and_leaves_a_young_one(world):
    rid = stored_but_unsettled(world)
    now = datetime.now(UTC)

    young = scheduler(world, now + SETTLE_AFTER / 2).run()
    assert young.lease_acquired and young.settled == []
    assert rotation(world, rid).state == "stored"  # its own run may still be finishing it

    old = scheduler(world, now + SETTLE_AFTER + timedelta(minutes=1)).run()
    assert [r.rotation_id for r in old.settled] == [rid]
    assert old.settled[0].failure is None
    row = rotation(world, rid)
    assert row.state == "completed" and row.cleaned_up
    # The file's key is gone from the host (a key-less tombstone may stay), and ta-tool did
    # not run again: the stored key is still the only valid one.
    leftover = world["pending"] / f"{rid}.out"
    current = state.current_key(world["state"], "app:app1")
    assert not leftover.exists() or current not in leftover.read_text()
    assert state.generations(world["state"], "app:app1") == 1


def test_an_unsettleable_rotation_is_reported_and_never_stops_the_run(world):
    rid = stored_but_unsettled(world)
    world["connector"].unreachable = frozenset({"ta-c"})
    later = datetime.now(UTC) + SETTLE_AFTER + timedelta(minutes=1)

    report = scheduler(world, later).run()
    assert report.lease_acquired and report.recorded
    (failed,) = report.settled
    assert failed.rotation_id == rid and failed.failure is not None
    assert rotation(world, rid).state == "stored"

    # An hour past the settling age, `keyvault status` names it with what to do.
    with transaction(world["factory"]) as s:
        soon = check_rotations(s, now=later)
        stuck = check_rotations(s, now=later + timedelta(hours=1, minutes=1))
    assert [f.status for f in soon] == ["ok"]
    (finding,) = stuck
    assert finding.status == "attention" and rid in finding.detail
    assert f"keyvault rotations recover {rid}" in finding.action
