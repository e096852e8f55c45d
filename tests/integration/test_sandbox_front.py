"""The sandbox SSH front, in-process on a free loopback port, driven by keyvault's real
paramiko client: only keyvault's own scripts run, everything else is refused."""

from __future__ import annotations

import threading

import paramiko
import pytest

from keyvault import tahost
from keyvault.errors import AuthenticationFailed, HostKeyError
from keyvault.sandbox import state as st
from keyvault.sandbox.run import SandboxPaths
from keyvault.sandbox.sshfront import REFUSED_STATUS, SshFront, classify, ensure_ed25519_key
from keyvault.ssh import SshTarget, sha256_fingerprint
from keyvault.ssh.paramiko_transport import ParamikoConnector
from tests.support.timeouts import TIMEOUT

ROOT_CMD = "ta-tool generate_root_secret"
PATTERN = r"[A-Za-z0-9]{64}"
SU = tahost.Become("su", ta_user="ta", ssh_user="root")


def app_cmd(appid: str) -> str:
    return tahost.render_command("ta-tool generate_api_secret -appid {appid}", appid)


@pytest.fixture
def paths(tmp_path) -> SandboxPaths:
    paths = SandboxPaths(tmp_path / "kvhome")
    paths.prepare(["demo", "app1"])
    return paths


@pytest.fixture
def front(paths):
    front = SshFront(
        host_key_file=paths.host_key,
        authorized_keys_file=paths.authorized_keys,
        ta_home=paths.ta_home,
        bin_dir=paths.bin_dir,
        port=0,
    )
    front.start()
    try:
        yield front
    finally:
        front.stop()


def target(front, paths, **changes) -> SshTarget:
    fields = {
        "address": "127.0.0.1",
        "port": front.port,
        "username": "root",
        "identity_file": str(paths.client_key),
        "pinned_fingerprint": front.host_key_fingerprint,
    }
    fields.update(changes)
    return SshTarget(**fields)


@pytest.fixture
def conn(front, paths):
    connection = ParamikoConnector(connect_timeout=10).connect(target(front, paths))
    try:
        yield connection
    finally:
        connection.close()


def generate(conn, rid: str, command: str, become=SU):
    result = conn.run(become.wrap(tahost.generate_script(rid, command)), timeout=TIMEOUT)
    assert result.exit_status == 0
    remote = tahost.parse_remote(rid, result.output)
    assert remote.state == "result" and remote.rc == 0
    return remote


def test_host_key_file_is_private_and_fingerprint_matches(front, paths):
    assert paths.host_key.stat().st_mode & 0o777 == 0o600
    assert paths.client_key.stat().st_mode & 0o777 == 0o600
    key = ensure_ed25519_key(paths.host_key)
    assert front.host_key_fingerprint == sha256_fingerprint(key.asbytes())
    assert front.host_key_fingerprint.startswith("SHA256:")


def test_check_script_through_su(conn, paths):
    result = conn.run(SU.wrap(tahost.check_script(ROOT_CMD)), timeout=TIMEOUT)
    assert result.exit_status == 0
    assert f":{paths.ta_tool}@@" in result.output.decode()
    assert st.generations(paths.state_dir) == 0


@pytest.mark.parametrize("method", ["su", "sudo", "none"])
def test_every_become_wrapper_runs(conn, paths, method):
    become = tahost.Become(method, ta_user="ta", ssh_user="ta" if method == "none" else "root")
    result = conn.run(become.wrap(tahost.check_script(ROOT_CMD)), timeout=TIMEOUT)
    assert result.exit_status == 0
    assert "@@KV:check:OK:" in result.output.decode()


def test_generate_root_and_app_capture_the_valid_key(conn, paths):
    root = generate(conn, "rot-root-1", ROOT_CMD)
    assert tahost.find_keys(root.output, PATTERN) == [st.current_key(paths.state_dir, "root")]
    app = generate(conn, "rot-app-1", app_cmd("demo"))
    assert tahost.find_keys(app.output, PATTERN) == [st.current_key(paths.state_dir, "app:demo")]
    assert st.generations(paths.state_dir, "root") == 1
    assert st.generations(paths.state_dir, "app:demo") == 1
    # the pending file is private to "ta"
    pending = paths.pending_dir / "rot-app-1.out"
    assert pending.stat().st_mode & 0o077 == 0


