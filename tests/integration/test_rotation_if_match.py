"""``If-Match`` on a rotation (issue 11): the precondition the HTTP route hands the rotation
service is checked once the rotation holds its scope (the journal row), on SQLite and
PostgreSQL, with the local transport and the ta-tool emulator.

The interleavings that matter, each made deterministic with the service's ``on_step`` hook
(no sleeps): a second request while the first runs (409, nothing rotated), a second request
right after the first stored its key (412, nothing rotated), a retry (412); then a burst of
concurrent requests expecting the same version: exactly one rotates.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select, text

from keyvault.config import load_settings
from keyvault.db import make_engine, session_factory, transaction
from keyvault.errors import KeyvaultError, PreconditionFailed, RotationUnresolved
from keyvault.http.headers import if_match
from keyvault.http.routers.rotations import precondition_of
from keyvault.models import Rotation
from keyvault.sandbox import state
from keyvault.scope import app_scope
from keyvault.services import secrets
from keyvault.services.rotation import RotationService
from keyvault.services.store import open_keyring
from tests.support.cluster import add_emulated_cluster, install_ta_tool, local_connector
from tests.support.timeouts import TIMEOUT

SCOPE = app_scope("app1")


@pytest.fixture
def world(tmp_path, cli):
    """An initialised store, cluster ``c`` with one host and a local emulated ta-tool."""
    assert cli("init").exit_code == 0
    ta = install_ta_tool(tmp_path / "ta-c", ["app1"])
    settings = load_settings()
    engine = make_engine(settings.database_url)
    factory = session_factory(engine)
    with transaction(factory) as s:
        add_emulated_cluster(s, "c", ta, host="ta-a")
    yield {
        "settings": settings,
        "factory": factory,
        "state": ta.state_dir,
        "connector": local_connector(tmp_path / "ta-home"),
    }
    engine.dispose()


def service(world, **kwargs) -> RotationService:
    return RotationService(
        world["factory"], settings=world["settings"], connector=world["connector"], **kwargs
    )


def expecting(header: str):
    """The precondition the route builds for ``If-Match: header``."""
    condition = if_match([header])
    assert condition is not None
    return precondition_of(condition)


def rotate(world, header: str | None = None, **kwargs):
    with service(world, **kwargs) as svc:
        precondition = None if header is None else expecting(header)
        return svc.rotate("c", SCOPE, actor="t", precondition=precondition)


def current(world) -> tuple[int, bool]:
    """The stored current version, and whether its key is the one TA accepts."""
    with transaction(world["factory"]) as s:
        version = secrets.get_version(s, cluster_name="c", scope=SCOPE)
        key = secrets.reveal(open_keyring(s, settings=world["settings"]), version)
        return version.number, key == state.current_key(world["state"], str(SCOPE))


def rotation_rows(world) -> int:
    with transaction(world["factory"]) as s:
        return s.scalar(select(func.count()).select_from(Rotation))


def test_if_match_rotates_only_the_version_named_and_a_retry_rotates_nothing(world):
    with pytest.raises(PreconditionFailed) as none_yet:
        rotate(world, "*")  # `*`: there must be a current version
    assert "no current key" in str(none_yet.value)
    assert (rotation_rows(world), state.generations(world["state"])) == (0, 0)

    assert rotate(world).new_version == 1
    assert rotate(world, '"v1"').new_version == 2
    generated = state.generations(world["state"])
    for stale in ('"v1"', '"v1", "v3"', 'W/"v2"', '"something-else"'):  # W/: strong comparison
        with pytest.raises(PreconditionFailed) as refused:
            rotate(world, stale)
        assert refused.value.http_status == 412 and "the current is v2" in str(refused.value)
    # Nothing ran ta-tool, nothing was journaled: the key TA accepts is still the stored v2.
    assert state.generations(world["state"]) == generated
    assert rotation_rows(world) == 2
    assert current(world) == (2, True)
    assert rotate(world, '"v0", "v2"').new_version == 3  # a list: any of them
    assert rotate(world, "*").new_version == 4


@pytest.mark.parametrize(
    ("step", "refusal"),
    [
        ("generated", RotationUnresolved),  # the first holds the scope: ta-tool has run
        ("stored", PreconditionFailed),  # committed: the scope is free again, v1 is gone
    ],
)
def test_a_second_request_during_or_right_after_the_first_rotates_nothing(world, step, refusal):
    rotate(world)  # v1
    second: list[BaseException] = []

    def meanwhile(at: str, rid: str) -> None:
        if at == step and not second:
            try:
                rotate(world, '"v1"')
            except KeyvaultError as exc:
                second.append(exc)

    assert rotate(world, '"v1"', on_step=meanwhile).new_version == 2
    assert len(second) == 1 and isinstance(second[0], refusal)
    assert current(world) == (2, True)
    assert state.generations(world["state"]) == 2


def test_concurrent_requests_expecting_the_same_version_rotate_once(world):
    rotate(world)  # v1
    callers = 4
    start = threading.Barrier(callers, timeout=TIMEOUT)

    def one(_: int) -> str:
        start.wait()  # all at once
        try:
            rotate(world, '"v1"')
        except (PreconditionFailed, RotationUnresolved) as exc:
            return exc.code
        return "rotated"

    with ThreadPoolExecutor(callers) as pool:
        outcomes = list(pool.map(one, range(callers)))
    assert outcomes.count("rotated") == 1, outcomes
    assert set(outcomes) <= {"rotated", "precondition_failed", "rotation_unresolved"}
    assert current(world) == (2, True)
    assert state.generations(world["state"]) == 2


def waiting_for_a_lock(world) -> bool:
    """True if a session of this PostgreSQL database waits for a lock (A behind B's row)."""
    with world["factory"]() as s:
        return bool(
            s.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
        )


# On SQLite the journal row and the check are one BEGIN IMMEDIATE transaction (writers take
# turns whole), so a request could only wait for B here (the 30 s busy timeout): the burst
# above covers SQLite; the interleaving below is PostgreSQL's, where writers overlap.
@pytest.mark.parametrize("blank_database", ["postgres"], indirect=True)
def test_the_check_is_made_once_the_scope_is_held_not_before(world):
    """B checks If-Match: "v1" and is held inside its check while A rotates. A check made
    before B's journal row would let A rotate meanwhile (the scope is free) and then B
    rotate again on a stale check: the key A made would die. Made under B's row, the scope
    is B's while it checks: A is refused (409) and exactly one rotation happens."""
    rotate(world)  # v1
    b_checking, a_done = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}
    check = expecting('"v1"')

    def b_precondition(current: int | None) -> None:
        b_checking.set()
        # The window a check outside the scope's lock would leave open: wait until A is done,
        # or blocked behind B's row (then B must go on for either to finish).
        deadline = time.monotonic() + TIMEOUT
        while not a_done.wait(0.02) and not waiting_for_a_lock(world):
            assert time.monotonic() < deadline, "A neither finished nor waited for B"
        check(current)

    def request_b() -> None:
        try:
            with service(world) as svc:
                rotated = svc.rotate("c", SCOPE, actor="t", precondition=b_precondition)
                outcome["b"] = rotated.new_version
        except KeyvaultError as exc:
            outcome["b"] = exc.code
        finally:
            b_checking.set()

    b = threading.Thread(target=request_b)
    b.start()
    try:
        assert b_checking.wait(TIMEOUT)
        try:
            outcome["a"] = rotate(world, '"v1"').new_version
        except KeyvaultError as exc:
            outcome["a"] = exc.code
    finally:
        a_done.set()
        b.join(TIMEOUT)
    assert outcome == {"a": "rotation_unresolved", "b": 2}
    assert current(world) == (2, True)
    assert state.generations(world["state"]) == 2
