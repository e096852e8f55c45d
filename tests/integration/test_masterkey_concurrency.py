"""No key is lost to a `master-key rotate` that overlaps a writer, on SQLite and PostgreSQL.

Each writer (a rotation with the local emulated cluster, an import, a spooled store, a
second `master-key rotate`) is held at one point by an injected hook while a
`master-key rotate` runs, in this thread or another; afterwards the stored key is the one
ta-tool generated (or the one imported), sealed under the live master key, and the keyring
file holds the live key and no key nothing needs.

Synchronisation is by events with a bound (TIMEOUT), never by sleeping. On SQLite every
transaction takes the write lock (BEGIN IMMEDIATE), so a side that holds a transaction open
never waits for the other side to reach a point that needs the database.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import select, text

from keyvault import crypto
from keyvault.config import Settings, load_settings
from keyvault.db import make_engine, session_factory, transaction
from keyvault.errors import Conflict, MasterKeyLocked, StoreFailed, WrongMasterKey
from keyvault.models import MasterKey, SecretVersion
from keyvault.sandbox import state
from keyvault.scope import app_scope
from keyvault.services import clusters, integrity, masterkeys, secrets, spool
from keyvault.services.rotation import RotationService
from keyvault.services.store import open_keyring
from tests.support.cli import KEYVAULT, describe, expect, proc_describe, run_keyvault, spawn_process
from tests.support.cluster import add_emulated_cluster, install_ta_tool, local_connector
from tests.support.leak_guard import new_key
from tests.support.timeouts import TIMEOUT

SCOPE = app_scope("app1")


@pytest.fixture
def world(tmp_path, cli, database):
    """An initialised store, cluster `c` with one host and a local emulated ta-tool."""
    expect(cli("init"))
    ta = install_ta_tool(tmp_path / "ta-c", ["app1", "app2"])
    settings = load_settings()
    engine = make_engine(settings.database_url)
    factory = session_factory(engine)
    with transaction(factory) as s:
        add_emulated_cluster(s, "c", ta, host="ta-a")
    yield {
        "settings": settings,
        "factory": factory,
        "engine": engine,
        "state": ta.state_dir,
        "connector": local_connector(tmp_path / "ta-home"),
        "postgres": database.is_postgres,
        "cli": cli,
    }
    engine.dispose()


def service(world, on_step: Callable[[str, str], None]) -> RotationService:
    return RotationService(
        world["factory"], settings=world["settings"], connector=world["connector"], on_step=on_step
    )


def rotate_master_key(world, settings: Settings | None = None, **kwargs: Any):
    return masterkeys.rotate_master_key(
        world["factory"], settings=settings or world["settings"], **kwargs
    )


class Worker(threading.Thread):
    """A thread that keeps its function's result or exception for the test to inspect."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - reported by outcome()
            self.error = exc

    def outcome(self) -> Any:
        self.join(TIMEOUT)
        assert not self.is_alive(), "the worker did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def rotate_master_key_worker(world) -> tuple[Worker, threading.Event]:
    """A `master-key rotate` to start in a thread, and the event set once it wrote the grown
    keyring file (step 1)."""
    grown = threading.Event()
    worker = Worker(
        lambda: rotate_master_key(
            world, on_step=lambda step: grown.set() if step == "grown" else None
        )
    )
    return worker, grown


def wait(event: threading.Event, what: str) -> None:
    assert event.wait(TIMEOUT), f"timed out waiting for {what}"


def live_key_id(world) -> str:
    with transaction(world["factory"]) as s:
        return s.scalars(select(MasterKey.id).where(MasterKey.retired_at.is_(None))).one()


