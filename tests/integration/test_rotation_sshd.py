"""Rotation through the real OpenSSH sshd of tests/sshd/setup.sh (issue 3, "Acceptance").

Every rotation here really runs ``ta-tool`` (the TA simulator's emulator) as the ta user
on 127.0.0.1:2222, and every key is checked against the emulator's state and its Open
API. The emulator's state is shared by every test (and every run), so tests compare
with ``current_key`` and with *deltas* of ``generations``, use their own APPIDs and
their own cluster names, and never assume absolute values.

Keys never reach the test output: they are compared with ``==`` inside helpers that
report only fingerprints, and CLI results are described by their stderr only.

Crash tests use real processes: the ``keyvault`` CLI, or ``rotate_driver.py`` (the
CLI's rotation service with an ``on_step`` hook that SIGKILLs its own process).
Synchronisation is by polling files and processes under a bounded deadline, never
by sleeping a guessed time.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from keyvault import crypto
from keyvault.sandbox import state as st
from tests.support.cli import KEYVAULT, process_gone, run_process, spawn_process
from tests.support.sshd_env import hold_file_path, kill_session_processes
from tests.support.timeouts import TIMEOUT

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "rotate_driver.py"
PYTHON = sys.executable
DEADLINE = TIMEOUT  # a bound for polls, never a duration that must elapse
PROCESS_TIMEOUT = TIMEOUT
KEY_TOKEN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z0-9]{64}(?![A-Za-z0-9])")
TA_PENDING = Path(pwd.getpwnam("ta").pw_dir) / ".keyvault" / "pending"

SQLITE_ONLY = pytest.mark.parametrize("blank_database", ["sqlite"], indirect=True)


# ---------------------------------------------------------------------- key-safe checks


def _fp(key: str | None) -> str:
    return crypto.fingerprint(key) if key else repr(key)


def assert_same_key(actual: str | None, expected: str | None, what: str) -> None:
    """actual == expected, reported by fingerprint only (pytest would print the keys)."""
    if not actual or not expected or actual != expected:
        pytest.fail(
            f"{what}: keyvault has {_fp(actual)}, the emulator's valid key is {_fp(expected)}",
            pytrace=False,
        )


def assert_no_key(text: str, keys, what: str) -> None:
    """None of ``keys`` occurs in ``text`` (reported without the key or the text)."""
    for n, key in enumerate(k for k in keys if k):
        if key in text:
            pytest.fail(
                f"{what}: key #{n} ({_fp(key)}) appears in the captured text", pytrace=False
            )


def masked(text: str) -> str:
    """``text`` with every key-shaped token replaced, for failure messages."""
    return KEY_TOKEN.sub("<64-char token>", text)


def one_line_error(result_or_text) -> str:
    """The single ``error: ...`` line a failing command prints on stderr (with no key in it)."""
    text = result_or_text if isinstance(result_or_text, str) else result_or_text.stderr
    if KEY_TOKEN.search(text):
        pytest.fail(f"a key-shaped token is in the error output: {masked(text)!r}", pytrace=False)
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, f"expected exactly one error line, got: {lines!r}"
    return errors[0]


# ------------------------------------------------------------------------------ polling


def wait_until(
    predicate, what: str, timeout: float = DEADLINE, proc: subprocess.Popen | None = None
):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout``.
    With ``proc``, fail at once if that process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            _out, err = proc.communicate()
            pytest.fail(
                f"process exited ({proc.returncode}) while waiting for {what}; "
                f"stderr: {masked(err.strip())!r}",
                pytrace=False,
            )
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}", pytrace=False)
        time.sleep(0.02)


# ------------------------------------------------------------------------ the emulators


@pytest.fixture(scope="module")
def openapi(sshd_env):
    """The TA Open API emulator on the ta-tool emulator's state, in a thread."""
    from keyvault.sandbox.openapi import serving

    with serving(sshd_env.tatool_state_dir) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}"


class Hold:
    """The emulator's ``hold_file`` noise: ta-tool stops (after or before printing its
    key into the pending file) until the release file exists."""

    def __init__(self, sshd_env, name: str, *, before_print: bool = False) -> None:
        self.state_dir = Path(sshd_env.tatool_state_dir)
        self.marker = self.state_dir / "holding"
        self.release_file = hold_file_path(sshd_env, name)
        self.before_print = before_print
        self.pid: int | None = None

    def arm(self) -> None:
        wait_until(lambda: not self.marker.exists(), "an earlier ta-tool to stop holding")
        st.set_noise(
            self.state_dir, hold_file=self.release_file, hold_before_print=self.before_print or None
        )

    def wait_holding(self, proc: subprocess.Popen | None = None) -> int:
        def holding_pid():
            try:
                text = self.marker.read_text().strip()
            except FileNotFoundError:
                return None
            return int(text) if text.isdigit() else None

        self.pid = wait_until(holding_pid, "ta-tool to hold (the `holding` marker)", proc=proc)
        # Only this one run holds: later ta-tool runs must not.
        st.set_noise(self.state_dir, hold_file=None, hold_before_print=None)
        return self.pid

    def release(self) -> None:
        self.release_file.touch()

    def wait_finished(self) -> None:
        """Release and wait until the held ta-tool process has exited."""
        self.release()
        if self.pid is not None:
            wait_until(lambda: process_gone(self.pid), f"ta-tool (pid {self.pid}) to exit")

    def close(self) -> None:
        st.set_noise(self.state_dir, hold_file=None, hold_before_print=None)
        self.release()  # never leave a ta-tool waiting its 120 s
        if self.pid is not None:
            wait_until(lambda: process_gone(self.pid), f"ta-tool (pid {self.pid}) to exit")
        self.release_file.unlink(missing_ok=True)


