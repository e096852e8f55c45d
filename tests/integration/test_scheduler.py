"""Policies and the scheduler (issue 5, "Policies and the scheduler" and "Acceptance"), on
SQLite and PostgreSQL, with the local transport and the ta-tool emulator (both injected).

Time comes from an injected clock (a callable returning chosen datetimes): no test sleeps
and no assertion depends on how long anything took. Clock values are chosen near the real
time (keys that a rotation stores get the real ``utcnow()``), and keys are made "old" by
backdating ``secret_versions.created_at`` in the database: data, not patching.

Keys are compared with ``==`` inside a helper that reports fingerprints only.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from keyvault import crypto
from keyvault.config import load_settings
from keyvault.db import make_engine, session_factory, transaction
from keyvault.errors import InvalidInput
from keyvault.models import CURRENT, Event, Lease, Rotation, ScopeSchedule, Secret, SecretVersion
from keyvault.sandbox import state
from keyvault.scope import app_scope, parse_scope
from keyvault.services import clusters, secrets
from keyvault.services.policies import Window, parse_window
from keyvault.services.rotation import RotationService
from keyvault.services.scheduler import LEASE, Scheduler, acquire_lease, backoff
from keyvault.services.store import open_keyring
from tests.support.cli import expect as ok  # this file's short name for it
from tests.support.clock import Clock
from tests.support.cluster import add_emulated_cluster, install_ta_tool, local_connector
from tests.support.timeouts import TIMEOUT

UTC = UTC
APPS = ["app1", "app2", "app3", "app4"]
BERLIN = ZoneInfo("Europe/Berlin")


# ------------------------------------------------------------------------------- unit: windows


def at(day: str, hhmm: str, tz: str = "UTC") -> datetime:
    """An aware datetime on a fixed week (Mon 2026-01-05 .. Sun 2026-01-11, winter time)."""
    days = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    hh, mm = (int(x) for x in hhmm.split(":"))
    return datetime(2026, 1, 5 + days.index(day), hh, mm, tzinfo=ZoneInfo(tz))


@pytest.mark.parametrize(
    ("text", "days", "start", "end", "tz"),
    [
        ("Tue 02:00-04:00 UTC", {1}, "02:00", "04:00", "UTC"),
        ("  Tue 02:00-04:00 UTC  ", {1}, "02:00", "04:00", "UTC"),
        ("Mon-Fri 22:00-02:00 Europe/Berlin", {0, 1, 2, 3, 4}, "22:00", "02:00", "Europe/Berlin"),
        ("03:00-05:00", set(range(7)), "03:00", "05:00", "UTC"),
        ("daily 03:00-05:00", set(range(7)), "03:00", "05:00", "UTC"),
        ("every 3:00-5:30 America/New_York", set(range(7)), "03:00", "05:30", "America/New_York"),
        (
            "Fri-Mon 23:00-01:00",
            {4, 5, 6, 0},
            "23:00",
            "01:00",
            "UTC",
        ),  # a day range wrapping the week
        ("sat,SUN 1:00-2:00", {5, 6}, "01:00", "02:00", "UTC"),
        ("Tuesday,thursday 00:00-23:59", {1, 3}, "00:00", "23:59", "UTC"),
        ("Mon,Wed-Fri 22:00-00:00", {0, 2, 3, 4}, "22:00", "00:00", "UTC"),
    ],
)
def test_parse_window_accepts(text, days, start, end, tz):
    w = parse_window(text)
    assert w == Window(
        days=frozenset(days), start=time.fromisoformat(start), end=time.fromisoformat(end), tz=tz
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Tue",
        "Tue 02:00",
        "02:00",
        "Tue 02:00-",
        "Tue 02-04",
        "Tue 2-4 UTC",
        "Xyz 02:00-04:00 UTC",  # not a day
        "Tu 02:00-04:00",  # too short to be a day
        "mon- 02:00-04:00",  # an open day range
        "Tue 25:00-26:00 UTC",
        "Tue 02:60-04:00",
        "Tue 24:00-02:00",  # not times
        "Tue 02:00-02:00 UTC",  # empty
        "Tue 02:00-04:00 Mars/Olympus_Mons",  # not a time zone
        "Tue 02:00-04:00 UTC extra",
    ],
)
def test_parse_window_rejects_with_a_hint(text):
    with pytest.raises(InvalidInput) as info:
        parse_window(text)
    assert info.value.exit_code == 2
    assert f"invalid window {text!r}" in str(info.value)
    assert "Tue 02:00-04:00 UTC" in info.value.hint


def test_window_contains_bounds_and_days():
    w = parse_window("Tue 02:00-04:00 UTC")
    assert not w.contains(at("tue", "01:59"))
    assert w.contains(at("tue", "02:00"))  # start inclusive
    assert w.contains(at("tue", "03:59"))
    assert not w.contains(at("tue", "04:00"))  # end exclusive
    assert not w.contains(at("mon", "03:00")) and not w.contains(at("wed", "03:00"))
    # The same instant written in another zone is the same instant.
    assert w.contains(at("tue", "04:30", "Europe/Berlin"))  # 03:30 UTC
    assert not w.contains(at("tue", "02:30", "Europe/Berlin"))  # 01:30 UTC


def test_window_crossing_midnight_in_a_non_utc_zone():
    w = parse_window("Mon-Fri 22:00-02:00 Europe/Berlin")
    assert w.contains(at("fri", "22:00", "Europe/Berlin"))
    assert w.contains(at("fri", "23:59", "Europe/Berlin"))
    assert w.contains(at("sat", "00:00", "Europe/Berlin"))  # after midnight: Friday's window
    assert w.contains(at("sat", "01:59", "Europe/Berlin"))
    assert not w.contains(at("sat", "02:00", "Europe/Berlin"))
    assert not w.contains(at("sat", "22:30", "Europe/Berlin"))  # Saturday is not a window day
    assert not w.contains(at("mon", "01:00", "Europe/Berlin"))  # that is Sunday's night
    assert w.contains(at("tue", "01:00", "Europe/Berlin"))  # Monday's night
    assert not w.contains(at("mon", "21:59", "Europe/Berlin"))
    # Seen from UTC (Berlin is UTC+1 in January): Friday 21:00 UTC is 22:00 in Berlin.
    assert w.contains(at("fri", "21:00")) and not w.contains(at("fri", "20:59"))
    assert w.contains(at("sat", "00:30")) and not w.contains(
        at("sat", "01:00")
    )  # 01:30 / 02:00 Berlin
    # Summer time (UTC+2): Friday 2026-07-03 20:00 UTC is 22:00 in Berlin.
    assert w.contains(datetime(2026, 7, 3, 20, 0, tzinfo=UTC))
    assert not w.contains(datetime(2026, 7, 3, 19, 59, tzinfo=UTC))


def test_window_crossing_midnight_at_the_end_of_the_week():
    w = parse_window("Sun 23:00-01:00 UTC")
    assert w.contains(at("sun", "23:30"))
    assert w.contains(at("mon", "00:30"))  # Sunday's window, on Monday
    assert not w.contains(at("sun", "00:30"))  # that is Saturday's night
    assert not w.contains(at("mon", "23:30"))
    # A window ending at midnight ends with the day.
    late = parse_window("Wed 22:00-00:00 UTC")
    assert late.contains(at("wed", "23:59")) and not late.contains(at("thu", "00:00"))


def test_backoff_doubles_and_is_capped():
    base, cap = timedelta(minutes=5), timedelta(hours=1)
    assert [backoff(n, base=base, cap=cap) for n in range(7)] == [
        timedelta(minutes=5),
        timedelta(minutes=5),
        timedelta(minutes=10),
        timedelta(minutes=20),
        timedelta(minutes=40),
        timedelta(hours=1),
        timedelta(hours=1),
    ]
    assert backoff(200, base=base, cap=cap) == cap  # no overflow for a long-failing scope
    assert backoff(1, base=timedelta(hours=2), cap=cap) == cap


# ------------------------------------------------------------------------------ the world


def next_local(weekday: int, hhmm: str, tz: ZoneInfo, *, after: datetime) -> datetime:
    """The first weekday at hh:mm in ``tz`` strictly after ``after`` (returned in UTC)."""
    hh, mm = (int(x) for x in hhmm.split(":"))
    local = after.astimezone(tz)
    for offset in range(15):  # bounded: two weeks always hold one
        day = (local + timedelta(days=offset)).date()
        candidate = datetime(day.year, day.month, day.day, hh, mm, tzinfo=tz)
        if candidate.weekday() == weekday and candidate > after:
            return candidate.astimezone(UTC)
    raise AssertionError("unreachable")


@pytest.fixture
def world(tmp_path, cli):
    """A store with two clusters, `c` and `other`, each with one (local) host and its own
    emulated TA cluster (ta-tool emulator state), and a base time ``t`` a little ahead."""
    assert cli("init").exit_code == 0
    settings = load_settings()
    engine = make_engine(settings.database_url)
    factory = session_factory(engine)
    states = {}
    for name in ("c", "other"):
        ta = install_ta_tool(tmp_path / f"ta-{name}", APPS)
        states[name] = ta.state_dir
        with transaction(factory) as s:
            add_emulated_cluster(s, name, ta, host=f"ta-{name}")
    connector = local_connector(tmp_path / "ta-home")
    now = datetime.now(UTC)
    w = World(
        settings=settings,
        factory=factory,
        states=states,
        connector=connector,
        t=now.replace(microsecond=0) + timedelta(hours=2),
    )
    try:
        yield w
    finally:
        engine.dispose()


class World:
    def __init__(self, *, settings, factory, states, connector, t) -> None:
        self.settings, self.factory, self.states, self.connector, self.t = (
            settings,
            factory,
            states,
            connector,
            t,
        )

    def scheduler(self, clock, **kwargs) -> Scheduler:
        kwargs.setdefault("holder", "test-runner")
        return Scheduler(
            self.factory, settings=self.settings, connector=self.connector, clock=clock, **kwargs
        )

    def seed(self, cluster: str, apps, *, age: timedelta, now: datetime | None = None) -> None:
        """Rotate ``apps`` once through the emulator, then make their keys ``age`` old at ``now``."""
        with RotationService(self.factory, settings=self.settings, connector=self.connector) as svc:
            results = svc.rotate_many(
                cluster, [app_scope(a) for a in apps], actor="seed", concurrency=4
            )
        assert all(r.ok for r in results), [str(r.failure) for r in results]
        self.backdate(cluster, apps, (now or self.t) - age)

    def backdate(self, cluster: str, apps, created_at: datetime) -> None:
        with transaction(self.factory) as s:
            cid = clusters.get_cluster(s, name=cluster).id
            rows = s.scalars(
                select(SecretVersion)
                .join(Secret, SecretVersion.secret_id == Secret.id)
                .where(
                    Secret.cluster_id == cid,
                    Secret.scope.in_([f"app:{a}" for a in apps]),
                    SecretVersion.state == CURRENT,
                )
            ).all()
            assert len(rows) == len(list(apps))
            for row in rows:
                row.created_at = created_at

    def gens(self, cluster: str, scope: str) -> int:
        return state.generations(self.states[cluster], scope)

    def all_gens(self, cluster: str) -> dict[str, int]:
        return {s: self.gens(cluster, s) for s in ("root", *(f"app:{a}" for a in APPS))}

    def version(self, cluster: str, scope: str) -> int | None:
        with transaction(self.factory) as s:
            rows = secrets.list_current(s, cluster_name=cluster)
            return next((v.number for v in rows if v.secret.scope == scope), None)

    def check_stored(self, cluster: str, scope: str) -> None:
        with transaction(self.factory) as s:
            stored = secrets.reveal(
                open_keyring(s, settings=self.settings),
                secrets.get_version(s, cluster_name=cluster, scope=parse_scope(scope)),
            )
        valid = state.current_key(self.states[cluster], scope)
        if not valid or stored != valid:
            pytest.fail(
                f"{cluster} {scope}: keyvault has {crypto.fingerprint(stored)}, the emulator's valid key "
                f"is {crypto.fingerprint(valid) if valid else None}",
                pytrace=False,
            )

    def schedule(self, cluster: str, scope: str) -> ScopeSchedule | None:
        with transaction(self.factory) as s:
            cid = clusters.get_cluster(s, name=cluster).id
            return s.scalar(
                select(ScopeSchedule).where(
                    ScopeSchedule.cluster_id == cid, ScopeSchedule.scope == scope
                )
            )

    def rotation_count(self, cluster: str | None = None, scope: str | None = None) -> int:
        with transaction(self.factory) as s:
            stmt = select(func.count()).select_from(Rotation)
            if cluster is not None:
                stmt = stmt.where(Rotation.cluster_id == clusters.get_cluster(s, name=cluster).id)
            if scope is not None:
                stmt = stmt.where(Rotation.scope == scope)
            return s.scalar(stmt)

    def events(self, type_: str, scope: str | None = None) -> list[dict]:
        with transaction(self.factory) as s:
            stmt = select(Event).where(Event.type == type_).order_by(Event.id)
            if scope is not None:
                stmt = stmt.where(Event.scope == scope)
            return [
                json.loads(e.payload) | {"_cluster": e.cluster, "_scope": e.scope}
                for e in s.scalars(stmt)
            ]

    def lease(self) -> tuple[str | None, datetime | None]:
        with transaction(self.factory) as s:
            row = s.get(Lease, LEASE)
            return row.holder, row.expires_at


def by_scope(report) -> dict[str, object]:
    return {r.scope: r for r in report.results}


def error_line(result, code: int) -> str:
    ok(result, code)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ------------------------------------------------------------------------------ policy CLI


def test_policy_set_list_remove(world, cli):
    out = ok(
        cli(
            "policy",
            "set",
            "--cluster",
            "c",
            "--root",
            "--max-age",
            "30d",
            "--window",
            "Tue 02:00-04:00 UTC",
        )
    ).stdout
    assert "policy for root of c: rotate after 30d, within Tue 02:00-04:00 UTC" in out
    ok(cli("policy", "set", "--cluster", "c", "--appid", "app1", "--max-age", "12h"))
    ok(
        cli(
            "policy",
            "set",
            "--cluster",
            "c",
            "--all-apps",
            "--max-age",
            "2w",
            "--window",
            "Mon-Fri 22:00-02:00 Europe/Berlin",
        )
    )
    ok(cli("policy", "set", "--cluster", "other", "--all-apps", "--max-age", "90d"))
    rows = json.loads(ok(cli("policy", "list", "--json")).stdout)
    assert [(r["cluster"], r["target"], r["max_age_seconds"], r["window"]) for r in rows] == [
        ("c", "all-apps", 14 * 86400, "Mon-Fri 22:00-02:00 Europe/Berlin"),
        ("c", "app:app1", 12 * 3600, None),
        ("c", "root", 30 * 86400, "Tue 02:00-04:00 UTC"),
        ("other", "all-apps", 90 * 86400, None),
    ]
    assert rows[2]["max_age"] == "30 days, 0:00:00"
    table = ok(cli("policy", "list", "--cluster", "c")).stdout
    assert table.splitlines()[0].split() == ["CLUSTER", "TARGET", "MAX_AGE", "WINDOW"]
    assert len(table.splitlines()) == 4 and "other" not in table

    # set again replaces (one policy per target)
    ok(cli("policy", "set", "--cluster", "c", "--root", "--max-age", "7d"))
    rows = json.loads(ok(cli("policy", "list", "--cluster", "c", "--json")).stdout)
    assert [(r["target"], r["max_age_seconds"], r["window"]) for r in rows] == [
        ("all-apps", 14 * 86400, "Mon-Fri 22:00-02:00 Europe/Berlin"),
        ("app:app1", 43200, None),
        ("root", 7 * 86400, None),
    ]

    assert "removed" in ok(cli("policy", "remove", "--cluster", "c", "--appid", "app1")).stdout
    ok(cli("policy", "remove", "--cluster", "other", "--all-apps"))
    rows = json.loads(ok(cli("policy", "list", "--json")).stdout)
    assert [(r["cluster"], r["target"]) for r in rows] == [("c", "all-apps"), ("c", "root")]
    line = error_line(cli("policy", "remove", "--cluster", "c", "--appid", "app1"), 1)
    assert "no policy for app:app1 in cluster c" in line and "keyvault policy list" in line


BAD_POLICY_INPUT = [
    (["--max-age", "30d", "--window", "Tue 02:00"], "invalid window 'Tue 02:00'"),
    (
        ["--max-age", "30d", "--window", "Xyz 02:00-04:00 UTC"],
        "invalid window 'Xyz 02:00-04:00 UTC'",
    ),
    (["--max-age", "30d", "--window", "Tue 02:00-04:00 Mars/Olympus_Mons"], "invalid window"),
    (["--max-age", "30d", "--window", "Tue 03:00-03:00"], "invalid window"),
    (["--max-age", "30x"], "invalid duration '30x'"),
    (["--max-age", "0d"], "invalid duration '0d'"),
    (
        ["--max-age", "thirty days", "--window", "Tue 02:00-04:00 UTC"],
        "invalid duration 'thirty days'",
    ),
]


def test_policy_set_rejects_bad_window_and_duration(world, cli):
    for args, expected in BAD_POLICY_INPUT:
        line = error_line(cli("policy", "set", "--cluster", "c", "--all-apps", *args), 2)
        assert expected in line, line
        assert (
            "use e.g. 'Tue 02:00-04:00 UTC'" if "window" in expected else "30m, 12h, 90d, 2w"
        ) in line, line
    assert json.loads(ok(cli("policy", "list", "--json")).stdout) == []  # nothing stored


def test_policy_target_errors(world, cli):
    for targets in ([], ["--root", "--all-apps"], ["--root", "--appid", "app1"]):
        line = error_line(cli("policy", "set", "--cluster", "c", *targets, "--max-age", "30d"), 2)
        assert "give exactly one of --root, --appid APPID or --all-apps" in line, line
    line = error_line(
        cli("policy", "set", "--cluster", "c", "--appid", "a;b", "--max-age", "30d"), 2
    )
    assert "invalid APPID" in line, line
    line = error_line(cli("policy", "set", "--cluster", "nope", "--root", "--max-age", "30d"), 1)
    assert "nope" in line, line
    error_line(cli("policy", "resume", "--cluster", "c", "--root", "--appid", "app1"), 2)
    assert json.loads(ok(cli("policy", "list", "--json")).stdout) == []


# -------------------------------------------------------------------- due and not due


def test_due_scopes_are_rotated_and_the_others_untouched(world, cli):
    world.seed("c", ["app1", "app2", "app3"], age=timedelta(days=40))
    world.backdate("c", ["app3"], world.t - timedelta(days=29))  # younger than max-age
    world.seed("other", ["app1", "app2"], age=timedelta(days=400))  # no policy in that cluster
    ok(cli("cluster", "set", "c", "--project-id", "app4=4"))  # known to keyvault, no key yet
    ok(cli("policy", "set", "--cluster", "c", "--all-apps", "--max-age", "30d"))
    ok(cli("policy", "set", "--cluster", "c", "--root", "--max-age", "30d"))  # root has no key yet
    gens_c, gens_o = world.all_gens("c"), world.all_gens("other")
    versions_o = {s: world.version("other", s) for s in ("app:app1", "app:app2")}

    report = world.scheduler(Clock(world.t)).run()
    assert report.lease_acquired and report.lease_holder == "test-runner"
    results = by_scope(report)
    assert {s for s, r in results.items() if r.status == "rotated"} == {
        "root",
        "app:app1",
        "app:app2",
        "app:app4",
    }
    assert results["app:app3"].status == "skipped"
    assert (
        results["app:app3"].reason == "not due: key is 29 days, 0:00:00 old, max 30 days, 0:00:00"
    )
    assert all(
        r.cluster == "c" for r in report.results
    )  # `other` has no policy: not even considered
    assert report.count("failed") == 0 and len(report.results) == 5
    for scope in ("root", "app:app1", "app:app2", "app:app4"):
        assert world.gens("c", scope) == gens_c[scope] + 1, scope
        world.check_stored("c", scope)
        assert results[scope].new_version == (1 if scope in ("root", "app:app4") else 2)
    assert world.gens("c", "app:app3") == gens_c["app:app3"] and world.version("c", "app:app3") == 1
    assert world.all_gens("other") == gens_o
    assert {s: world.version("other", s) for s in versions_o} == versions_o
    with transaction(world.factory) as s:
        rows = s.scalars(select(Rotation).where(Rotation.actor == "scheduler")).all()
        assert sorted(r.scope for r in rows) == ["app:app1", "app:app2", "app:app4", "root"]
        assert {r.state for r in rows} == {"completed"}
    assert world.lease() == (None, None)  # given back

    # Run again at the same time: the fresh keys are not due.
    again = world.scheduler(Clock(world.t)).run()
    assert again.lease_acquired and again.count("rotated") == 0 and again.count("skipped") == 5
    assert all(r.reason.startswith("not due") for r in again.results)
    assert world.gens("c", "app:app1") == gens_c["app:app1"] + 1


def test_windows_are_respected(world, cli):
    t_in = next_local(1, "02:00", ZoneInfo("UTC"), after=world.t)  # a Tuesday, 02:00 UTC
    world.seed("c", ["app1"], age=timedelta(days=40), now=t_in - timedelta(days=2))
    ok(
        cli(
            "policy",
            "set",
            "--cluster",
            "c",
            "--appid",
            "app1",
            "--max-age",
            "30d",
            "--window",
            "Tue 02:00-04:00 UTC",
        )
    )
    gens = world.gens("c", "app:app1")
    outside = [
        t_in - timedelta(minutes=1),
        t_in - timedelta(days=1),
        t_in + timedelta(hours=2),
        t_in + timedelta(days=1, hours=1),
    ]
    for now in outside:
        report = world.scheduler(Clock(now)).run()
        [r] = report.results
        assert (r.status, r.reason) == ("skipped", "outside window Tue 02:00-04:00 UTC"), now
        assert world.gens("c", "app:app1") == gens
    assert world.rotation_count("c") == 1  # the seed only

    plan = world.scheduler(Clock(t_in + timedelta(hours=1, minutes=59))).plan()
    assert [(r.scope, r.status) for r in plan] == [("app:app1", "due")]
    report = world.scheduler(Clock(t_in)).run()
    assert [(r.scope, r.status) for r in report.results] == [("app:app1", "rotated")]
    assert world.gens("c", "app:app1") == gens + 1
    world.check_stored("c", "app:app1")


def test_window_crossing_midnight_in_a_non_utc_zone_is_respected(world, cli):
    # Friday 22:00 in Berlin starts the window; it ends Saturday 02:00 in Berlin.
    friday = next_local(4, "22:00", BERLIN, after=world.t)
    world.seed("c", ["app2"], age=timedelta(days=40), now=friday - timedelta(days=1))
    ok(
        cli(
            "policy",
            "set",
            "--cluster",
            "c",
            "--all-apps",
            "--max-age",
            "30d",
            "--window",
            "Mon-Fri 22:00-02:00 Europe/Berlin",
        )
    )
    gens = world.gens("c", "app:app2")
    for now in (
        friday - timedelta(minutes=1),  # Friday 21:59 Berlin
        friday + timedelta(hours=4),  # Saturday 02:00 Berlin: the end is exclusive
        friday + timedelta(hours=24, minutes=30),  # Saturday 22:30 Berlin: not a window day
        friday + timedelta(days=2, hours=3),
    ):  # Monday 01:00 Berlin: that is Sunday's night
        [r] = world.scheduler(Clock(now)).run().results
        assert (r.status, r.reason) == (
            "skipped",
            "outside window Mon-Fri 22:00-02:00 Europe/Berlin",
        ), now.astimezone(BERLIN)
    assert world.gens("c", "app:app2") == gens
    # Saturday 01:30 in Berlin: after midnight, still inside Friday's window.
    inside = friday + timedelta(hours=3, minutes=30)
    assert inside.astimezone(BERLIN).strftime("%a %H:%M") == "Sat 01:30"
    [r] = world.scheduler(Clock(inside)).run().results
    assert r.status == "rotated", r.reason
    assert world.gens("c", "app:app2") == gens + 1
    world.check_stored("c", "app:app2")


def test_a_specific_appid_policy_wins_over_all_apps(world, cli):
    world.seed("c", ["app1", "app2", "app3"], age=timedelta(days=45))
    ok(cli("policy", "set", "--cluster", "c", "--all-apps", "--max-age", "30d"))
    ok(cli("policy", "set", "--cluster", "c", "--appid", "app1", "--max-age", "60d"))
    ok(
        cli(
            "policy",
            "set",
            "--cluster",
            "c",
            "--appid",
            "app3",
            "--max-age",
            "30d",
            "--window",
            "Tue 02:00-04:00 UTC",
        )
    )
    gens = world.all_gens("c")
    clock = Clock(
        next_local(2, "03:00", ZoneInfo("UTC"), after=world.t)
    )  # a Wednesday: app3 outside
    world.backdate("c", ["app1", "app2", "app3"], clock.now - timedelta(days=45))
    results = by_scope(world.scheduler(clock).run())
    assert results["app:app1"].status == "skipped"
    assert (
        results["app:app1"].reason == "not due: key is 45 days, 0:00:00 old, max 60 days, 0:00:00"
    )
    assert results["app:app3"].reason == "outside window Tue 02:00-04:00 UTC"
    assert results["app:app2"].status == "rotated"
    assert (
        world.gens("c", "app:app1") == gens["app:app1"]
        and world.gens("c", "app:app3") == gens["app:app3"]
    )
    assert world.gens("c", "app:app2") == gens["app:app2"] + 1

    # Without the specific policy, all-apps applies to app1 too.
    ok(cli("policy", "remove", "--cluster", "c", "--appid", "app1"))
    results = by_scope(world.scheduler(clock).run())
    assert results["app:app1"].status == "rotated" and results["app:app2"].status == "skipped"
    assert world.gens("c", "app:app1") == gens["app:app1"] + 1
    world.check_stored("c", "app:app1")


# -------------------------------------------------------------------- backoff and pause


def test_backoff_then_pause_then_resume(world, cli):
    base, cap = timedelta(minutes=10), timedelta(minutes=30)
    world.seed("c", ["app1", "app2"], age=timedelta(days=40))
    ok(cli("policy", "set", "--cluster", "c", "--appid", "app1", "--max-age", "30d"))
    state.set_noise(world.states["c"], fail_apps=["app1"])
    gens = world.gens("c", "app:app1")
    t0 = world.t
    clock = Clock(t0)
    sched = world.scheduler(clock, backoff_base=base, backoff_cap=cap, max_failures=4)

    def run_once(now) -> object:
        clock.now = now
        [r] = sched.run().results
        return r

    # 1st failure: backoff base.
    r = run_once(t0)
    assert r.status == "failed" and "ta-tool failed" in r.reason and r.rotation_id, r
    row = world.schedule("c", "app:app1")
    assert (row.consecutive_failures, row.next_attempt_at, row.paused_at) == (1, t0 + base, None)
    assert "ta-tool failed" in row.last_error
    # Half-way through the backoff: not even tried.
    rotations = world.rotation_count("c", "app:app1")
    r = run_once(t0 + base / 2)
    assert r.status == "skipped" and r.reason.startswith("backing off after 1 failure(s) until "), (
        r.reason
    )
    assert (t0 + base).isoformat() in r.reason
    assert world.rotation_count("c", "app:app1") == rotations
    # At the end of the backoff: tried again, backoff doubled.
    r = run_once(t0 + base)
    assert r.status == "failed"
    row = world.schedule("c", "app:app1")
    assert (row.consecutive_failures, row.next_attempt_at) == (2, t0 + base + 2 * base)
    # 3rd failure: 4·base would be 40 min, capped at 30.
    t3 = t0 + 3 * base
    assert run_once(t3).status == "failed"
    row = world.schedule("c", "app:app1")
    assert (row.consecutive_failures, row.next_attempt_at, row.paused_at) == (3, t3 + cap, None)
    # 4th consecutive failure: paused.
    t4 = t3 + cap
    assert run_once(t4 - timedelta(seconds=1)).status == "skipped"
    assert run_once(t4).status == "failed"
    row = world.schedule("c", "app:app1")
    assert (row.consecutive_failures, row.paused_at) == (4, t4)
    rotations = world.rotation_count("c", "app:app1")
    assert rotations == 1 + 4  # the seed, then four tries
    # Paused: no more tries however long one waits, even with the fault gone.
    state.clear_noise(world.states["c"])
    for later in (t4 + cap, t4 + timedelta(days=3)):
        r = run_once(later)
        assert r.status == "skipped" and r.reason.startswith(
            "paused after 4 consecutive failures"
        ), r.reason
        assert "keyvault policy resume --cluster c" in r.reason
    assert world.rotation_count("c", "app:app1") == rotations
    assert world.gens("c", "app:app1") == gens  # ta-tool never generated anything

    failed = world.events("rotation.failed", "app:app1")
    assert len(failed) == 4 and all(e["_cluster"] == "c" and e["state"] == "failed" for e in failed)
    [paused] = world.events("rotation.paused", "app:app1")
    assert paused["consecutive_failures"] == 4 and paused["source"] == "scheduler"
    assert "ta-tool failed" in paused["error"]
    assert world.events("rotation.paused", "app:app2") == []  # app2 has no policy: never touched

    out = ok(cli("policy", "resume", "--cluster", "c", "--appid", "app1")).stdout
    assert "resumed 1 scope(s) of c" in out
    row = world.schedule("c", "app:app1")
    assert (row.consecutive_failures, row.next_attempt_at, row.paused_at) == (0, None, None)
    r = run_once(t4 + timedelta(days=3))
    assert r.status == "rotated", r.reason
    assert world.gens("c", "app:app1") == gens + 1
    world.check_stored("c", "app:app1")
    row = world.schedule("c", "app:app1")
    assert (row.consecutive_failures, row.next_attempt_at, row.paused_at, row.last_error) == (
        0,
        None,
        None,
        None,
    )


def test_a_success_resets_the_failure_count(world, cli):
    world.seed("c", ["app1"], age=timedelta(days=40))
    ok(cli("policy", "set", "--cluster", "c", "--appid", "app1", "--max-age", "30d"))
    state.set_noise(world.states["c"], fail_apps=["app1"])
    clock = Clock(world.t)
    sched = world.scheduler(clock, backoff_base=timedelta(minutes=5), max_failures=2)
    assert sched.run().results[0].status == "failed"
    state.clear_noise(world.states["c"])
    clock.now = world.t + timedelta(minutes=5)
    assert sched.run().results[0].status == "rotated"
    row = world.schedule("c", "app:app1")
    assert (row.consecutive_failures, row.next_attempt_at, row.paused_at) == (0, None, None)
    assert world.events("rotation.paused") == []


def test_a_failure_before_the_journal_still_raises_rotation_failed(world, cli):
    """A host that cannot be reached: no rotation row, so the scheduler writes the event."""
    world.seed("other", ["app1"], age=timedelta(days=40))
    ok(cli("policy", "set", "--cluster", "other", "--appid", "app1", "--max-age", "30d"))
    world.connector.unreachable = frozenset({"ta-other"})
    rotations = world.rotation_count("other")
    [r] = world.scheduler(Clock(world.t), max_failures=1).run().results
    assert (
        r.status == "failed" and "cannot connect to ta-other" in r.reason and r.rotation_id is None
    )
    assert world.rotation_count("other") == rotations
    [event] = world.events("rotation.failed", "app:app1")
    assert (
        event["source"] == "scheduler"
        and event["_cluster"] == "other"
        and event["rotation_id"] is None
    )
    assert len(world.events("rotation.paused", "app:app1")) == 1  # max_failures=1


def test_resume_every_scope_of_a_cluster(world, cli):
    world.seed("c", ["app1", "app2"], age=timedelta(days=40))
    ok(cli("policy", "set", "--cluster", "c", "--all-apps", "--max-age", "30d"))
    state.set_noise(world.states["c"], fail_apps=["app1", "app2"])
    report = world.scheduler(Clock(world.t), max_failures=1).run()
    assert report.count("failed") == 2 and len(world.events("rotation.paused")) == 2
    state.clear_noise(world.states["c"])
    assert "resumed 2 scope(s) of c" in ok(cli("policy", "resume", "--cluster", "c")).stdout
    report = world.scheduler(Clock(world.t + timedelta(minutes=1))).run()
    assert report.count("rotated") == 2


# ------------------------------------------------------------------------------ dry run


def test_dry_run_rotates_nothing(world, cli):
    world.seed("c", ["app1", "app2"], age=timedelta(days=40))
    world.backdate("c", ["app2"], world.t - timedelta(days=1))
    ok(cli("policy", "set", "--cluster", "c", "--all-apps", "--max-age", "30d"))
    gens, rotations = world.all_gens("c"), world.rotation_count()

    report = world.scheduler(Clock(world.t)).run(dry_run=True)
    assert not report.lease_acquired and report.lease_holder is None
    assert [(r.scope, r.status) for r in report.results] == [
        ("app:app1", "due"),
        ("app:app2", "skipped"),
    ]
    # The CLI (real time: app1's key is still more than 30 days old).
    out = json.loads(ok(cli("rotate", "due", "--dry-run", "--json")).stdout)
    assert out["lease"] == "not needed" and out["holder"] is None
    assert [(r["scope"], r["status"]) for r in out["results"]] == [
        ("app:app1", "due"),
        ("app:app2", "skipped"),
    ]
    text = ok(cli("rotate", "due", "--dry-run")).stdout
    assert "app:app1" in text and " due " in text and "summary" not in text
    assert world.all_gens("c") == gens and world.rotation_count() == rotations
    assert world.schedule("c", "app:app1") is None and world.lease() == (None, None)


def test_rotate_due_without_policies(world, cli):
    out = json.loads(ok(cli("rotate", "due", "--json")).stdout)
    assert out == {"lease": "acquired", "holder": out["holder"], "results": []}
    assert "no scope has a rotation policy" in ok(cli("rotate", "due")).stdout
    assert world.lease() == (None, None)


# --------------------------------------------------------------------------------- lease


def test_the_lease_lets_one_runner_act(world, cli):
    world.seed("c", ["app1"], age=timedelta(days=40))
    ok(cli("policy", "set", "--cluster", "c", "--appid", "app1", "--max-age", "30d"))
    gens, t = world.gens("c", "app:app1"), world.t
    ttl = timedelta(minutes=10)
    assert acquire_lease(world.factory, holder="runner-a", now=t, ttl=ttl) is None
    assert world.lease() == ("runner-a", t + ttl)

    b = world.scheduler(Clock(t + timedelta(minutes=5)), holder="runner-b")
    report = b.run()
    assert not report.lease_acquired and report.results == []
    assert report.lease_holder == f"runner-a until {(t + ttl).isoformat()}"
    assert world.gens("c", "app:app1") == gens and world.rotation_count("c") == 1
    assert world.lease() == ("runner-a", t + ttl)  # b did not touch a's lease
    # Taking it directly is refused the same way; a's own renewal works.
    assert acquire_lease(
        world.factory, holder="runner-b", now=t + ttl - timedelta(seconds=1), ttl=ttl
    ).startswith("runner-a until ")
    assert (
        acquire_lease(world.factory, holder="runner-a", now=t + timedelta(minutes=1), ttl=ttl)
        is None
    )
    assert world.lease() == ("runner-a", t + timedelta(minutes=1) + ttl)

    # The CLI (real time, well before the lease expires) says so and exits 0.
    assert (
        acquire_lease(
            world.factory, holder="runner-a", now=datetime.now(UTC), ttl=timedelta(hours=1)
        )
        is None
    )
    result = ok(cli("rotate", "due", "--json"))
    out = json.loads(result.stdout)
    assert (
        out["lease"] == "held elsewhere"
        and out["holder"].startswith("runner-a until ")
        and out["results"] == []
    )
    assert (
        "another runner holds the rotation lease (runner-a until "
        in ok(cli("rotate", "due")).stdout
    )
    assert world.gens("c", "app:app1") == gens
    holder, expires = world.lease()
    assert holder == "runner-a"

    # Runner a died: once its lease expired, b takes over.
    b.clock = Clock(expires)
    report = b.run()
    assert report.lease_acquired and report.lease_holder == "runner-b"
    assert [(r.scope, r.status) for r in report.results] == [("app:app1", "rotated")]
    assert world.gens("c", "app:app1") == gens + 1
    world.check_stored("c", "app:app1")
    assert world.lease() == (None, None)  # released after the run


def test_two_schedulers_in_threads_rotate_each_scope_once(world, cli):
    """Two runners at the same instant: the lease admits one; every due scope rotates once."""
    import threading

    world.seed("c", APPS, age=timedelta(days=40))
    ok(cli("policy", "set", "--cluster", "c", "--all-apps", "--max-age", "30d"))
    gens = world.all_gens("c")
    reports, barrier = {}, threading.Barrier(2, timeout=TIMEOUT)

    def runner(name):
        sched = world.scheduler(Clock(world.t), holder=name)
        barrier.wait()
        reports[name] = sched.run()

    threads = [threading.Thread(target=runner, args=(n,)) for n in ("r1", "r2")]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT)
    assert not any(th.is_alive() for th in threads) and len(reports) == 2
    rotated = [r.scope for rep in reports.values() for r in rep.results if r.status == "rotated"]
    assert sorted(rotated) == [f"app:{a}" for a in APPS]
    for a in APPS:
        assert world.gens("c", f"app:{a}") == gens[f"app:{a}"] + 1
        world.check_stored("c", f"app:{a}")
    assert sum(1 for rep in reports.values() if rep.count("rotated")) == 1


def test_the_serve_scheduler_thread_rotates_due_scopes_when_poked_and_stops(world, cli):
    """`serve --scheduler` runs SchedulerThread; here with the connector and clock injected."""
    import queue

    from keyvault.services.scheduler import SchedulerThread

    world.seed("c", ["app1", "app2"], age=timedelta(days=40))
    world.backdate("c", ["app2"], world.t - timedelta(days=1))
    ok(cli("policy", "set", "--cluster", "c", "--all-apps", "--max-age", "30d"))
    gens = world.all_gens("c")
    runs: queue.Queue = queue.Queue()
    # An hour's interval: only poke() makes it run, so nothing here depends on timing.
    thread = SchedulerThread(
        world.factory,
        settings=world.settings,
        interval=3600,
        clock=Clock(world.t),
        connector=world.connector,
        on_run=runs.put,
    )
    thread.start()
    try:
        thread.poke()
        report = runs.get(timeout=TIMEOUT)  # a bound on a hang, not a synchronisation sleep
        assert not isinstance(report, Exception), report
        results = by_scope(report)
        assert results["app:app1"].status == "rotated" and results["app:app2"].status == "skipped"
        assert world.gens("c", "app:app1") == gens["app:app1"] + 1
        assert world.gens("c", "app:app2") == gens["app:app2"]
        world.check_stored("c", "app:app1")
        thread.poke()
        again = runs.get(timeout=TIMEOUT)
        assert again.count("rotated") == 0 and world.gens("c", "app:app1") == gens["app:app1"] + 1
    finally:
        assert thread.stop(timeout=TIMEOUT)
    assert runs.empty()  # stopping runs nothing more