def test_fetch_returns_the_same_output_and_cleanup_leaves_a_tombstone(conn, paths):
    rid = "rot-fetch-1"
    generated = generate(conn, rid, app_cmd("app1"))
    fetched = conn.run(SU.wrap(tahost.fetch_script(rid)), timeout=TIMEOUT)
    assert fetched.exit_status == 0
    again = tahost.parse_remote(rid, fetched.output)
    assert again.state == "result" and again.output == generated.output and again.rc == 0
    # a second generate of the same rotation id never runs ta-tool again
    rerun = conn.run(SU.wrap(tahost.generate_script(rid, app_cmd("app1"))), timeout=TIMEOUT)
    assert rerun.exit_status == 73
    assert st.generations(paths.state_dir, "app:app1") == 1

    cleaned = conn.run(SU.wrap(tahost.cleanup_script(rid)), timeout=TIMEOUT)
    assert cleaned.exit_status == 0
    assert tahost.parse_remote(rid, cleaned.output).state == "cleaned"
    assert (paths.pending_dir / f"{rid}.done").exists()
    assert not (paths.pending_dir / f"{rid}.out").exists()
    assert (paths.pending_dir / f"{rid}.done").read_bytes() == b""
    after = conn.run(SU.wrap(tahost.fetch_script(rid)), timeout=TIMEOUT)
    assert tahost.parse_remote(rid, after.output).state == "cleaned"


def _hostile_commands():
    rid = "rot-evil-1"
    gen = tahost.generate_script(rid, app_cmd("demo"))
    batch = tahost.generate_many_script(
        [(rid, app_cmd("demo")), ("rot-evil-2", ROOT_CMD)], clean_from_stdin=True
    )
    assert (
        f"in {rid}|rot-evil-2)" in batch
        and "; kv_gen rot-evil-2 ta-tool" in batch
        and "exec ${kv_cmd}" in batch
    )
    return {
        "id": "id",
        "sh -c id": "sh -c 'id'",
        "appended rm": SU.wrap(gen + "; rm -rf ~"),
        "appended inside wrap": SU.wrap(gen) + "; id",
        "hostile appid": SU.wrap(tahost.generate_script(rid, app_cmd("x$(id)"))),
        "hostile appid with ;": SU.wrap(tahost.generate_script(rid, app_cmd("demo; rm -rf ~"))),
        "other ta user": tahost.Become("su", ta_user="root").wrap(gen),
        "other tool": SU.wrap(tahost.generate_script(rid, "rm -rf /tmp/x")),
        "bad rid": SU.wrap(gen.replace(rid, "ROT-EVIL")),
        "empty": "",
        "unbalanced quote": "su - ta -c 'id",
        "batch with a command appended": SU.wrap(batch + "; id"),
        "batch whose clean-up takes any id": SU.wrap(
            batch.replace(f"in {rid}|rot-evil-2)", "in *)")
        ),
        "batch with a part that is not keyvault's": SU.wrap(
            batch.replace("; kv_gen rot-evil-2", "; id; kv_gen rot-evil-2")
        ),
        "batch whose rotation body runs something else": SU.wrap(
            batch.replace("exec ${kv_cmd}", "exec id")
        ),
        "batch call with a command of its own": SU.wrap(
            batch.replace(
                "kv_gen rot-evil-2 ta-tool 'ta-tool", "kv_gen rot-evil-2 ta-tool 'id; ta-tool"
            )
        ),
    }


@pytest.mark.parametrize("name", sorted(_hostile_commands()))
def test_anything_else_is_refused_and_generates_nothing(conn, paths, name):
    command = _hostile_commands()[name]
    assert classify(command) is None
    before = st.generations(paths.state_dir)
    result = conn.run(command, timeout=TIMEOUT)
    assert result.exit_status == REFUSED_STATUS
    assert b"sandbox: refusing command" in result.output
    assert b"@@KV:" not in result.output
    assert st.generations(paths.state_dir) == before
    assert not paths.pending_dir.exists() or not any(paths.pending_dir.iterdir())


