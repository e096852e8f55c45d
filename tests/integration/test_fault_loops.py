"""The fault loops (issue 10): kill -9 and a database that goes away, at random moments of
real rotations over the test sshd, on SQLite and PostgreSQL; every generated key ends in
history and the current key is the emulator's (see tests/support/faultloop.py).

CI runs a few rounds per database and fault class; the long runs (hundreds of rounds)
use the same loop: ``make faultloop`` or ``python -m tests.support.faultloop``. The default
seed is one whose first five rounds place the fault once at each step (``STEPS``: the spawn,
journaled, generated, sealed, stored), at each scope kind, twice paused at the hook and,
for the database faults, both faults of each backend: five rounds that differ, where eight
rounds of an arbitrary seed repeated some moments (each round costs seconds of real SSH).

    KEYVAULT_FAULTLOOP_ROUNDS  rounds per test (default 5)
    KEYVAULT_FAULTLOOP_SEED    the seed (default fixed; "random" draws one, printed)
    KEYVAULT_FAULTLOOP_FIRST   the first round (a failure names the one to replay)
"""

from __future__ import annotations

import os
import random

import pytest

from tests.support.faultloop import (
    DB_FAULTS,
    KILL_FAULTS,
    STEPS,
    FaultLoop,
    LoopFailure,
    Plan,
    Store,
)

DEFAULT_ROUNDS = 5
DEFAULT_SEED = 20261216  # its rounds 0-4 cover every step (test_the_default_rounds_...)

pytestmark = pytest.mark.slow


def _seed() -> int:
    raw = os.environ.get("KEYVAULT_FAULTLOOP_SEED", "").strip()
    if raw == "random":
        return random.SystemRandom().randrange(1 << 32)
    return int(raw) if raw else DEFAULT_SEED


@pytest.mark.parametrize("faults", [KILL_FAULTS, *DB_FAULTS.values()])
def test_the_default_rounds_place_every_fault_at_every_step(faults):
    """The few CI rounds stay meaningful: with the default seed they cover every step, both
    paused and not, every fault of the class and root and app scopes."""
    scopes = ["root", "app:one", "app:two"]  # as FaultLoop: root and two apps
    plans = [Plan.draw(DEFAULT_SEED, n, scopes, faults) for n in range(DEFAULT_ROUNDS)]
    assert {p.step for p in plans} == set(STEPS), plans
    assert {p.fault for p in plans} == set(faults), plans
    assert {p.paused for p in plans} == {True, False}, plans
    assert {p.scope for p in plans} == set(scopes), plans


@pytest.fixture(scope="module")
def openapi_url(sshd_env):
    from keyvault.sandbox.openapi import serving

    with serving(sshd_env.tatool_state_dir) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize("fault_class", ["kill9", "db"])
def test_fault_loop(fault_class, blank_database, sshd_env, ta_sim, openapi_url, tmp_path, capsys):
    db = blank_database
    store = Store(db.backend, db.url, tmp_path / "home", db.name, db.server_url)
    faults = KILL_FAULTS if fault_class == "kill9" else DB_FAULTS[db.backend]
    seed = _seed()
    rounds = int(os.environ.get("KEYVAULT_FAULTLOOP_ROUNDS") or DEFAULT_ROUNDS)
    first = int(os.environ.get("KEYVAULT_FAULTLOOP_FIRST") or 0)
    loop = FaultLoop(
        store,
        sshd_env,
        api_url=openapi_url,
        seed=seed,
        faults=faults,
        tag=f"ci-{db.backend}-{fault_class}",  # APPIDs of their own: no other loop moves their keys
    )
    try:
        loop.setup()
        loop.run(range(first, first + rounds))
    except LoopFailure as exc:
        pytest.fail(f"{exc} (summary so far: {loop.tally.summary()})", pytrace=False)
    summary = loop.tally.summary()
    with capsys.disabled():
        print(f"\nfault loop {db.backend}/{fault_class} seed {seed}: {summary}")
    assert summary["rounds"] == rounds
    assert summary["landed"], f"no fault landed in {rounds} rounds (seed {seed}): {summary}"