def pending_file(rid: str, suffix: str) -> Path:
    return TA_PENDING / f"{rid}.{suffix}"


def wait_remote_rc(rid: str) -> None:
    """The remote script has written ta-tool's exit status (it ran to its end)."""

    def written():
        try:
            return pending_file(rid, "rc").read_text().strip() != ""
        except FileNotFoundError:
            return False

    wait_until(written, f"the remote exit status file of rotation {rid}")


# ---------------------------------------------------------------------------- harness


def scope_flags(scope: str) -> list[str]:
    return ["--root"] if scope == "root" else ["--appid", scope[4:]]


class KV:
    """A keyvault home on one database, with the emulator and the test sshd."""

    def __init__(self, *, cli, sshd, api_url: str, backend: str, tmp_path: Path) -> None:
        self.cli = cli
        self.sshd = sshd
        self.state_dir = Path(sshd.tatool_state_dir)
        self.api_url = api_url
        self.backend = backend
        self.tmp_path = tmp_path
        self.holds: list[Hold] = []

    # -- running keyvault ---------------------------------------------------------
    def __call__(self, *args: str, code: int = 0):
        """Run keyvault in-process (CliRunner); assert the exit code."""
        result = self.cli(*args)
        if result.exit_code != code:  # stdout may hold a key: show only stderr, masked
            pytest.fail(
                f"keyvault {' '.join(args[:3])}... exited {result.exit_code}, not {code}; "
                f"stderr: {masked(result.stderr.strip())!r}",
                pytrace=False,
            )
        return result

    def json(self, *args: str):
        return json.loads(self(*args, "--json").stdout)

    def argv(self, *args: str) -> list[str]:
        return [*KEYVAULT, *args]

    def run(self, *args: str, driver: bool = False) -> subprocess.CompletedProcess:
        """Run keyvault (or the driver) as a real process and wait for it."""
        argv = [PYTHON, str(DRIVER), *args] if driver else self.argv(*args)
        return run_process(argv, cwd=self.tmp_path)

    def spawn(self, *args: str, driver: bool = False) -> subprocess.Popen:
        """Start keyvault (or the driver) as a real process."""
        argv = [PYTHON, str(DRIVER), *args] if driver else self.argv(*args)
        return spawn_process(argv, cwd=self.tmp_path)

    # -- set-up ---------------------------------------------------------------------
    def apps(self, tag: str, count: int) -> list[str]:
        """APPIDs of this test (and database), registered in the emulator."""
        apps = [f"kvit-{tag}-{self.backend}-{n}" for n in range(1, count + 1)]
        st.add_apps(self.state_dir, apps)
        return apps

    def cluster(
        self,
        tag: str,
        apps=(),
        *,
        user: str = "root",
        become: str = "su",
        fingerprint: str | None = "pinned",
    ) -> str:
        """A cluster on the Open API emulator with one host: the test sshd."""
        name = f"{tag}-{self.backend}"
        self("cluster", "add", name, "--open-api-url", self.api_url, "--login-name", "root")
        if apps:
            ids = [
                a
                for app in apps
                for a in ("--project-id", f"{app}={st.project_id(self.state_dir, app)}")
            ]
            self("cluster", "set", name, *ids)
        args = [
            "host",
            "add",
            name,
            self.sshd.host,
            "--port",
            str(self.sshd.port),
            "--user",
            user,
            "--identity",
            str(self.sshd.identity(user)),
            "--become",
            become,
        ]
        if fingerprint == "pinned":
            fingerprint = self.sshd.host_key_fingerprint
        if fingerprint:
            args += ["--fingerprint", fingerprint]
        self(*args)
        return name

    def hold(self, name: str, *, before_print: bool = False) -> Hold:
        hold = Hold(self.sshd, f"{name}-{self.backend}", before_print=before_print)
        self.holds.append(hold)
        hold.arm()
        return hold

    # -- reading the store ------------------------------------------------------------
    def reveal(self, cluster: str, scope: str, version: int | None = None) -> str:
        extra = ["--version", str(version)] if version is not None else []
        return self(
            "secrets", "show", "--cluster", cluster, *scope_flags(scope), *extra, "--reveal"
        ).stdout.strip()

    def history(self, cluster: str, scope: str) -> list[dict]:
        return self.json("secrets", "history", "--cluster", cluster, *scope_flags(scope))

    def versions(self, cluster: str, scope: str) -> int:
        rows = self.json("secrets", "list", "--cluster", cluster)
        return next((r["version"] for r in rows if r["scope"] == scope), 0)

    def rotations(self, cluster: str, state: str | None = None) -> list[dict]:
        extra = ["--state", state] if state else []
        return self.json("rotations", "list", "--cluster", cluster, *extra)

    def rotation(self, rid: str) -> dict:
        return self.json("rotations", "show", rid)

    # -- the emulator ---------------------------------------------------------------------
    def gens(self, scope: str) -> int:
        return st.generations(self.state_dir, scope)

    def current(self, scope: str) -> str | None:
        return st.current_key(self.state_dir, scope)

    def check_current(self, cluster: str, scope: str, what: str = "") -> None:
        assert_same_key(
            self.reveal(cluster, scope),
            self.current(scope),
            f"{cluster} {scope}{' ' + what if what else ''}",
        )

    def close(self) -> None:
        for hold in self.holds:
            hold.close()
        # The remote pending files (and tombstones) of this test's rotations: debris now.
        for row in self.json("rotations", "list"):
            for path in TA_PENDING.glob(f"{row['id']}.*"):
                path.unlink(missing_ok=True)