def test_a_batch_runs_and_cleans_up_only_the_ids_sent_on_stdin(conn, paths):
    from keyvault.ssh import StdinReply

    jobs = [
        ("rot-batch-1", app_cmd("demo")),
        ("rot-batch-2", ROOT_CMD),
        ("rot-batch-3", app_cmd("app1")),
    ]
    script = tahost.generate_many_script(jobs, clean_from_stdin=True)
    assert classify(SU.wrap(script)).batch == 3
    seen = bytearray()

    def on_output(chunk: bytes):
        seen.extend(chunk)
        if tahost.cleanup_marker("rot-batch-1").encode() in seen:
            return StdinReply(b"rot-batch-1\nrot-batch-3\nrot-other-9\n", close=True)
        return None

    result = conn.run(SU.wrap(script), timeout=TIMEOUT, on_output=on_output)
    assert result.exit_status == 0
    for rid, scope in (
        ("rot-batch-1", "app:demo"),
        ("rot-batch-2", "root"),
        ("rot-batch-3", "app:app1"),
    ):
        remote = tahost.parse_remote(rid, result.output[: tahost.report_end(rid, result.output)])
        assert remote.state == "result" and tahost.find_keys(remote.output, PATTERN) == [
            st.current_key(paths.state_dir, scope)
        ]
    text = result.output.decode()
    assert "@@KV:rot-batch-1:CLEANED@@" in text and "@@KV:rot-batch-3:CLEANED@@" in text
    assert "rot-batch-2:CLEANED" not in text and "rot-other-9" not in text
    assert (paths.pending_dir / "rot-batch-1.done").exists() and not (
        paths.pending_dir / "rot-batch-1.out"
    ).exists()
    assert (paths.pending_dir / "rot-batch-2.out").exists()  # not sent: its key stays for recovery
    # The end-of-run clean-up (one command for many ids) cleans the rest.
    swept = conn.run(
        SU.wrap(tahost.cleanup_many_script(["rot-batch-2", "rot-batch-3"])), timeout=TIMEOUT
    )
    assert swept.exit_status == 0 and b"@@KV:rot-batch-2:CLEANED@@" in swept.output
    assert (
        not (paths.pending_dir / "rot-batch-2.out").exists()
        and (paths.pending_dir / "rot-batch-2.done").exists()
    )


def test_pty_shell_and_subsystem_are_refused(front, paths):
    connection = ParamikoConnector().connect(target(front, paths))
    try:
        transport = connection._transport
        for request in ("get_pty", "invoke_shell", "subsystem"):
            chan = transport.open_session(timeout=TIMEOUT)
            try:
                with pytest.raises(paramiko.SSHException):  # noqa: PT012
                    if request == "subsystem":
                        chan.invoke_subsystem("sftp")
                    else:
                        getattr(chan, request)()
            finally:
                chan.close()
        with pytest.raises(paramiko.ChannelException):
            transport.open_channel(
                "direct-tcpip", ("127.0.0.1", front.port), ("127.0.0.1", 1), timeout=TIMEOUT
            )
    finally:
        connection.close()


def test_many_channels_on_one_connection_and_many_connections(front, paths, conn):
    # one connection, channels one after another (well past MaxSessions in total)
    for _ in range(40):
        assert conn.run(SU.wrap(tahost.check_script(ROOT_CMD)), timeout=TIMEOUT).exit_status == 0
    # several connections at once, each generating for its own scope
    apps = ["demo", "app1"]
    errors: list[BaseException] = []

    def rotate(appid: str, n: int) -> None:
        try:
            connection = ParamikoConnector().connect(target(front, paths))
            try:
                generate(connection, f"rot-par-{appid}-{n}", app_cmd(appid))
            finally:
                connection.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=rotate, args=(a, n)) for a in apps for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not errors
    for appid in apps:
        assert st.generations(paths.state_dir, f"app:{appid}") == 3


def test_wrong_client_key_is_refused(front, paths, tmp_path):
    other = tmp_path / "other_key"
    ensure_ed25519_key(other)
    with pytest.raises(AuthenticationFailed):
        ParamikoConnector().connect(target(front, paths, identity_file=str(other)))