def assert_sound(world, keys: dict[str, str]) -> None:
    """Every key readable through the CLI, every row under the live key, which the file holds
    alone; every other master key retired."""
    live = live_key_id(world)
    on_file = crypto.load_keyring(world["settings"].master_key_file)
    assert set(on_file.keys) == {live} and on_file.active == live
    with transaction(world["factory"]) as s:
        assert set(s.scalars(select(SecretVersion.master_key_id))) == {live}
        assert all(r.retired_at is not None for r in s.scalars(select(MasterKey)) if r.id != live)
        # Row MACs (cluster c, its host, what a test added) moved with it and verify.
        for model in integrity.MAC_MODELS:
            assert set(s.scalars(select(model.mac_key_id))) <= {live}, model.__tablename__
        assert integrity.problems(s, keyring=open_keyring(s, settings=world["settings"])) == []
    for appid, key in keys.items():
        shown = world["cli"]("secrets", "show", "--cluster", "c", "--appid", appid, "--reveal")
        assert shown.exit_code == 0, describe(shown)
        assert shown.stdout == key + "\n", f"the key of {appid} is not the one stored"


def generated(world) -> str:
    return state.current_key(world["state"], str(SCOPE))


# -- (1) a rotation's store step held while `master-key rotate` runs -------------------------
def test_rotation_with_a_keyring_loaded_before_a_whole_master_key_rotate(world):
    """The reported bug: the rotation loaded the keyring at its start; `master-key rotate`
    ran to the end while ta-tool worked; the store must not seal under the removed key."""
    rotated: list[masterkeys.MasterKeyRotation] = []

    def hold(step: str, rid: str) -> None:
        if step == "generated":
            rotated.append(rotate_master_key(world))

    outcome = service(world, hold).rotate("c", SCOPE, actor="t")
    assert outcome.state == "completed" and rotated and rotated[0].kept == {}
    assert rotated[0].new_id == live_key_id(world)
    assert_sound(world, {"app1": generated(world)})


def test_rotation_stores_while_master_key_rotate_holds_its_rewrap_transaction(world):
    """`master-key rotate` has locked the live key (step 2) when the rotation starts its
    store: the store waits for it and seals under the new key."""
    locked, storing = threading.Event(), threading.Event()
    worker: list[Worker] = []

    def in_step_two(step: str) -> None:
        if step == "locked":
            locked.set()
            wait(storing, "the rotation to reach its store")

    def hold(step: str, rid: str) -> None:
        if step == "generated":
            worker.append(Worker(lambda: rotate_master_key(world, on_step=in_step_two)))
            worker[0].start()
            wait(locked, "master-key rotate to lock the live key")
            storing.set()  # the store below now waits for the re-wrap to commit

    outcome = service(world, hold).rotate("c", SCOPE, actor="t")
    result = worker[0].outcome()
    assert outcome.state == "completed" and result.kept == {}
    assert_sound(world, {"app1": generated(world)})


def test_rotation_sealed_and_not_committed_while_master_key_rotate_starts(world):
    """The version is sealed and flushed, not committed, when `master-key rotate` starts:
    the re-wrap waits for the commit (PostgreSQL row lock, SQLite write lock) and re-wraps it."""
    grown = threading.Event()
    worker: list[Worker] = []

    def hold(step: str, rid: str) -> None:
        if step == "sealed":
            worker.append(Worker(lambda: rotate_master_key(world, on_step=on_mk_step)))
            worker[0].start()
            if world["postgres"]:  # SQLite: its first transaction waits for this commit
                wait(grown, "master-key rotate to write the grown keyring")

    def on_mk_step(step: str) -> None:
        if step == "grown":
            grown.set()

    outcome = service(world, hold).rotate("c", SCOPE, actor="t")
    worker[0].outcome()
    assert outcome.state == "completed"
    assert_sound(world, {"app1": generated(world)})


@pytest.mark.slow
@pytest.mark.parametrize("step", ["generated", "sealed"])
def test_rotation_overlapping_a_master_key_rotate_process(world, step):
    """The issue's reproduction with a real `keyvault master-key rotate` process: run to the
    end while the rotation waits for ta-tool ("generated"), or started while the rotation's
    store transaction is open ("sealed"; it finishes after the commit)."""
    started: list = []

    def hold(at: str, rid: str) -> None:
        if at == step == "generated":
            done = run_keyvault("master-key", "rotate", "--yes")
            assert done.returncode == 0, proc_describe(done)
        elif at == step:
            started.append(spawn_process([*KEYVAULT, "master-key", "rotate", "--yes"]))

    outcome = service(world, hold).rotate("c", SCOPE, actor="t")
    for proc in started:
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
    assert outcome.state == "completed"
    assert_sound(world, {"app1": generated(world)})