@pytest.fixture
def kv(cli, database, ta_sim, sshd_env, openapi, tmp_path):
    """An initialised keyvault home (SQLite or PostgreSQL, see db_url) next to the sshd."""
    harness = KV(
        cli=cli, sshd=sshd_env, api_url=openapi, backend=database.backend, tmp_path=tmp_path
    )
    harness("init")
    try:
        yield harness
    finally:
        harness.close()


def rotate_app(kv: KV, cluster: str, *apps: str) -> list[dict]:
    out = kv.json("rotate", "app", "--cluster", cluster, "--yes", *apps)
    return [r for r in out["results"] if r["error"] is None]


def ta_call(api_url: str, state_dir: Path, scope: str, key: str):
    """The cluster's cheap check call for ``scope``, made directly with ``key``."""
    from keyvault.ta import TaClient

    client = TaClient(api_url, timeout=10)
    if scope == "root":
        return client.call(
            "open/project-list", token=key, method="POST", params={"loginName": "root"}
        )
    pid = st.project_id(state_dir, scope[4:])
    return client.call("open/list-event-meta", token=key, method="GET", params={"projectId": pid})


def expect_refused_as_unresolved(kv: KV, cluster: str, app: str, rid: str) -> None:
    """A new rotation of the scope is refused, naming the rotation and the recover command."""
    gens = kv.gens(f"app:{app}")
    line = one_line_error(kv("rotate", "app", "--cluster", cluster, "--yes", app, code=1))
    assert rid in line and f"keyvault rotations recover {rid}" in line, line
    assert kv.gens(f"app:{app}") == gens


def recover_and_check(
    kv: KV, cluster: str, scope: str, rid: str, gens_before: int, old_version: int
) -> None:
    """`rotations recover` stores the emulator's valid key; ta-tool ran exactly once in all."""
    [out] = kv.json("rotations", "recover", rid)["results"]
    assert out["state"] == "completed", out
    assert out["new_version"] == old_version + 1 and out["verify_state"] == "verified", out
    kv.check_current(cluster, scope, "after recovery")
    assert kv.gens(scope) == gens_before + 1, "ta-tool must have run exactly once"
    hist = kv.history(cluster, scope)
    assert [v["state"] for v in hist][-2:] == ["invalidated", "current"]
    assert hist[-2]["superseded_by"] == hist[-1]["version"] and hist[-1]["rotation_id"] == rid
    # Clean-up happened only now, after the commit: a key-less tombstone stays.
    assert not pending_file(rid, "out").exists() and pending_file(rid, "done").exists()
    assert kv.rotation(rid)["state"] == "completed"
    assert kv.rotations(cluster, "pending") == [] and kv.rotations(cluster, "needs_recovery") == []


# ------------------------------------------------------------------- 1. the main flow


def test_rotate_root_and_three_apps_three_times(kv):
    from keyvault.errors import TaApiError, TaTransportError

    apps = kv.apps("three", 3)
    scopes = ["root", *(f"app:{a}" for a in apps)]
    cluster = kv.cluster("three", apps)
    before = {s: kv.gens(s) for s in scopes}

    for round_ in (1, 2, 3):
        [root] = kv.json("rotate", "root", "--cluster", cluster, "--yes")["results"]
        outcomes = [root, *rotate_app(kv, cluster, *apps)]
        for scope, o in zip(scopes, outcomes, strict=False):
            assert o["scope"] == scope and o["new_version"] == round_, o
            assert (
                o["state"] == "completed" and o["cleaned_up"] and o["verify_state"] == "verified"
            ), o
            assert o["old_version"] == (round_ - 1 or None)
        for scope in scopes:
            kv.check_current(cluster, scope, f"after round {round_}")
            out = kv("verify", "--cluster", cluster, *scope_flags(scope)).stdout
            assert f"v{round_}: verified" in out, out

    for scope in scopes:
        assert kv.gens(scope) == before[scope] + 3, scope
        hist = kv.history(cluster, scope)
        assert [v["version"] for v in hist] == [1, 2, 3]
        assert [v["state"] for v in hist] == ["invalidated", "invalidated", "current"]
        assert [v["superseded_by"] for v in hist] == [2, 3, None]
        assert all(v["source"] == "rotation" and v["rotation_id"] for v in hist)
        data = ta_call(kv.api_url, kv.state_dir, scope, kv.current(scope))  # accepted
        assert data is not None
        for number in (1, 2):
            old = kv.reveal(cluster, scope, number)
            if not old or old == kv.current(scope):
                pytest.fail(f"{scope} version {number} is not an old key", pytrace=False)
            with pytest.raises(TaApiError) as refused:
                ta_call(kv.api_url, kv.state_dir, scope, old)
            assert not isinstance(refused.value, TaTransportError)
            assert refused.value.return_code == -1008, str(refused.value)