def test_wrong_pinned_fingerprint_is_refused(front, paths, tmp_path):
    other = ensure_ed25519_key(tmp_path / "other_host_key")
    wrong = sha256_fingerprint(other.asbytes())
    with pytest.raises(HostKeyError):
        ParamikoConnector().connect(target(front, paths, pinned_fingerprint=wrong))
    assert st.generations(paths.state_dir) == 0


def test_only_loopback():
    with pytest.raises(ValueError):  # noqa: PT011
        SshFront(
            host_key_file="unused",
            authorized_keys_file="unused",
            ta_home="unused",
            bin_dir="unused",
            host="0.0.0.0",
        )


def test_at_most_max_sessions_channels_at_once(front, paths, conn):
    transport = conn._transport
    channels = []
    try:
        for _ in range(front.max_sessions):
            channels.append(transport.open_session(timeout=TIMEOUT))
        with pytest.raises(paramiko.ChannelException):
            transport.open_session(timeout=TIMEOUT)
        channels.pop().close()

        def reopened() -> bool:  # the server sees the close asynchronously
            try:
                channels.append(transport.open_session(timeout=TIMEOUT))
            except paramiko.ChannelException:
                return False
            return True

        wait_for(reopened, "a free session slot")
    finally:
        for chan in channels:
            chan.close()


def wait_for(predicate, what: str, timeout: float = TIMEOUT) -> None:
    """Bounded polling (not a sleep standing in for synchronisation)."""
    event = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        event.wait(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_dropped_connection_mid_generate_keeps_the_key_for_fetch(front, paths, tmp_path):
    release = tmp_path / "release"
    st.set_noise(paths.state_dir, hold_file=str(release))
    rid = "rot-drop-1"
    first = ParamikoConnector().connect(target(front, paths))
    results = []
    runner = threading.Thread(
        target=lambda: results.append(
            first.run(SU.wrap(tahost.generate_script(rid, app_cmd("demo"))), timeout=TIMEOUT)
        )
    )
    runner.start()
    try:
        wait_for(lambda: (paths.state_dir / "holding").exists(), "ta-tool to hold")
        first.close()  # the connection drops while ta-tool runs
        runner.join(TIMEOUT)
        assert results and results[0].exit_status is None
    finally:
        release.touch()
        first.close()
        runner.join(TIMEOUT)
    wait_for(lambda: (paths.pending_dir / f"{rid}.rc").exists(), "the script to finish")
    st.clear_noise(paths.state_dir)
    second = ParamikoConnector().connect(target(front, paths))
    try:
        fetched = tahost.parse_remote(
            rid, second.run(SU.wrap(tahost.fetch_script(rid)), timeout=TIMEOUT).output
        )
    finally:
        second.close()
    assert fetched.state == "result" and fetched.rc == 0
    assert tahost.find_keys(fetched.output, PATTERN) == [
        st.current_key(paths.state_dir, "app:demo")
    ]
    assert st.generations(paths.state_dir, "app:demo") == 1


def test_stop_with_open_connections_and_a_running_command(paths, tmp_path):
    release = tmp_path / "release"  # never created: the command is still running at stop()
    st.set_noise(paths.state_dir, hold_file=str(release), hold_before_print=True)
    front = SshFront(
        host_key_file=paths.host_key,
        authorized_keys_file=paths.authorized_keys,
        ta_home=paths.ta_home,
        bin_dir=paths.bin_dir,
        port=0,
    )
    front.start()
    connection = ParamikoConnector().connect(target(front, paths))
    results = []
    runner = threading.Thread(
        target=lambda: results.append(
            connection.run(SU.wrap(tahost.generate_script("rot-stop-1", ROOT_CMD)), timeout=TIMEOUT)
        )
    )
    runner.start()
    try:
        wait_for(lambda: (paths.state_dir / "holding").exists(), "ta-tool to hold")
        front.stop()
        runner.join(TIMEOUT)
        assert results and results[0].exit_status is None
    finally:
        front.stop()
        connection.close()
        runner.join(TIMEOUT)
