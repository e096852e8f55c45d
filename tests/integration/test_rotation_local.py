"""The rotation state machine with the local transport (injected) and the ta-tool
emulator, on SQLite and PostgreSQL. Every path here is also covered through the
real sshd in test_rotation_sshd.py; this file is the fast, exhaustive one."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select, text

from keyvault.config import load_settings
from keyvault.db import make_engine, session_factory, transaction
from keyvault.errors import NeedsRecovery, RotationError, RotationUnresolved, StoreFailed
from keyvault.models import Event, Rotation
from keyvault.sandbox import state
from keyvault.scope import app_scope, root_scope
from keyvault.services import clusters, hosts, secrets, spool
from keyvault.services.rotation import ResultStatus, RotationService
from keyvault.services.store import open_keyring
from keyvault.ssh.local import LocalConnector
from tests.support.cluster import add_emulated_cluster, install_ta_tool, local_connector
from tests.support.rowmac import reseal_all


@pytest.fixture
def world(tmp_path, cli):
    """An initialised store, a cluster `c` with one host, and a local emulated ta-tool."""
    assert cli("init").exit_code == 0
    ta = install_ta_tool(tmp_path / "ta-c", ["app1", "app2", "app3"])
    ta_home = tmp_path / "ta-home"
    settings = load_settings()
    engine = make_engine(settings.database_url)
    factory = session_factory(engine)
    with transaction(factory) as s:
        add_emulated_cluster(s, "c", ta, host="ta-a")
    connector = local_connector(ta_home)
    yield {
        "settings": settings,
        "factory": factory,
        "state": ta.state_dir,
        "connector": connector,
        "ta_home": ta_home,
        "engine": engine,
    }
    engine.dispose()


def service(world, **kwargs) -> RotationService:
    return RotationService(
        world["factory"], settings=world["settings"], connector=world["connector"], **kwargs
    )


def stored_key(world, scope) -> str:
    with transaction(world["factory"]) as s:
        return secrets.reveal(
            open_keyring(s, settings=world["settings"]),
            secrets.get_version(s, cluster_name="c", scope=scope),
        )


def rotation_row(world, rid) -> Rotation:
    with transaction(world["factory"]) as s:
        return s.get(Rotation, rid)


def pending_files(world) -> list[str]:
    d = world["ta_home"] / ".keyvault" / "pending"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_rotations_store_the_emulators_valid_key_and_invalidate_the_old(world):
    with service(world) as svc:
        for _ in range(3):
            for scope in (root_scope(), app_scope("app1")):
                outcome = svc.rotate("c", scope, actor="t")
                assert outcome.state == "completed" and outcome.cleaned_up
                assert outcome.verify_state == ("failed" if scope.is_root else "skipped")
                assert stored_key(world, scope) == state.current_key(world["state"], str(scope))
    with transaction(world["factory"]) as s:
        history = secrets.history(s, cluster_name="c", scope=app_scope("app1"))
        assert [v.state for v in history] == ["invalidated", "invalidated", "current"]
        assert [v.superseded_by.number for v in history[:2]] == [2, 3]
        events = s.scalars(select(Event).where(Event.scope == "app:app1").order_by(Event.id)).all()
        assert [e.type for e in events] == ["secret.created", "secret.rotated", "secret.rotated"]
        assert json.loads(events[-1].payload)["rotation_id"] == history[-1].rotation_id
    assert all(name.endswith(".done") for name in pending_files(world))
    assert state.generations(world["state"]) == 6


def test_unparsable_output_needs_recovery_keeps_the_remote_file_and_recovers(world):
    state.set_noise(world["state"], output_mode="no_key")
    with pytest.raises(NeedsRecovery) as info:
        service(world).rotate("c", app_scope("app2"), actor="t")
    rid = info.value.rotation_id
    assert rotation_row(world, rid).state == "needs_recovery"
    assert f"{rid}.out" in pending_files(world)
    # A new rotation of the scope is refused, naming the rotation and the recover command.
    with pytest.raises(RotationUnresolved) as refused:
        service(world).rotate("c", app_scope("app2"), actor="t")
    assert rid in str(refused.value) and "rotations recover" in str(refused.value)
    # The output had no key: recovery cannot invent one; it stays unresolved.
    with pytest.raises(NeedsRecovery):
        service(world).recover(rid, actor="t")
    assert state.generations(world["state"], "app:app2") == 1


def test_two_candidate_keys_need_recovery_and_hide_both(world):
    state.set_noise(world["state"], output_mode="two_keys")
    with pytest.raises(NeedsRecovery) as info:
        service(world).rotate("c", app_scope("app3"), actor="t")
    assert "2 candidate keys" in str(info.value)
    assert state.current_key(world["state"], "app:app3") not in str(info.value)
    # The operator tightens the pattern, then recovery stores the key without re-running ta-tool.
    with transaction(world["factory"]) as s:
        clusters.set_options(
            s,
            keyring=open_keyring(s, settings=world["settings"]),
            name="c",
            key_pattern=r"(?<=secret: )[A-Za-z0-9]{64}",
        )
    outcome = service(world).recover(info.value.rotation_id, actor="t")
    assert outcome.state == "completed"
    assert stored_key(world, app_scope("app3")) == state.current_key(world["state"], "app:app3")
    assert state.generations(world["state"], "app:app3") == 1


def test_failing_ta_tool_is_failed_not_unresolved(world):
    state.set_noise(world["state"], fail_apps=["app1"])
    with pytest.raises(RotationError) as info:
        service(world).rotate("c", app_scope("app1"), actor="t")
    assert rotation_row(world, info.value.rotation_id).state == "failed"
    assert state.generations(world["state"], "app:app1") == 0
    state.clear_noise(world["state"])
    assert service(world).rotate("c", app_scope("app1"), actor="t").new_version == 1


class Crash(Exception):
    """What an on_step hook raises to make the rotating process "die" at a step."""


def crash_at(world, step: str, scope) -> str:
    """Rotate ``scope`` until ``step``, then "die"; the rotation id."""

    def crash(at, rid):
        if at == step:
            raise Crash(rid)

    with pytest.raises(Crash) as info:
        service(world, on_step=crash).rotate("c", scope, actor="t")
    return str(info.value)


def test_crash_after_journal_recovers_to_failed_without_running_ta_tool(world):
    rid = crash_at(world, "journaled", root_scope())
    # The process "died" before ta-tool: the journal says pending.
    assert rotation_row(world, rid).state == "pending"
    outcome = service(world).recover(rid, actor="t")
    assert outcome.state == "failed" and state.generations(world["state"], "root") == 0


def test_crash_after_generate_recovers_from_the_remote_file(world):
    def crash(step, rid):
        if step == "generated":
            raise KeyboardInterrupt(rid)

    with pytest.raises(KeyboardInterrupt) as info:
        service(world, on_step=crash).rotate("c", root_scope(), actor="t")
    rid = str(info.value)
    outcome = service(world).recover(rid, actor="t")
    assert outcome.state == "completed" and outcome.cleaned_up
    assert stored_key(world, root_scope()) == state.current_key(world["state"], "root")
    assert state.generations(world["state"], "root") == 1
    # Recovering again is harmless.
    again = service(world).recover(rid, actor="t")
    assert again.state == "completed" and "nothing to do" in " ".join(again.warnings)
    assert state.generations(world["state"], "root") == 1


def test_failed_commit_spools_the_key_and_recovery_stores_it(world, database):
    """Break the database for real between generate and store (the table vanishes)."""

    def break_db(step, rid):
        if step == "generated":
            with world["engine"].connect() as conn:
                conn.execute(text("ALTER TABLE secret_versions RENAME TO secret_versions_away"))
                conn.commit()

    with pytest.raises(StoreFailed) as info:
        service(world, on_step=break_db).rotate("c", app_scope("app2"), actor="t")
    rid = info.value.rotation_id
    message = str(info.value)
    assert "spool" in message and "rotations recover" in info.value.hint
    assert state.current_key(world["state"], "app:app2") not in message
    spooled = spool.spool_path(world["settings"], rid)
    assert spooled.exists() and spooled.stat().st_mode & 0o777 == 0o600
    assert state.current_key(world["state"], "app:app2").encode() not in spooled.read_bytes()
    with world["engine"].connect() as conn:
        conn.execute(text("ALTER TABLE secret_versions_away RENAME TO secret_versions"))
        conn.commit()
    outcome = service(world).recover(rid, actor="t")
    assert outcome.state == "completed" and not spooled.exists()
    assert stored_key(world, app_scope("app2")) == state.current_key(world["state"], "app:app2")
    assert state.generations(world["state"], "app:app2") == 1


def test_journal_row_deleted_after_generate_still_spools_the_key(world):
    """A restore (or a hostile writer) deletes the rotation row while ta-tool runs: the key
    it generated is the only valid one, so it must still land somewhere durable."""

    def delete_row(step, rid):
        if step == "generated":
            with transaction(world["factory"]) as s:
                s.execute(text("DELETE FROM rotations WHERE id = :id"), {"id": rid})

    with pytest.raises(StoreFailed) as info:
        service(world, on_step=delete_row).rotate("c", app_scope("app2"), actor="t")
    with transaction(world["factory"]) as s:
        keyring = open_keyring(s, settings=world["settings"])
    spooled = spool.read_spool(world["settings"], keyring, info.value.rotation_id)
    assert spooled is not None
    assert spooled.key == state.current_key(world["state"], "app:app2")


def test_failover_to_the_next_host_before_anything_ran(world):
    with transaction(world["factory"]) as s:
        s.execute(text("UPDATE hosts SET address = 'dead-host'"))
        hosts.add_host(
            s,
            keyring=open_keyring(s, settings=world["settings"]),
            cluster_name="c",
            address="ta-b",
            username="ta",
            become="none",
        )
    reseal_all(world["engine"], world["settings"])  # the dead host, as if added so
    world["connector"].unreachable = frozenset({"dead-host"})
    outcome = service(world).rotate("c", root_scope(), actor="t")
    assert outcome.host.startswith("ta@ta-b")


class _DroppingConnector:
    """Injected transport: runs commands here like LocalConnector, but every generate batch
    loses its connection right after the first report: stdout is closed, as sshd closes it
    when the client is gone, and the script runs on until its next write kills it (SIGPIPE).
    Other commands (the clean-up after the run) go through undisturbed."""

    def __init__(self, inner: LocalConnector) -> None:
        self.inner = inner

    def connect(self, target):
        return _DroppingConnection(self.inner.env, self.inner.connect(target))

    def offered_fingerprint(self, target):
        return self.inner.offered_fingerprint(target)


class _DroppingConnection:
    def __init__(self, env, inner) -> None:
        self.env, self.inner, self.label = env, inner, inner.label

    def run(self, command, *, password=None, timeout, idle_timeout=None, on_output=None):
        import re
        import subprocess

        from keyvault.ssh import ExecResult
        from keyvault.tahost import report_end

        first = re.search(
            r"kv_gen ([a-z0-9-]{6,32}) ", command
        )  # a generate script's first rotation
        if first is None:
            return self.inner.run(
                command,
                password=password,
                timeout=timeout,
                idle_timeout=idle_timeout,
                on_output=on_output,
            )
        proc = subprocess.Popen(
            ["sh", "-c", command],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        seen, end = b"", None
        while end is None:
            chunk = proc.stdout.read1(65536)
            if not chunk:
                break
            seen += chunk
            end = report_end(first.group(1), seen)
        proc.stdout.close()
        proc.wait(timeout=timeout)
        seen = seen[:end] if end else seen
        if on_output is not None and seen:
            on_output(seen)
        return ExecResult(seen, None)

    def close(self) -> None:
        self.inner.close()


def test_connection_lost_mid_batch_loses_no_key_and_recover_settles_each(world):
    world = dict(world, connector=_DroppingConnector(world["connector"]))
    scopes = [app_scope(a) for a in ("app1", "app2", "app3")]
    with service(world) as svc:
        results = dict(
            zip(scopes, svc.rotate_many("c", scopes, actor="t", concurrency=1), strict=True)
        )
    first = results[scopes[0]]
    assert first.state in ("stored", "completed") and stored_key(
        world, scopes[0]
    ) == state.current_key(world["state"], "app:app1")
    later = [results[s] for s in scopes[1:]]
    assert all(r.status is ResultStatus.NEEDS_RECOVERY for r in later)
    # After the drop a rotation either ran (its key is on the host, the only valid one) or
    # never claimed its id: recovery tells which, stores the key or says "never ran", and
    # no rotation is left unresolved.
    for scope, exc in zip(scopes[1:], later, strict=False):
        assert rotation_row(world, exc.rotation_id).state == "needs_recovery"
        outcome = service(world).recover(exc.rotation_id, actor="t")
        generated = state.generations(world["state"], f"app:{scope.appid}")
        if outcome.state == "failed":
            assert generated == 0 and "never ran" in " ".join(outcome.warnings)
        else:
            assert outcome.state == "completed" and generated == 1
            assert stored_key(world, scope) == state.current_key(
                world["state"], f"app:{scope.appid}"
            )
        assert rotation_row(world, exc.rotation_id).state in ("failed", "completed")
    assert state.generations(world["state"], "app:app1") == 1


def test_a_silent_ta_tool_times_out_its_batch_and_nothing_is_lost(world, tmp_path):
    """A hung ta-tool (the emulator holds after printing its key) ends its batch at the
    timeout; recover stores its key, and the rotations after it, which never started,
    become failed."""
    import dataclasses

    release = tmp_path / "release"
    state.set_noise(
        world["state"], hold_file=release
    )  # every run would hold: only the first starts
    settings = dataclasses.replace(world["settings"], ssh_command_timeout=0.5)
    scopes = [app_scope(a) for a in ("app1", "app2", "app3")]
    try:
        svc = RotationService(world["factory"], settings=settings, connector=world["connector"])
        with svc:
            results = dict(
                zip(scopes, svc.rotate_many("c", scopes, actor="t", concurrency=1), strict=True)
            )
    finally:
        state.clear_noise(world["state"])
        release.touch()  # the held ta-tool finishes (its key is already in the pending file)
    assert all(results[s].status is ResultStatus.NEEDS_RECOVERY for s in scopes)
    first = service(world).recover(results[scopes[0]].rotation_id, actor="t")
    assert first.state == "completed" and stored_key(world, scopes[0]) == state.current_key(
        world["state"], "app:app1"
    )
    for scope in scopes[1:]:
        outcome = service(world).recover(results[scope].rotation_id, actor="t")
        assert (
            outcome.state == "failed"
            and state.generations(world["state"], f"app:{scope.appid}") == 0
        )
    assert state.generations(world["state"], "app:app1") == 1


class _RecoverFirstConnector:
    """Injected transport for a race no real timing can produce on demand: when the wrapped
    service fetches a pending file, another recovery stores the key *first*; the fetch then
    reports what it saw before that, "not finished"."""

    def __init__(self, inner: LocalConnector, race) -> None:
        self.inner, self.race = inner, race

    def connect(self, target):
        conn = self.inner.connect(target)
        race = self.race

        class Conn:
            label = conn.label

            def run(self, command, **kwargs):
                from keyvault.ssh import ExecResult

                if "ABSENT" in command:  # the fetch script
                    race()
                    rid = command.split("@@KV:")[1].split(":")[0]
                    stale = (
                        f"@@KV:{rid}:OUT@@\n\n@@KV:{rid}:ERR@@\n\n@@KV:{rid}:RC:none@@\n".encode()
                    )
                    return ExecResult(stale, 0)
                return conn.run(command, **kwargs)

            def close(self):
                conn.close()

        return Conn()

    def offered_fingerprint(self, target):
        return self.inner.offered_fingerprint(target)


def test_a_recovery_never_demotes_a_rotation_another_one_stored_meanwhile(world):
    rid = crash_at(world, "generated", app_scope("app1"))
    assert rotation_row(world, rid).state == "pending"

    def other_recovery_wins():
        assert service(world).recover(rid, actor="other").state == "completed"

    racing = RotationService(
        world["factory"],
        settings=world["settings"],
        connector=_RecoverFirstConnector(world["connector"], other_recovery_wins),
    )
    with pytest.raises(NeedsRecovery):  # what it saw was "not finished" ...
        racing.recover(rid, actor="t")
    # ... but the rotation the other recovery stored stays completed, its key current.
    assert rotation_row(world, rid).state == "completed"
    assert stored_key(world, app_scope("app1")) == state.current_key(world["state"], "app:app1")