# ------------------------------------------------------------------- 2. become modes


@SQLITE_ONLY
@pytest.mark.parametrize(("user", "become"), [("kvops", "su"), ("kvsudo", "sudo"), ("ta", "none")])
def test_become_modes(kv, sshd_env, monkeypatch, user, become):
    if user == "kvops":  # su typed at the PTY prompt, the password from a file
        monkeypatch.setenv("KEYVAULT_SU_PASSWORD_FILE", str(sshd_env.ta_password_file))
    [app] = kv.apps(f"become-{become}", 1)
    scope = f"app:{app}"
    cluster = kv.cluster(f"become-{become}", [app], user=user, become=become)
    checked = kv("host", "check", cluster).stdout
    assert "became ta" in checked, checked
    gens = kv.gens(scope)
    for n in (1, 2):
        [o] = rotate_app(kv, cluster, app)
        assert (o["state"], o["new_version"], o["verify_state"]) == ("completed", n, "verified"), o
        kv.check_current(cluster, scope, f"rotation {n} as {user} ({become})")
    assert kv.gens(scope) == gens + 2
    assert kv("verify", "--cluster", cluster, "--appid", app).exit_code == 0


# ------------------------------------------------------------------- 3. crash safety


def _prepared(kv: KV, tag: str, **host) -> tuple[str, str, str]:
    """A cluster and an app with a stored version 1 (so a crash has an old key to keep)."""
    [app] = kv.apps(tag, 1)
    cluster = kv.cluster(tag, [app], **host)
    rotate_app(kv, cluster, app)
    kv.check_current(cluster, f"app:{app}", "version 1")
    return cluster, app, f"app:{app}"


def _only(rows: list[dict], scope: str) -> str:
    ids = [r["id"] for r in rows if r["scope"] == scope]
    assert len(ids) == 1, rows
    return ids[0]


def killed_while_holding(kv, hold: Hold, *args: str, look: Callable[[], object]):
    """Run ``keyvault ARGS``; once ta-tool holds, ``look()``, SIGKILL the CLI, then let ta-tool
    finish and wait until it has exited. Returns what ``look`` returned."""
    proc = kv.spawn(*args)
    try:
        hold.wait_holding(proc)
        seen = look()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=PROCESS_TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    hold.wait_finished()
    return seen


def test_crash_kill9_after_tatool_ran_before_output_read(kv):
    cluster, app, scope = _prepared(kv, "crash-a")
    gens = kv.gens(scope)
    hold = kv.hold("crash-a")  # ta-tool prints its key into the pending file, then waits

    def look():
        assert kv.gens(scope) == gens + 1  # the old key is dead now
        return _only(kv.rotations(cluster, "pending"), scope)

    rid = killed_while_holding(
        kv, hold, "rotate", "app", "--cluster", cluster, "--yes", app, look=look
    )
    wait_remote_rc(rid)

    assert pending_file(rid, "out").exists()
    assert kv.rotation(rid)["state"] == "pending"
    assert kv.versions(cluster, scope) == 1
    expect_refused_as_unresolved(kv, cluster, app, rid)
    recover_and_check(kv, cluster, scope, rid, gens, old_version=1)


def test_crash_kill9_mid_batch_settles_every_rotation_of_the_batch(kv):
    """A bulk run (one batch of three on one channel) killed while the first ta-tool holds.
    Its key is recovered; each later rotation either ran before sshd closed the session
    (its key is recovered) or never claimed its id (recover says never ran): none is lost
    and none stays unresolved."""
    apps = kv.apps("crash-batch", 3)
    cluster = kv.cluster("crash-batch", apps)
    scopes = [f"app:{a}" for a in apps]
    gens = {scope: kv.gens(scope) for scope in scopes}
    hold = kv.hold("crash-batch")

    def look():
        assert kv.gens(scopes[0]) == gens[scopes[0]] + 1
        ids = {row["scope"]: row["id"] for row in kv.rotations(cluster, "pending")}
        assert sorted(ids) == sorted(scopes)  # the whole batch was journaled before ta-tool ran
        return ids

    ids = killed_while_holding(
        kv,
        hold,
        "rotate",
        "app",
        "--cluster",
        cluster,
        "--yes",
        "--concurrency",
        "1",
        *apps,
        look=look,
    )
    wait_remote_rc(ids[scopes[0]])

    # One command settles the whole batch.
    settled = {
        row["scope"]: row
        for row in kv.json("rotations", "recover", "--all", "--cluster", cluster)["results"]
    }
    assert sorted(settled) == sorted(scopes) and {settled[s]["rotation_id"] for s in scopes} == set(
        ids.values()
    )
    assert (
        settled[scopes[0]]["state"] == "completed" and kv.gens(scopes[0]) == gens[scopes[0]] + 1
    ), settled
    kv.check_current(cluster, scopes[0], "after recovery")
    for scope in scopes[1:]:
        if settled[scope]["state"] == "failed":
            assert kv.gens(scope) == gens[scope], f"{scope}: failed, yet ta-tool ran"
            assert "never ran" in " ".join(settled[scope]["warnings"]), settled[scope]
        else:
            assert settled[scope]["state"] == "completed" and kv.gens(scope) == gens[scope] + 1, (
                settled
            )
            kv.check_current(cluster, scope, "after recovery")
    assert kv.rotations(cluster, "pending") == [] and kv.rotations(cluster, "needs_recovery") == []
    assert (
        kv.json("rotations", "recover", "--all", "--cluster", cluster)["results"] == []
    )  # nothing left to do
    kv("rotations", "recover", code=2)  # neither an id nor --all: a usage error
    kv("rotations", "recover", "--all", ids[scopes[0]], code=2)
    rotate_app(kv, cluster, apps[1])  # nothing is left blocking the scopes
    kv.check_current(cluster, scopes[1], "after a new rotation")