# -- (2) imports ------------------------------------------------------------------------------
def test_import_with_a_keyring_loaded_before_a_master_key_rotate(world):
    key = new_key()
    with transaction(world["factory"]) as s:
        stale = open_keyring(s, settings=world["settings"])
    rotate_master_key(world)
    with transaction(world["factory"]) as s:
        stored = secrets.import_key(
            s, keyring=stale, cluster_name="c", scope=SCOPE, key=key, actor="t", any_format=True
        )
    assert stored.number == 1
    assert_sound(world, {"app1": key})


def test_import_sealed_and_not_committed_while_master_key_rotate_starts(world):
    before, racing = new_key(), new_key()
    expect(world["cli"]("import", "--cluster", "c", "--appid", "app2", input=before))
    worker, grown = rotate_master_key_worker(world)
    session = world["factory"]()
    try:
        keyring = open_keyring(session, settings=world["settings"])
        secrets.import_key(
            session, keyring=keyring, cluster_name="c", scope=SCOPE, key=racing, actor="t"
        )
        session.flush()
        worker.start()
        if world["postgres"]:
            wait(grown, "master-key rotate to write the grown keyring")
        session.commit()
    finally:
        session.close()
    worker.outcome()
    assert_sound(world, {"app1": racing, "app2": before})


def test_a_cluster_change_macd_and_not_committed_while_master_key_rotate_starts(world):
    """A writer that MACed a row under the live key and has not committed when `master-key
    rotate` starts: the rotate waits for it (the live key is share-locked) and re-MACs it."""
    key = new_key()
    expect(world["cli"]("import", "--cluster", "c", "--appid", "app1", input=key))
    worker, grown = rotate_master_key_worker(world)
    session = world["factory"]()
    try:
        keyring = open_keyring(session, settings=world["settings"])
        clusters.set_options(session, keyring=keyring, name="c", login_name="racing")
        worker.start()
        if world["postgres"]:
            wait(grown, "master-key rotate to write the grown keyring")
        session.commit()
    finally:
        session.close()
    worker.outcome()
    assert_sound(world, {"app1": key})
    with transaction(world["factory"]) as s:
        assert clusters.cluster_options(clusters.get_cluster(s, name="c"))["login_name"] == "racing"


# -- (3) two `master-key rotate` at once ------------------------------------------------------
def test_a_second_master_key_rotate_on_the_same_keyring_file_is_refused(world):
    key = new_key()
    expect(world["cli"]("import", "--cluster", "c", "--appid", "app1", input=key))
    refused: list[BaseException] = []

    def stall(step: str) -> None:
        if step == "grown":  # between steps 1 and 2: the file holds old and new key
            with pytest.raises(MasterKeyLocked) as info:
                rotate_master_key(world)
            refused.append(info.value)

    winner = rotate_master_key(world, on_step=stall)
    assert refused and "lock" in str(refused[0]) and "master-key rotate" in str(refused[0])
    assert winner.new_id == live_key_id(world)
    assert_sound(world, {"app1": key})
    # The CLI says it in one line and exits non-zero.
    path = world["settings"].master_key_file
    with crypto.keyring_file_lock(path, exclusive=False):
        result = world["cli"]("master-key", "rotate", "--yes")
    assert result.exit_code == 1 and result.stderr.startswith(
        "error: the master key file is in use"
    )
    assert_sound(world, {"app1": key})


def test_master_key_rotate_losing_to_another_machine_puts_its_file_back(world, tmp_path):
    """Two machines (two copies of the keyring file): the one that commits second changed
    nothing, and its file is byte for byte what it was."""
    key = new_key()
    expect(world["cli"]("import", "--cluster", "c", "--appid", "app1", input=key))
    mine = world["settings"].master_key_file
    other = tmp_path / "other-machine" / "master.key"
    other.parent.mkdir(mode=0o700)
    shutil.copy2(mine, other)
    before = mine.read_bytes()
    other_settings = replace(world["settings"], master_key_file=other)
    won: list[masterkeys.MasterKeyRotation] = []

    def stall(step: str) -> None:
        if step == "grown":
            won.append(rotate_master_key(world, other_settings))

    with pytest.raises(Conflict) as info:
        rotate_master_key(world, on_step=stall)
    assert "retired by a concurrent `master-key rotate`" in str(info.value)
    assert mine.read_bytes() == before
    assert won[0].new_id == live_key_id(world)
    shutil.copy2(other, mine)  # the operator copies the winner's keyring, as after any rotation
    assert_sound(world, {"app1": key})


