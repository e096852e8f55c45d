"""The fault loops (issue 10): kill -9 and a database that goes away, at random moments of
real rotations over the test sshd, on SQLite and PostgreSQL; every generated key ends in
history and the current key is the emulator's (see tests/support/faultloop.py).

CI runs a few rounds per database and fault class; the long runs (hundreds of rounds)
use the same loop: ``make faultloop`` or ``python -m tests.support.faultloop``.

    KEYVAULT_FAULTLOOP_ROUNDS  rounds per test (default 8)
    KEYVAULT_FAULTLOOP_SEED    the seed (default fixed; "random" draws one, printed)
    KEYVAULT_FAULTLOOP_FIRST   the first round (a failure names the one to replay)
"""

from __future__ import annotations

import os
import random

import pytest

from tests.support.faultloop import DB_FAULTS, KILL_FAULTS, FaultLoop, LoopFailure, Store

DEFAULT_ROUNDS = 8
DEFAULT_SEED = 20261203

pytestmark = pytest.mark.slow


def _seed() -> int:
    raw = os.environ.get("KEYVAULT_FAULTLOOP_SEED", "").strip()
    if raw == "random":
        return random.SystemRandom().randrange(1 << 32)
    return int(raw) if raw else DEFAULT_SEED


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
