"""The scheduler records the end of every run on its lease row, on SQLite and PostgreSQL:
a run with nothing due is a success, a run that raises is a failure that leaves the last
success alone, a runner without the lease (or that lost it mid-run) writes nothing, and the
metrics and `keyvault status` read the record.

Time comes from an injected clock (tests/support/clock.py); the transport is the local one
with the ta-tool emulator. Concurrency is staged, not raced: the other runner's lease is
taken in the database at a chosen moment (before the run, or from inside it through the
injected ``service_factory``), so nothing sleeps and nothing depends on timing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select

from keyvault.config import Settings, load_settings
from keyvault.db import make_engine, session_factory, transaction
from keyvault.errors import NotFound
from keyvault.http.store_metrics import StoreCollector
from keyvault.models import Lease, Rotation, ScopeSchedule
from keyvault.services import leases
from keyvault.services.rotation import RotationService
from keyvault.services.rotation.journal import SessionFactory
from keyvault.services.scheduler import LEASE, Scheduler, acquire_lease
from keyvault.ssh import Connector
from tests.support.cli import expect
from tests.support.clock import Clock
from tests.support.cluster import add_emulated_cluster, install_ta_tool, local_connector

TTL = timedelta(minutes=30)


@dataclass
class World:
    settings: Settings
    factory: SessionFactory
    connector: Connector

    def scheduler(self, clock: Clock, holder: str, **kwargs) -> Scheduler:
        return Scheduler(
            self.factory,
            settings=self.settings,
            connector=self.connector,
            clock=clock,
            holder=holder,
            **kwargs,
        )

    def lease(self) -> Lease:
        with transaction(self.factory) as s:
            row = s.get(Lease, LEASE)
            assert row is not None
            s.expunge(row)
            return row

    def metric(self, name: str) -> float | None:
        registry = CollectorRegistry()
        registry.register(StoreCollector(self.factory))
        return registry.get_sample_value(name)


@pytest.fixture
def world(tmp_path, cli):
    """A store with cluster `c` (one local host, the ta-tool emulator knowing app1)."""
    expect(cli("init"))
    settings = load_settings()
    engine = make_engine(settings.database_url)
    factory = session_factory(engine)
    ta = install_ta_tool(tmp_path / "ta", ["app1"])
    with transaction(factory) as s:
        add_emulated_cluster(s, "c", ta, host="ta-c")
    try:
        yield World(settings, factory, local_connector(tmp_path / "ta-home"))
    finally:
        engine.dispose()


RUN_COLUMNS = (
    "last_started_at",
    "last_finished_at",
    "last_holder",
    "last_outcome",
    "last_rotated",
    "last_failed",
    "last_skipped",
    "last_error",
    "last_success_at",
    "last_failure_at",
)


def never_ran(row: Lease) -> bool:
    return all(getattr(row, c) is None for c in RUN_COLUMNS)


def test_a_run_with_nothing_due_is_recorded_as_a_success(world):
    assert never_ran(world.lease())
    assert world.metric("keyvault_scheduler_last_success_timestamp_seconds") == 0
    assert world.metric("keyvault_scheduler_last_run_timestamp_seconds") == 0
    assert world.metric("keyvault_scheduler_last_run_ok") == 0

    clock = Clock()
    started = clock.now
    report = world.scheduler(clock, "runner-a", service_factory=None).run()
    assert report.lease_acquired and report.recorded and report.results == []

    row = world.lease()
    assert (row.holder, row.expires_at) == (None, None)  # released
    assert row.last_outcome == "ok" and row.last_holder == "runner-a"
    assert row.last_started_at == started and row.last_finished_at == started
    assert row.last_success_at == started and row.last_failure_at is None
    assert (row.last_rotated, row.last_failed, row.last_skipped) == (0, 0, 0)
    assert row.last_error is None
    stamp = started.timestamp()
    assert world.metric("keyvault_scheduler_last_success_timestamp_seconds") == pytest.approx(stamp)
    assert world.metric("keyvault_scheduler_last_run_timestamp_seconds") == pytest.approx(stamp)
    assert world.metric("keyvault_scheduler_last_run_ok") == 1
    assert world.metric("keyvault_scheduler_last_run_scope_failures") == 0


def test_a_failing_run_is_recorded_without_moving_the_last_success(world):
    clock = Clock()
    runner = world.scheduler(clock, "runner-a")
    succeeded = clock.now
    assert runner.run().recorded
    clock.advance(timedelta(minutes=15))
    with pytest.raises(NotFound):
        runner.run(cluster_name="gone")  # the run cannot even plan: a failed run

    row = world.lease()
    assert (row.holder, row.expires_at) == (None, None)  # the lease is given back all the same
    assert row.last_outcome == "failed" and row.last_finished_at == clock.now
    assert row.last_failure_at == clock.now and row.last_success_at == succeeded
    assert "gone" in row.last_error and "\n" not in row.last_error
    assert world.metric("keyvault_scheduler_last_success_timestamp_seconds") == pytest.approx(
        succeeded.timestamp()
    )
    assert world.metric("keyvault_scheduler_last_run_timestamp_seconds") == pytest.approx(
        clock.now.timestamp()
    )
    assert world.metric("keyvault_scheduler_last_run_ok") == 0

    # The next good run is a success again; the last failure stays on record.
    clock.advance(timedelta(minutes=15))
    assert runner.run().recorded
    row = world.lease()
    assert row.last_outcome == "ok" and row.last_success_at == clock.now
    assert row.last_failure_at == clock.now - timedelta(minutes=15) and row.last_error is None
    assert world.metric("keyvault_scheduler_last_run_ok") == 1


def test_a_run_whose_scope_fails_completes_as_partial(world, cli):
    # A policy for an APPID the TA cluster does not know: due (no key yet), and it fails.
    expect(cli("policy", "set", "--cluster", "c", "--appid", "ghost", "--max-age", "7d"))
    expect(cli("policy", "set", "--cluster", "c", "--appid", "app1", "--max-age", "7d"))
    clock = Clock()
    report = world.scheduler(clock, "runner-a").run()
    assert sorted((r.scope, r.status) for r in report.results) == [
        ("app:app1", "rotated"),
        ("app:ghost", "failed"),
    ]
    row = world.lease()
    assert row.last_outcome == "partial" and row.last_success_at == clock.now
    assert (row.last_rotated, row.last_failed, row.last_skipped) == (1, 1, 0)
    assert world.metric("keyvault_scheduler_last_run_ok") == 1
    assert world.metric("keyvault_scheduler_last_run_scope_failures") == 1


def test_a_runner_without_the_lease_writes_nothing(world):
    clock = Clock()
    assert acquire_lease(world.factory, holder="runner-a", now=clock.now, ttl=TTL) is None
    report = world.scheduler(clock, "runner-b").run()
    assert not report.lease_acquired and not report.recorded
    assert report.lease_holder is not None and report.lease_holder.startswith("runner-a until ")
    row = world.lease()
    assert row.holder == "runner-a" and never_ran(row)


def test_a_run_that_lost_its_lease_writes_nothing(world):
    clock = Clock()

    def lease_taken_meanwhile() -> RotationService:
        # As if runner-a stalled past its lease and runner-b took it over.
        later = clock.now + TTL + timedelta(minutes=1)
        assert acquire_lease(world.factory, holder="runner-b", now=later, ttl=TTL) is None
        return RotationService(world.factory, settings=world.settings, connector=world.connector)

    report = world.scheduler(clock, "runner-a", service_factory=lease_taken_meanwhile).run()
    assert report.lease_acquired and not report.recorded
    row = world.lease()
    assert row.holder == "runner-b" and never_ran(row)  # neither released nor overwritten


def status_of_scheduler(cli, *args: str) -> dict:
    result = cli("status", "--json", *args)
    assert result.exit_code in (0, 3), result.stderr
    [finding] = [f for f in json.loads(result.stdout)["findings"] if f["check"] == "scheduler"]
    return finding


def test_status_reports_the_age_of_the_last_completed_run(world, cli):
    assert status_of_scheduler(cli)["status"] == "ok"  # no policy: nothing to run
    expect(cli("policy", "set", "--cluster", "c", "--appid", "app1", "--max-age", "30d"))
    finding = status_of_scheduler(cli)
    assert finding["status"] == "attention" and finding["detail"] == "no run completed yet"
    assert "keyvault-rotate.timer" in finding["action"]

    clock = Clock()
    clock.advance(timedelta(hours=-2))
    assert world.scheduler(clock, "runner-a").run().recorded
    finding = status_of_scheduler(cli)
    assert finding["status"] == "ok"
    assert re.fullmatch(r"last completed run ended 2:\d\d:\d\d ago", finding["detail"])
    assert status_of_scheduler(cli, "--scheduler-hours", "1")["status"] == "attention"

    clock.advance(timedelta(minutes=30))
    with pytest.raises(NotFound):
        world.scheduler(clock, "runner-a").run(cluster_name="gone")
    finding = status_of_scheduler(cli)
    assert finding["status"] == "ok" and "the run after it failed" in finding["detail"]
    assert "gone" in finding["detail"]


def test_a_run_that_lost_its_lease_starts_no_rotation(world, cli):
    """The fence: a due scope is not journaled, nor generated, once another runner holds the
    lease; nor is its schedule touched (a lost lease is no failure of the scope)."""
    expect(cli("policy", "set", "--cluster", "c", "--appid", "app1", "--max-age", "7d"))
    clock = Clock()

    def lease_taken_meanwhile() -> RotationService:
        later = clock.now + TTL + timedelta(minutes=1)
        assert acquire_lease(world.factory, holder="runner-b", now=later, ttl=TTL) is None
        return RotationService(world.factory, settings=world.settings, connector=world.connector)

    runner = world.scheduler(
        clock, "runner-a", lease_ttl=TTL, service_factory=lease_taken_meanwhile
    )
    report = runner.run()
    assert report.lease_acquired and not report.recorded
    (result,) = report.results
    assert (result.scope, result.status) == ("app:app1", "skipped")
    assert result.reason.startswith("lease lost") and result.rotation_id is None
    with transaction(world.factory) as s:
        assert s.scalar(select(func.count()).select_from(Rotation)) == 0
        assert s.scalar(select(func.count()).select_from(ScopeSchedule)) == 0
    assert world.lease().holder == "runner-b"


def test_a_runner_paused_after_its_fence_check_does_not_rotate_a_scope_again(
    world, cli, monkeypatch
):
    """Runner A checks its lease, then stalls (GC, SIGSTOP, a slow disk) before it journals:
    its lease runs out, runner B takes it and rotates the scope. A, resuming, must not rotate
    that scope a second time from its stale plan: the lease is checked in the journal's own
    transaction, not only in one before it."""
    expect(cli("policy", "set", "--cluster", "c", "--appid", "app1", "--max-age", "7d"))
    clock = Clock()
    confirm = leases.LeaseKeeper.confirm
    b_reports = []

    def confirm_then_stall(keeper: leases.LeaseKeeper) -> bool:
        confirmed = confirm(keeper)
        if keeper.holder == "runner-a" and not b_reports:  # A stalls here, its lease expires
            clock.advance(TTL + timedelta(minutes=1))
            b_reports.append(world.scheduler(clock, "runner-b", lease_ttl=TTL).run())
        return confirmed

    monkeypatch.setattr(leases.LeaseKeeper, "confirm", confirm_then_stall)
    report = world.scheduler(clock, "runner-a", lease_ttl=TTL).run()
    (b,) = b_reports
    assert b.lease_acquired and [r.status for r in b.results] == ["rotated"]
    assert report.lease_acquired and not report.recorded
    (result,) = report.results
    assert result.status == "skipped" and result.reason.startswith("lease lost")
    with transaction(world.factory) as s:
        assert s.scalar(select(func.count()).select_from(Rotation)) == 1  # B's only


def test_a_run_that_lost_its_lease_does_not_take_it_back_when_it_is_free_again(
    world, cli, monkeypatch
):
    """Runner A stalls mid-run; B takes the expired lease, rotates the scope, and gives the
    lease back at its end. A's heartbeat, resuming, must not take the free lease again for
    the run it lost: that run's plan is stale, and it would rotate the scope once more."""
    expect(cli("policy", "set", "--cluster", "c", "--appid", "app1", "--max-age", "7d"))
    clock = Clock()
    confirm = leases.LeaseKeeper.confirm
    b_reports = []

    def stall_then_beat(keeper: leases.LeaseKeeper) -> bool:
        if keeper.holder == "runner-a" and not b_reports:  # A stalls, its lease expires
            clock.advance(TTL + timedelta(minutes=1))
            b_reports.append(world.scheduler(clock, "runner-b", lease_ttl=TTL).run())
            assert world.lease().holder is None  # B's run ended: the lease is free
            keeper.step()  # A's heartbeat, as A resumes
        return confirm(keeper)

    monkeypatch.setattr(leases.LeaseKeeper, "confirm", stall_then_beat)
    report = world.scheduler(clock, "runner-a", lease_ttl=TTL).run()
    (b,) = b_reports
    assert b.lease_acquired and [r.status for r in b.results] == ["rotated"]
    (result,) = report.results
    assert result.status == "skipped" and result.reason.startswith("lease lost")
    with transaction(world.factory) as s:
        assert s.scalar(select(func.count()).select_from(Rotation)) == 1  # B's only
    assert world.lease().holder is None and world.lease().last_holder == "runner-b"