def test_master_key_rotate_started_during_another_ones_rewrap_fails_cleanly(world, tmp_path):
    key = new_key()
    expect(world["cli"]("import", "--cluster", "c", "--appid", "app1", input=key))
    other = tmp_path / "other-machine" / "master.key"
    other.parent.mkdir(mode=0o700)
    shutil.copy2(world["settings"].master_key_file, other)
    before = other.read_bytes()
    second: list[Worker] = []

    def stall(step: str) -> None:
        if step == "locked":  # the first holds the live key; the second waits, then fails
            other_settings = replace(world["settings"], master_key_file=other)
            second.append(Worker(lambda: rotate_master_key(world, other_settings)))
            second[0].start()

    rotate_master_key(world, on_step=stall)
    with pytest.raises(WrongMasterKey):
        second[0].outcome()
    assert other.read_bytes() == before
    assert_sound(world, {"app1": key})


# -- (4) the spool ----------------------------------------------------------------------------
def test_a_key_spooled_after_a_master_key_rotate_is_recovered(world):
    """The rotation loaded the keyring before `master-key rotate`, then its store failed:
    the spool must be sealed under a key the keyring file still holds."""

    def hold(step: str, rid: str) -> None:
        if step == "generated":
            rotate_master_key(world)
            with world["engine"].connect() as conn:
                conn.execute(text("ALTER TABLE secret_versions RENAME TO secret_versions_away"))
                conn.commit()

    with pytest.raises(StoreFailed) as info:
        service(world, hold).rotate("c", SCOPE, actor="t")
    rid = info.value.rotation_id
    with world["engine"].connect() as conn:
        conn.execute(text("ALTER TABLE secret_versions_away RENAME TO secret_versions"))
        conn.commit()
    record = json.loads(spool.spool_path(world["settings"], rid).read_text())
    assert record["master_key_id"] == live_key_id(world)
    recovered = service(world, lambda step, rid: None).recover(rid, actor="t")
    assert recovered.state == "completed"
    assert_sound(world, {"app1": generated(world)})


def test_a_spool_file_under_the_old_key_keeps_it_in_the_keyring_file(world):
    """Last guard: a spool file sealed under the old key that appears before the final
    step (a writer that did not take the lock) keeps that key in the file, and says so."""
    old = crypto.load_keyring(world["settings"].master_key_file)
    rid = "r-outside-the-lock"
    key = new_key()

    def drop_spool(step: str) -> None:
        if step == "committed":
            aad = f"keyvault/v1/spool|{rid}|c|{SCOPE}".encode()
            sealed = crypto.seal(old, key.encode(), aad)
            record = {"rotation_id": rid, "cluster": "c", "scope": str(SCOPE)}
            record |= {"fingerprint": crypto.fingerprint(key), "master_key_id": old.active}
            record["ciphertext"] = base64.b64encode(sealed.ciphertext).decode()
            record["wrapped_key"] = base64.b64encode(sealed.wrapped_key).decode()
            world["settings"].spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            spool.spool_path(world["settings"], rid).write_text(json.dumps(record))

    result = rotate_master_key(world, on_step=drop_spool)
    assert set(result.kept) == {old.active} and rid in result.kept[old.active]
    on_file = crypto.load_keyring(world["settings"].master_key_file)
    assert on_file.active == result.new_id and set(on_file.keys) == {old.active, result.new_id}
    with transaction(world["factory"]) as s:
        keyring = open_keyring(s, settings=world["settings"])
    spooled = spool.read_spool(world["settings"], keyring, rid)
    assert spooled is not None and spooled.key == key
    spool.remove_spool(world["settings"], rid)  # recovered
    again = rotate_master_key(world)
    assert again.kept == {} and set(
        crypto.load_keyring(world["settings"].master_key_file).keys
    ) == {again.new_id}