def test_crash_kill9_after_output_read_before_store(kv):
    cluster, app, scope = _prepared(kv, "crash-b")
    gens = kv.gens(scope)
    done = kv.run("--kill-at", "generated", cluster, scope, driver=True)
    assert done.returncode == -signal.SIGKILL, masked(done.stderr)
    steps = [line.split() for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [s[1] for s in steps] == ["journaled", "generated"], done.stdout
    rid = steps[0][2]
    assert kv.gens(scope) == gens + 1

    assert _only(kv.rotations(cluster, "pending"), scope) == rid
    assert pending_file(rid, "out").exists()
    assert kv.versions(cluster, scope) == 1
    expect_refused_as_unresolved(kv, cluster, app, rid)
    recover_and_check(kv, cluster, scope, rid, gens, old_version=1)


@pytest.mark.parametrize(
    ("blank_database", "user", "become"),
    [
        ("sqlite", "kvsudo", "sudo"),
        ("postgres", "kvsudo", "sudo"),
        (
            "sqlite",
            "kvops",
            "su",
        ),  # su's password typed on a PTY: the hang-up reaches the remote side
    ],
    indirect=["blank_database"],
)
def test_crash_sshd_session_killed_mid_command(kv, sshd_env, monkeypatch, user, become):
    monkeypatch.setenv("KEYVAULT_SU_PASSWORD_FILE", str(sshd_env.ta_password_file))
    cluster, app, scope = _prepared(kv, f"crash-c-{user}", user=user, become=become)
    gens = kv.gens(scope)
    hold = kv.hold(f"crash-c-{user}", before_print=True)  # ta-tool generated, has not printed yet
    proc = kv.spawn("rotate", "app", "--cluster", cluster, "--yes", app)
    try:
        hold.wait_holding(proc)
        assert kill_session_processes(sshd_env, user) >= 1
        _out, err = proc.communicate(timeout=PROCESS_TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 1, masked(err)
    line = one_line_error(err)
    rid = _only(kv.rotations(cluster, "needs_recovery"), scope)
    assert "was lost after ta-tool may have started" in line, line
    assert f"keyvault rotations recover {rid}" in line, line
    assert kv.gens(scope) == gens + 1
    assert kv.versions(cluster, scope) == 1
    expect_refused_as_unresolved(kv, cluster, app, rid)
    # Recovering too early (ta-tool still running, no key printed yet) is safe: it says to wait.
    line = one_line_error(kv("rotations", "recover", rid, code=1))
    assert "has not finished" in line and f"keyvault rotations recover {rid}" in line, line
    assert kv.rotation(rid)["state"] == "needs_recovery" and kv.versions(cluster, scope) == 1

    hold.wait_finished()  # ta-tool survived the dropped connection and prints its key now
    if (
        user != "kvops"
    ):  # on a PTY the hang-up may end the remote shell before it records the status
        wait_remote_rc(rid)
    recover_and_check(kv, cluster, scope, rid, gens, old_version=1)


@SQLITE_ONLY
def test_crash_kill9_after_store_before_cleanup(kv):
    cluster, _app, scope = _prepared(kv, "crash-s")
    gens = kv.gens(scope)
    done = kv.run("--kill-at", "stored", cluster, scope, driver=True)
    assert done.returncode == -signal.SIGKILL, masked(done.stderr)
    rid = done.stdout.split()[2]
    # The key is committed: the rotation is resolved (`stored`), only clean-up and verify remain.
    row = kv.rotation(rid)
    assert row["state"] == "stored" and not row["cleaned_up"] and row["verify_state"] is None, row
    kv.check_current(cluster, scope, "stored before the crash")
    assert pending_file(rid, "out").exists()
    [out] = kv.json("rotations", "recover", rid)["results"]
    assert (out["state"], out["verify_state"], out["new_version"]) == (
        "completed",
        "verified",
        2,
    ), out
    assert not pending_file(rid, "out").exists() and pending_file(rid, "done").exists()
    kv.check_current(cluster, scope, "after recovery")
    assert kv.gens(scope) == gens + 1
    assert [v["version"] for v in kv.history(cluster, scope)] == [1, 2]


def test_crash_kill9_after_journal_before_tatool(kv):
    cluster, app, scope = _prepared(kv, "crash-j")
    gens = kv.gens(scope)
    done = kv.run("--kill-at", "journaled", cluster, scope, driver=True)
    assert done.returncode == -signal.SIGKILL, masked(done.stderr)
    rid = done.stdout.split()[2]
    assert _only(kv.rotations(cluster, "pending"), scope) == rid
    expect_refused_as_unresolved(kv, cluster, app, rid)

    [out] = kv.json("rotations", "recover", rid)["results"]
    assert out["state"] == "failed", out
    assert any("never ran" in w for w in out["warnings"]), out
    row = kv.rotation(rid)
    assert row["state"] == "failed" and "never ran" in row["error"], row
    assert kv.gens(scope) == gens
    kv.check_current(cluster, scope, "still version 1")  # the old key is still valid
    assert kv.versions(cluster, scope) == 1
    # The scope is free again.
    [o] = rotate_app(kv, cluster, app)
    assert o["state"] == "completed" and o["new_version"] == 2
    kv.check_current(cluster, scope, "after rotating again")
    assert kv.gens(scope) == gens + 1


def test_recover_while_the_rotation_is_still_starting(kv):
    """An operator runs `rotations recover` on a `pending` rotation whose process is alive
    but has not started ta-tool yet (slow connection, busy host). Recovery may conclude
    "never ran" only if it also makes sure ta-tool can no longer run for that rotation:
    otherwise the late ta-tool run generates a key that nobody stores."""
    cluster, _app, scope = _prepared(kv, "crash-late")
    gens = kv.gens(scope)
    go = kv.tmp_path / "go"
    proc = kv.spawn("--pause-at", "journaled", "--pause-file", str(go), cluster, scope, driver=True)
    try:
        paused = Path(f"{go}.paused")
        rid = wait_until(
            lambda: paused.exists() and paused.read_text().strip(), "the driver to pause", proc=proc
        )
        [out] = kv.json("rotations", "recover", rid)["results"]
        assert out["state"] == "failed" and any("never ran" in w for w in out["warnings"]), out
        go.touch()  # the slow rotation goes on and reaches the host only now
        _out, err = proc.communicate(timeout=PROCESS_TIMEOUT)
    finally:
        go.touch()
        proc.kill()
    assert proc.returncode != 0, "the resolved rotation must not complete"
    # Whatever the late process did, the valid key is the stored one.
    kv.check_current(cluster, scope, "after the late rotation process")
    assert kv.gens(scope) == gens, "ta-tool must not run for a rotation recovery declared never ran"
    assert kv.rotation(rid)["state"] == "failed"
    line = one_line_error(err)
    assert (
        f"rotation {rid} was resolved (failed) by a recovery" in line
        and "ta-tool did not run" in line
    ), line


# ------------------------------------------------------------------- 4. concurrency


def test_two_processes_rotating_one_scope(kv):
    from keyvault.cli.context import AppContext
    from keyvault.errors import RotationUnresolved
    from keyvault.scope import app_scope

    cluster, app, scope = _prepared(kv, "twice")
    gens = kv.gens(scope)
    hold = kv.hold("twice")
    first = kv.spawn("rotate", "app", "--cluster", cluster, "--yes", app)
    try:
        hold.wait_holding(first)
        rid = _only(kv.rotations(cluster, "pending"), scope)

        second = kv.run("rotate", "app", "--cluster", cluster, "--yes", app)
        assert second.returncode == 1, masked(second.stderr)
        line = one_line_error(second.stderr)
        assert f"rotation {rid} of {scope} in {cluster} is pending" in line, line
        assert f"keyvault rotations recover {rid}" in line, line

        app_ctx = AppContext()  # the same refusal, as an exception
        try:
            with pytest.raises(RotationUnresolved) as refused:
                app_ctx.rotation_service().rotate(cluster, app_scope(app), actor="pytest")
        finally:
            app_ctx.close()
        assert refused.value.rotation_id == rid and refused.value.exit_code == 1

        hold.wait_finished()
        out, err = first.communicate(timeout=PROCESS_TIMEOUT)
    finally:
        first.kill()
    assert first.returncode == 0, masked(err)
    assert f"({rid} on " in out
    assert kv.gens(scope) == gens + 1, "ta-tool must have run once"
    kv.check_current(cluster, scope, "after the concurrent attempt")
    assert kv.rotation(rid)["state"] == "completed"
    assert [r["state"] for r in kv.rotations(cluster)] == ["completed", "completed"]


# ------------------------------------------------------------------- 5. hostile and broken


def test_unknown_host_key_then_trust(kv, sshd_env):
    [app] = kv.apps("hk-unknown", 1)
    cluster = kv.cluster("hk-unknown", [app], fingerprint=None)
    gens = kv.gens(f"app:{app}")
    line = one_line_error(kv("rotate", "app", "--cluster", cluster, "--yes", app, code=1))
    assert "unknown host key" in line and sshd_env.host_key_fingerprint in line, line
    host = re.escape(sshd_env.host)
    trust = re.compile(rf"`keyvault host trust (CLUSTER|{cluster}) {host} --port {sshd_env.port}`")
    assert trust.search(line), line
    assert kv.rotations(cluster) == [] and kv.gens(f"app:{app}") == gens
    assert kv.json("secrets", "list", "--cluster", cluster) == []

    trusted = kv(
        "host", "trust", cluster, sshd_env.host, "--port", str(sshd_env.port), "--yes"
    ).stdout
    assert f"pinned {sshd_env.host_key_fingerprint}" in trusted, trusted
    [o] = rotate_app(kv, cluster, app)
    assert o["state"] == "completed"
    kv.check_current(cluster, f"app:{app}", "after trusting the host")


def test_changed_host_key(kv, sshd_env):
    [app] = kv.apps("hk-changed", 1)
    wrong = "SHA256:" + "A" * 43
    cluster = kv.cluster("hk-changed", [app], fingerprint=wrong)
    gens = kv.gens(f"app:{app}")
    line = one_line_error(kv("rotate", "app", "--cluster", cluster, "--yes", app, code=1))
    assert "HOST KEY CHANGED" in line and wrong in line and sshd_env.host_key_fingerprint in line, (
        line
    )
    assert kv.rotations(cluster) == [] and kv.gens(f"app:{app}") == gens
    assert kv.json("secrets", "list", "--cluster", cluster) == []

    trusted = kv(
        "host", "trust", cluster, sshd_env.host, "--port", str(sshd_env.port), "--yes"
    ).stdout
    assert f"currently pinned: {wrong} (DIFFERENT)" in trusted, trusted
    [o] = rotate_app(kv, cluster, app)
    assert o["state"] == "completed"
    kv.check_current(cluster, f"app:{app}", "after pinning the offered key")


def test_wrong_su_password(kv, sshd_env, monkeypatch):
    monkeypatch.setenv("KEYVAULT_SU_PASSWORD_FILE", str(sshd_env.ta_password_file))
    cluster, app, scope = _prepared(kv, "su-wrong", user="kvops", become="su")
    password = "not-the-ta-password-7f3e"
    monkeypatch.setenv("KEYVAULT_SU_PASSWORD", password)  # wins over the file
    gens = kv.gens(scope)
    result = kv("rotate", "app", "--cluster", cluster, "--yes", app, code=1)
    line = one_line_error(result)
    assert "could not become ta with su" in line and "nothing was generated" in line, line
    assert password not in result.stdout + result.stderr
    assert kv.gens(scope) == gens
    [row] = kv.rotations(cluster, "failed")
    assert row["scope"] == scope
    kv.check_current(cluster, scope, "the stored key is untouched")

    monkeypatch.delenv("KEYVAULT_SU_PASSWORD")  # no password at all: refused before connecting
    monkeypatch.delenv("KEYVAULT_SU_PASSWORD_FILE")
    line = one_line_error(kv("rotate", "app", "--cluster", cluster, "--yes", app, code=2))
    assert "needs a password" in line, line
    assert kv.gens(scope) == gens


def test_tatool_missing(kv):
    [app] = kv.apps("notool", 1)
    scope = f"app:{app}"
    cluster = kv.cluster("notool", [app], user="tanotool", become="none")
    gens = kv.gens(scope)
    line = one_line_error(kv("rotate", "app", "--cluster", cluster, "--yes", app, code=1))
    assert "ta-tool is not on the PATH" in line and "nothing was generated" in line, line
    assert kv.gens(scope) == gens
    [row] = kv.rotations(cluster)
    assert row["state"] == "failed"
    assert kv.json("secrets", "list", "--cluster", cluster) == []


def test_unparsable_output_needs_recovery(kv):
    cluster, app, scope = _prepared(kv, "nokey")
    gens = kv.gens(scope)
    token = "build0123456789abcdef0123456789ab"  # a long token on a banner line: must be masked
    st.set_noise(kv.state_dir, output_mode="no_key", banner=[f"motd: {token}"])
    result = kv("rotate", "app", "--cluster", cluster, "--yes", app, code=1)
    line = one_line_error(result)
    rid = _only(kv.rotations(cluster, "needs_recovery"), scope)
    assert "has no key matching" in line and "generate success" in line, line
    assert "<masked " in line and token not in line, line
    assert f"keyvault rotations recover {rid}" in line, line
    assert_no_key(result.stdout + result.stderr, [kv.current(scope)], "needs_recovery error")
    assert kv.gens(scope) == gens + 1  # ta-tool ran (and printed no key)
    assert pending_file(rid, "out").exists(), "the remote pending file must be kept"
    assert kv.versions(cluster, scope) == 1


def test_two_candidate_keys_needs_recovery_then_recovered(kv):
    cluster, app, scope = _prepared(kv, "twokeys")
    gens = kv.gens(scope)
    st.set_noise(kv.state_dir, output_mode="two_keys")
    result = kv("rotate", "app", "--cluster", cluster, "--yes", app, code=1)
    st.clear_noise(kv.state_dir)
    line = one_line_error(result)
    rid = _only(kv.rotations(cluster, "needs_recovery"), scope)
    assert "2 candidate keys" in line and "<candidate key, 64 chars>" in line, line
    if KEY_TOKEN.search(result.stdout + result.stderr):
        pytest.fail("a key-shaped token was printed", pytrace=False)
    assert_no_key(result.stdout + result.stderr, [kv.current(scope)], "two_keys error")
    assert kv.gens(scope) == gens + 1
    assert kv.versions(cluster, scope) == 1
    # Nothing is lost: the key waits in the pending file, and a stricter pattern recovers it.
    if kv.current(scope) not in pending_file(rid, "out").read_text():
        pytest.fail("the valid key is not in the remote pending file", pytrace=False)
    kv("cluster", "set", cluster, "--key-pattern", r"(?<=secret: )[A-Za-z0-9]{64}")
    recover_and_check(kv, cluster, scope, rid, gens, old_version=1)


def test_tatool_fails_for_app(kv):
    cluster, app, scope = _prepared(kv, "failapp")
    gens = kv.gens(scope)
    st.set_noise(kv.state_dir, fail_apps=[app])
    line = one_line_error(kv("rotate", "app", "--cluster", cluster, "--yes", app, code=1))
    assert "ta-tool failed" in line and "ERROR: internal error" in line, line
    assert "nothing was generated" in line, line
    assert kv.gens(scope) == gens
    rows = kv.rotations(cluster, "failed")
    assert [r["scope"] for r in rows] == [scope]
    assert kv.versions(cluster, scope) == 1
    kv.check_current(cluster, scope, "the old key stays current and valid")
    st.clear_noise(kv.state_dir)
    [o] = rotate_app(kv, cluster, app)  # not blocked: a failed rotation is resolved
    assert o["state"] == "completed"
    kv.check_current(cluster, scope, "after ta-tool works again")


HOSTILE_APPIDS = ["x; rm -rf ~", "$(id)", "a'b", "a\nb", "-appid"]


def test_hostile_appids_refused(kv):
    [app] = kv.apps("hostile", 1)
    cluster = kv.cluster("hostile", [app])
    total = st.generations(kv.state_dir)
    for appid in HOSTILE_APPIDS:
        line = one_line_error(
            kv("rotate", "app", "--cluster", cluster, "--yes", "--", appid, code=2)
        )
        assert "invalid APPID" in line, line
        assert kv.cli("rotate", "app", "--cluster", cluster, "--yes", appid).exit_code == 2
    assert st.generations(kv.state_dir) == total
    assert kv.rotations(cluster) == []


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("user", "become"), [("root", "su"), ("kvops", "su"), ("kvsudo", "sudo"), ("ta", "none")]
)
def test_hostile_appids_quoted_when_the_pattern_allows_them(
    kv, sshd_env, monkeypatch, user, become
):
    """Even with an APPID pattern that accepts anything, the APPID reaches ta-tool as one
    quoted word through every become method (su -c, su on a PTY, sudo -i, a login shell):
    nothing is executed, ta-tool rejects the unknown APPID, nothing is generated."""
    monkeypatch.setenv("KEYVAULT_SU_PASSWORD_FILE", str(sshd_env.ta_password_file))
    canary = Path("/tmp") / f"kvit-canary-{os.getpid()}"
    canary.unlink(missing_ok=True)
    home = Path(os.environ["KEYVAULT_HOME"])
    with (home / "keyvault.toml").open("a") as f:
        f.write("\n[validation]\nappid_pattern = '(?s).+'\n")
    [app] = kv.apps("hostile-q", 1)
    cluster = kv.cluster(f"hostile-q-{user}", [app], user=user, become=become)
    total = st.generations(kv.state_dir)
    hostile = [
        f"x; touch {canary}",
        f"$(touch {canary})",
        f"`touch {canary}`",
        f"a'b; touch {canary}; '",
        f"a\ntouch {canary}",
        f'a"; touch {canary}; "',
    ]
    for appid in hostile:
        line = one_line_error(
            kv("rotate", "app", "--cluster", cluster, "--yes", "--", appid, code=1)
        )
        assert "ta-tool failed" in line and "does not exist" in line, line
    line = one_line_error(
        kv("rotate", "app", "--cluster", cluster, "--yes", "--", "-appid", code=2)
    )
    assert "must not start with '-'" in line, line
    assert not canary.exists(), "a hostile APPID was executed by a shell"
    assert st.generations(kv.state_dir) == total
    assert {r["state"] for r in kv.rotations(cluster)} == {"failed"}


# ------------------------------------------------------------------- 6. no key in output


@SQLITE_ONLY
def test_no_key_in_any_output(kv, caplog, capfd):
    import logging

    caplog.set_level(logging.DEBUG, logger="keyvault")
    [app] = kv.apps("nokeyout", 1)
    scope = f"app:{app}"
    cluster = kv.cluster("nokeyout", [app])
    keys = [kv.current(scope)]  # the key before (None for a new APPID)
    texts = []

    proc = kv.run("-vv", "rotate", "app", "--cluster", cluster, "--yes", app)
    assert proc.returncode == 0, masked(proc.stderr)
    texts += [proc.stdout, proc.stderr]
    keys.append(kv.current(scope))

    paramiko_level = logging.getLogger("paramiko").level
    try:
        for args in (
            ["-vv", "rotate", "app", "--cluster", cluster, "--yes", app],
            ["-vv", "rotate", "app", "--cluster", cluster, "--yes", "--json", app],
            ["-vv", "verify", "--cluster", cluster, "--appid", app],
            ["-vv", "rotations", "list"],
            ["-vv", "secrets", "show", "--cluster", cluster, "--appid", app],
            ["-vv", "secrets", "history", "--cluster", cluster, "--appid", app, "--json"],
        ):
            result = kv(*args)
            texts += [result.stdout, result.stderr]
            keys.append(kv.current(scope))
        rid = kv.rotations(cluster)[0]["id"]
        result = kv("-vv", "rotations", "show", rid)
        texts += [result.stdout, result.stderr]
    finally:
        logging.getLogger("paramiko").setLevel(paramiko_level)

    captured = capfd.readouterr()
    texts += [captured.out, captured.err, caplog.text]
    texts += [str(r.args) for r in caplog.records]
    assert any(r.name.startswith("keyvault.") for r in caplog.records), (
        "no keyvault log record was captured"
    )
    distinct = len({k for k in keys if k})
    assert distinct >= 3  # three rotations happened
    assert_no_key("\n".join(texts), keys, "stdout/stderr/logs of rotations")
