"""The real-sshd test environment made by ``tests/sshd/setup.sh`` (stdlib only).

``setup.sh`` writes ``sshd.json`` (default ``/var/lib/keyvault-test/sshd.json``;
``$KEYVAULT_TEST_SSHD`` points elsewhere). This module reads it and gives tests a
few tools around that sshd::

    env = require_sshd(load_sshd_env())     # skip, or fail under KEYVAULT_TEST_REQUIRE_SSHD=1
    env.identity("kvops"), env.ta_password(), env.known_hosts_file, env.port
    kill_session_processes(env, "kvops")    # drop every SSH connection of kvops now
    restart_sshd(env)                       # new listener (open sessions survive)
    ta_tool_state(env)                      # the emulator's state dir (keyvault.sandbox.state)

Logins made by setup.sh: ``root`` (``su - ta`` needs no password), ``kvops`` (must
type ``env.ta_password()`` at su's prompt, on a PTY), ``kvsudo`` (``sudo -n -iu ta``),
``ta`` (ta-tool on the PATH of a *login* shell only) and ``tanotool`` (no ta-tool).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.timeouts import TIMEOUT

ENV_VAR = "KEYVAULT_TEST_SSHD"
REQUIRE_VAR = "KEYVAULT_TEST_REQUIRE_SSHD"
DEFAULT_PATH = Path("/var/lib/keyvault-test/sshd.json")
SETUP_HINT = (
    'run `sudo tests/sshd/setup.sh --python "$PWD/.venv/bin/python"` (it writes '
    f"{DEFAULT_PATH}; set {ENV_VAR} to use another sshd.json)"
)
LOGINS = ("root", "kvops", "kvsudo", "ta", "tanotool")


@dataclass(frozen=True)
class SshdUser:
    name: str
    identity: Path  # private key file (root-only, 0600)


@dataclass(frozen=True)
class SshdEnv:
    """Everything in sshd.json. Instances are frozen but hold a dict: do not hash."""

    source: Path
    host: str
    port: int
    host_key_fingerprint: str  # "SHA256:..."
    host_public_key: str  # "ssh-ed25519 AAAA..."
    known_hosts_file: Path  # one line: "[host]:port <host_public_key>"
    ta_password_file: Path
    tatool_state_dir: Path
    tatool_bin: str
    users: Mapping[str, SshdUser]
    sshd_pid_file: Path
    sshd_config: Path
    sshd_log: Path
    sshd_bin: str = "/usr/sbin/sshd"
    python: str | None = None  # the venv python that the ta-tool wrapper runs
    raw: Mapping[str, object] = field(default_factory=dict, repr=False, compare=False)

    def identity(self, user: str) -> Path:
        try:
            return self.users[user].identity
        except KeyError:
            raise KeyError(
                f"sshd.json has no login {user!r} (has: {', '.join(self.users)})"
            ) from None

    def ta_password(self) -> str:
        return self.ta_password_file.read_text().strip()

    def known_hosts_line(self) -> str:
        return f"[{self.host}]:{self.port} {self.host_public_key}"

    def listener_pid(self) -> int | None:
        return _listener_pid(self.sshd_pid_file)

    def ssh_argv(self, user: str, *command: str, tty: bool = False) -> list[str]:
        """argv for the OpenSSH client logging in as user (strict host key checking)."""
        argv = [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(self.port),
            "-i",
            str(self.identity(user)),
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts_file}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
        ]
        if tty:
            argv.append("-tt")
        return [*argv, f"{user}@{self.host}", *command]

    def log_tail(self, lines: int = 30) -> str:
        """The end of sshd's log (for assertion messages)."""
        try:
            return "\n".join(self.sshd_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(cannot read {self.sshd_log}: {exc})"


def sshd_json_path() -> Path:
    """$KEYVAULT_TEST_SSHD, else the default path."""
    raw = os.environ.get(ENV_VAR, "").strip()
    return Path(raw) if raw else DEFAULT_PATH


def load_sshd_env(path: str | os.PathLike[str] | None = None) -> SshdEnv | None:
    """Read sshd.json; None when it does not exist. A malformed file raises ValueError."""
    src = Path(path) if path is not None else sshd_json_path()
    try:
        data = json.loads(src.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {src}: {exc}; {SETUP_HINT}") from None
    try:
        users = {
            name: SshdUser(name=name, identity=Path(u["identity"]))
            for name, u in data["users"].items()
        }
        host, port = data["host"], int(data["port"])
        return SshdEnv(
            source=src,
            host=host,
            port=port,
            host_key_fingerprint=data["host_key_fingerprint"],
            host_public_key=data["host_public_key"],
            known_hosts_file=Path(data.get("known_hosts_file") or src.with_name("known_hosts")),
            ta_password_file=Path(data["ta_password_file"]),
            tatool_state_dir=Path(data["tatool_state_dir"]),
            tatool_bin=data["tatool_bin"],
            users=users,
            sshd_pid_file=Path(data["sshd_pid_file"]),
            sshd_config=Path(data["sshd_config"]),
            sshd_log=Path(data["sshd_log"]),
            sshd_bin=data.get("sshd_bin") or "/usr/sbin/sshd",
            python=data.get("python"),
            raw=data,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{src} is missing or has a bad field ({exc!r}); {SETUP_HINT}") from None


def _required() -> bool:
    return os.environ.get(REQUIRE_VAR, "").strip().lower() in {"1", "true", "yes", "on"}


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_sshd(env: SshdEnv | None) -> SshdEnv:
    """Return env if the sshd is usable; else pytest.fail (KEYVAULT_TEST_REQUIRE_SSHD=1)
    or pytest.skip, with a message naming tests/sshd/setup.sh."""
    import pytest  # only the test process needs it

    problem = None
    if env is None:
        problem = f"no sshd test environment: {sshd_json_path()} does not exist"
    elif os.geteuid() != 0:
        problem = "the sshd tests run as root (the client keys and ta's password are root-only)"
    elif not port_open(env.host, env.port):
        problem = f"the test sshd from {env.source} does not answer on {env.host}:{env.port}"
    else:
        missing = [u for u in LOGINS if u not in env.users or not env.users[u].identity.exists()]
        if missing:
            problem = f"{env.source} lacks identities for {', '.join(missing)}"
    if problem is None:
        assert env is not None
        return env
    message = f"{problem}; {SETUP_HINT}"
    if _required():
        pytest.fail(f"{REQUIRE_VAR}=1 but {message}", pytrace=False)
    pytest.skip(message)
    raise AssertionError("unreachable")  # pytest.skip raises


# ----------------------------------------------------------------------------- processes


def _listener_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"sshd" in cmdline else None


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The comm field may hold spaces and parentheses: parse after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[1])  # fields[0] is the state
    except (IndexError, ValueError):
        return None


def _descends_from(pid: int, ancestor: int) -> bool:
    seen = set()
    while pid not in seen and pid > 1:
        seen.add(pid)
        parent = _ppid(pid)
        if parent is None:
            return False
        if parent == ancestor:
            return True
        pid = parent
    return False


def session_pids(env: SshdEnv, user: str) -> list[int]:
    """Per-connection sshd processes of user under the listener ("sshd: USER [priv]",
    "sshd: USER@notty", "sshd: USER@pts/N", ...), monitor processes first."""
    listener = env.listener_pid()
    if listener is None:
        return []
    title = re.compile(rb"^sshd(?:-session)?: " + re.escape(user.encode()) + rb"(?:[ @]|$)")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").strip()
        except OSError:
            continue  # gone, or a zombie with no cmdline
        if title.match(cmdline) and _descends_from(pid, listener):
            found.append((b"[priv]" not in cmdline, pid))
    return [pid for _, pid in sorted(found)]


def kill_session_processes(env: SshdEnv, user: str) -> int:
    """SIGKILL the per-connection sshd processes serving user (a dropped connection:
    the client sees EOF/reset; the remote command itself is not killed, as on a real
    network failure). Returns how many processes were killed."""
    killed = 0
    for pid in session_pids(env, user):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed


def wait_for_port(host: str, port: int, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not port_open(host, port, timeout=0.5):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing accepts connections on {host}:{port} after {timeout} s")
        time.sleep(0.1)


def stop_sshd(env: SshdEnv, timeout: float = 5.0) -> None:
    """Stop the listener (open sessions go on, as with a real sshd restart)."""
    pid = env.listener_pid()
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    with contextlib.suppress(OSError):
        env.sshd_pid_file.unlink()


def start_sshd(env: SshdEnv, timeout: float = TIMEOUT) -> int:
    """Start the listener from env's config; return its pid once it accepts connections."""
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    subprocess.run(
        [env.sshd_bin, "-f", str(env.sshd_config), "-E", str(env.sshd_log)],
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )
    deadline = time.monotonic() + timeout
    while True:
        pid = env.listener_pid()
        if pid is not None and port_open(env.host, env.port, timeout=0.5):
            return pid
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"sshd did not come back on {env.host}:{env.port} within {timeout} s\n"
                + env.log_tail()
            )
        time.sleep(0.1)


def restart_sshd(env: SshdEnv, timeout: float = TIMEOUT) -> int:
    """Stop and start the test sshd; return the new listener pid."""
    stop_sshd(env)
    return start_sshd(env, timeout=timeout)


def ta_tool_state(env: SshdEnv) -> Path:
    """The state dir of the ta-tool emulator (use keyvault.sandbox.state on it)."""
    return env.tatool_state_dir


def hold_file_path(env: SshdEnv, name: str = "release") -> Path:
    """A path for the emulator's ``hold_file`` noise option that the ta user can see.

    ta-tool runs as ta and polls for this file: put it in the (ta-owned, 0700) state
    dir, not in pytest's tmp_path (0700 root), where ta would wait the full 120 s.
    Removes a leftover file of that name."""
    path = env.tatool_state_dir / f"hold-{name}"
    with contextlib.suppress(OSError):
        path.unlink()
    return path
