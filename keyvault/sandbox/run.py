"""The TA simulator as one background process: ta-tool emulator, Open API emulator, SSH front.

A simulator for trying keyvault and for tests, not TA. Everything lives under
``<KEYVAULT_HOME>/sandbox`` (see :class:`SandboxPaths`) and binds 127.0.0.1 only.

    serve(paths, ssh_port, api_port)       run both servers in this process until SIGTERM
    start_background(paths, ...)           spawn ``python -m keyvault.sandbox.run serve``
    stop(paths), status(paths)             by the pid file (flock'd while the server lives)

Registering the running simulator in the store is :mod:`keyvault.sandbox.registration`.

``sandbox.log`` gets startup lines and one line per SSH command (its kind, never its
output) and per Open API request (its path, never the token): no key ever goes there.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import keyvault
from keyvault.errors import KeyvaultError
from keyvault.fsutil import atomic_write
from keyvault.sandbox import state as st

if TYPE_CHECKING:
    from keyvault.sandbox.sshfront import SshFront

_Server = TypeVar("_Server")

DEFAULT_SSH_PORT = 2022
DEFAULT_API_PORT = 8992
DEFAULT_APPS = ("demo", "app1", "app2", "app3")
LOOPBACK = "127.0.0.1"
TA_USER = "ta"
SSH_USER = "root"
LOGIN_NAME = "root"  # the cluster's login_name for open/project-list
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
_POLL = 0.05
_PROCESS_MARK = b"keyvault.sandbox.run"

log = logging.getLogger("keyvault.sandbox.run")


class SandboxError(KeyvaultError):
    """The TA simulator could not be started, stopped or read."""

    code = "sandbox_error"


class SandboxPaths:
    """Files of the simulator under ``<home>/sandbox`` (``home`` is KEYVAULT_HOME)."""

    def __init__(self, home) -> None:
        self.home = Path(home)
        self.root = self.home / "sandbox"
        self.state_dir = self.root / "state"
        self.ta_home = self.root / "ta-home"
        self.pending_dir = self.ta_home / ".keyvault" / "pending"
        self.bin_dir = self.root / "bin"
        self.ta_tool = self.bin_dir / "ta-tool"
        self.host_key = self.root / "ssh_host_ed25519_key"
        self.client_key = self.root / "client_ed25519_key"
        self.client_public_key = self.root / "client_ed25519_key.pub"
        self.authorized_keys = self.root / "authorized_keys"
        self.pid_file = self.root / "sandbox.pid"
        self.info_file = self.root / "sandbox.json"
        self.log_file = self.root / "sandbox.log"

    def __repr__(self) -> str:
        return f"SandboxPaths({str(self.root)!r})"

    @property
    def prepared(self) -> bool:
        return (self.state_dir / "state.json").exists()

    def prepare(self, apps=()) -> None:
        """Create (or complete) the sandbox: state, wrapper, keys. Idempotent; keys are kept."""
        from keyvault.sandbox.sshfront import ensure_ed25519_key, public_key_line  # noqa: PLC0415 - paramiko: ~0.13 s, on demand

        for directory in (self.root, self.ta_home, self.bin_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        st.init_state(self.state_dir, list(apps))
        st.install_wrapper(self.ta_tool, self.state_dir, pythonpath=_source_root())
        ensure_ed25519_key(self.host_key, comment="keyvault-sandbox-host")
        client = ensure_ed25519_key(
            self.client_key, comment="keyvault-sandbox-client", public_file=self.client_public_key
        )
        wanted = public_key_line(client, "keyvault-sandbox-client") + "\n"
        try:
            current = self.authorized_keys.read_text()
        except FileNotFoundError:
            current = None
        if current != wanted:
            atomic_write(self.authorized_keys, wanted.encode(), mode=0o600)


def _source_root() -> str:
    """The directory holding the ``keyvault`` package (a checkout or site-packages)."""
    return str(Path(keyvault.__file__).resolve().parent.parent)


# --- liveness ---------------------------------------------------------------------------


def _lock_held(pid_file: Path) -> bool:
    """True while a serving process holds the pid file's flock (released when it exits,
    even if it then lingers as a zombie)."""
    try:
        fd = os.open(pid_file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _is_sandbox_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists() and _pid_alive(pid)  # no /proc: trust the lock
    except OSError:
        return False
    return _PROCESS_MARK in cmdline


def _read_pid(paths: SandboxPaths) -> int | None:
    try:
        text = paths.pid_file.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _read_info(paths: SandboxPaths) -> dict | None:
    try:
        return json.loads(paths.info_file.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _running_pid(paths: SandboxPaths) -> int | None:
    """The pid of the live sandbox server, or None."""
    deadline = time.monotonic() + 1.0
    while _lock_held(paths.pid_file):
        pid = _read_pid(paths)  # written just after the lock is taken
        if pid is not None:
            return pid if _is_sandbox_process(pid) else None
        if time.monotonic() > deadline:
            return None
        time.sleep(_POLL)
    return None


def _remove_stale(paths: SandboxPaths) -> None:
    if not _lock_held(paths.pid_file):
        for path in (paths.info_file, paths.pid_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def status(paths: SandboxPaths) -> dict:
    """``{"running": bool, "pid", ...sandbox.json, "apps": {appid: {project_id, generations}},
    "root_generations"}``; no key."""
    pid = _running_pid(paths)
    result: dict = {
        "running": pid is not None,
        "pid": pid,
        "root": str(paths.root),
        "simulator": True,
    }
    info = _read_info(paths) if pid is not None else None
    if info and info.get("pid") == pid:
        result.update({k: v for k, v in info.items() if k != "pid"})
    if paths.prepared:
        state = st.read_state(paths.state_dir)
        result["apps"] = {
            appid: {"project_id": a["project_id"], "generations": a["generations"]}
            for appid, a in sorted(state["apps"].items())
        }
        result["root_generations"] = state["root"]["generations"]
    return result


# --- the server process -----------------------------------------------------------------


def _bind_with_fallback(what: str, make: Callable[[int], _Server], port: int) -> _Server:
    try:
        return make(port)
    except OSError as exc:
        if port == 0 or exc.errno not in (errno.EADDRINUSE, errno.EACCES):
            raise
        log.warning("%s: port %d is taken (%s); using a free port", what, port, exc.strerror)
        return make(0)


def _take_pid_lock(paths: SandboxPaths) -> int:
    fd = os.open(paths.pid_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + 2.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            # a status() probe holds a shared lock for an instant; a server holds it for good
            if time.monotonic() > deadline:
                os.close(fd)
                raise SandboxError(
                    f"the sandbox in {paths.root} is already running",
                    hint="see `keyvault sandbox status`",
                ) from None
            time.sleep(_POLL)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)
    return fd


def _release_pid_lock(paths: SandboxPaths, lock_fd: int) -> None:
    for path in (paths.info_file, paths.pid_file):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    os.close(lock_fd)


def _stop_on_signals(stack: contextlib.ExitStack, stop_event: threading.Event) -> None:
    """SIGTERM/SIGINT set ``stop_event`` until ``stack`` closes (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.signal(sig, lambda *_: stop_event.set())
        stack.callback(signal.signal, sig, previous)


def _start_openapi(stack: contextlib.ExitStack, paths: SandboxPaths, port: int) -> int:
    """Serve the Open API emulator in a thread until ``stack`` closes; return its port."""
    from keyvault.sandbox.openapi import make_server  # noqa: PLC0415 - ~45 ms; only the sandbox process serves it

    api = _bind_with_fallback(
        "Open API emulator", lambda p: make_server(paths.state_dir, LOOPBACK, p), port
    )
    thread = threading.Thread(
        target=api.serve_forever, args=(0.2,), name="sandbox-openapi", daemon=True
    )
    thread.start()

    def shut() -> None:
        api.shutdown()
        api.server_close()
        thread.join(STOP_TIMEOUT)

    stack.callback(shut)
    return int(api.server_address[1])


def _start_front(stack: contextlib.ExitStack, paths: SandboxPaths, port: int) -> SshFront:
    """Start the SSH front until ``stack`` closes."""
    from keyvault.sandbox.sshfront import SshFront  # noqa: PLC0415 - paramiko: ~0.13 s, on demand

    def make_front(port: int) -> SshFront:
        candidate = SshFront(
            host_key_file=paths.host_key,
            authorized_keys_file=paths.authorized_keys,
            ta_home=paths.ta_home,
            bin_dir=paths.bin_dir,
            port=port,
            ta_user=TA_USER,
        )
        candidate.start()
        return candidate

    front: SshFront = _bind_with_fallback("SSH front", make_front, port)
    stack.callback(front.stop)
    return front


def _server_info(paths: SandboxPaths, front: SshFront, api_port: int) -> dict[str, Any]:
    """What ``sandbox.json`` says about the running simulator (never a key)."""
    return {
        "pid": os.getpid(),
        "simulator": True,
        "host": LOOPBACK,
        "ssh_port": front.port,
        "api_port": api_port,
        "open_api_url": f"http://{LOOPBACK}:{api_port}",
        "host_key_fingerprint": front.host_key_fingerprint,
        "ssh_user": SSH_USER,
        "ta_user": TA_USER,
        "client_key": str(paths.client_key),
        "started_at": time.time(),
    }


def serve(
    paths: SandboxPaths,
    ssh_port: int = DEFAULT_SSH_PORT,
    api_port: int = DEFAULT_API_PORT,
    *,
    apps: Iterable[str] = (),
    ready: Callable[[dict[str, Any]], None] | None = None,
    stop_event: threading.Event | None = None,
) -> int:
    """Run the Open API emulator and the SSH front until SIGTERM/SIGINT (or ``stop_event``).

    ``sandbox.json`` is written once both listen. ``ready(info)`` is called then too.
    Everything started is stopped in reverse order on the way out, however it ends.
    """
    paths.prepare(apps)
    stop = stop_event or threading.Event()
    with contextlib.ExitStack() as stack:
        stack.callback(_release_pid_lock, paths, _take_pid_lock(paths))
        with contextlib.suppress(FileNotFoundError):
            paths.info_file.unlink()
        _stop_on_signals(stack, stop)
        api_port = _start_openapi(stack, paths, api_port)
        front = _start_front(stack, paths, ssh_port)
        info = _server_info(paths, front, api_port)
        atomic_write(paths.info_file, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
        log.info(
            "TA simulator ready: SSH %s:%d, Open API %s (pid %d)",
            LOOPBACK,
            front.port,
            info["open_api_url"],
            os.getpid(),
        )
        if ready is not None:
            ready(info)
        while not stop.wait(1.0):  # a timed wait: signal handlers run between waits
            pass
        log.info("TA simulator stopping")
    return 0


def _server_command(paths: SandboxPaths, ssh_port: int, api_port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "keyvault.sandbox.run",
        "serve",
        "--home",
        str(paths.home),
        "--ssh-port",
        str(ssh_port),
        "--api-port",
        str(api_port),
        "--detach",
    ]


def _spawn_detached(paths: SandboxPaths, command: list[str], deadline: float) -> int:
    """Run ``command`` (which forks the server and prints its pid); return that pid."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_source_root(), env.get("PYTHONPATH")]))
    fd = os.open(paths.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        # The child forks the server and exits at once, printing the server's pid, so the
        # server is nobody's child here: no zombie, no Popen to outlive.
        with subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=fd,
            env=env,
            cwd=str(paths.root),
            start_new_session=True,
            close_fds=True,
        ) as proc:
            try:
                out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise SandboxError(
                    "the sandbox did not start in time", hint=f"see {paths.log_file}"
                ) from None
    finally:
        os.close(fd)
    text = out.decode("ascii", "replace").strip()
    if proc.returncode != 0 or not text.isdigit():
        raise SandboxError(
            f"the sandbox failed to start: {_log_tail(paths)}", hint=f"see {paths.log_file}"
        )
    return int(text)


def start_background(
    paths: SandboxPaths,
    *,
    ssh_port: int = DEFAULT_SSH_PORT,
    api_port: int = DEFAULT_API_PORT,
    apps: Iterable[str] = DEFAULT_APPS,
    timeout: float = START_TIMEOUT,
) -> dict[str, Any]:
    """Start the sandbox server detached (unless it runs already); return its info.

    The returned dict has ``"started": True`` when this call started it. Waits at most
    ``timeout`` seconds in all.
    """
    deadline = time.monotonic() + timeout
    paths.prepare(apps)  # errors show here, not in the log; adds apps to a running one too
    pid = _running_pid(paths)
    if pid is not None:
        return {**_wait_info(paths, pid, deadline), "started": False}
    _remove_stale(paths)
    pid = _spawn_detached(paths, _server_command(paths, ssh_port, api_port), deadline)
    return {**_wait_info(paths, pid, deadline), "started": True}


def _wait_info(paths: SandboxPaths, pid: int, deadline: float) -> dict:
    while True:
        info = _read_info(paths)
        if info and info.get("pid") == pid:
            return info
        if not _pid_alive(pid):
            raise SandboxError(
                f"the sandbox exited while starting: {_log_tail(paths)}",
                hint=f"see {paths.log_file}",
            )
        if time.monotonic() > deadline:
            raise SandboxError(
                f"the sandbox (pid {pid}) did not become ready in time",
                hint=f"see {paths.log_file}; `keyvault sandbox down` stops it",
            )
        time.sleep(_POLL)


def _log_tail(paths: SandboxPaths, lines: int = 3) -> str:
    try:
        text = paths.log_file.read_text(errors="replace")
    except FileNotFoundError:
        return "no log"
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail) or "no log"


def stop(paths: SandboxPaths, timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM the server, wait (bounded), then SIGKILL. Return its pid, or None if not running."""
    pid = _running_pid(paths)
    if pid is None:
        _remove_stale(paths)
        return None
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _pid_alive(pid):  # exited (the lock goes a little earlier)
                _remove_stale(paths)
                return pid
            time.sleep(_POLL)
    raise SandboxError(f"the sandbox (pid {pid}) did not stop")


# --- command line (used by start_background) --------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keyvault.sandbox.run",
        description="TA simulator server (127.0.0.1 only; not TA).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the Open API emulator and the SSH front")
    p.add_argument("--home", required=True, help="KEYVAULT_HOME")
    p.add_argument("--ssh-port", type=int, default=DEFAULT_SSH_PORT)
    p.add_argument("--api-port", type=int, default=DEFAULT_API_PORT)
    p.add_argument("--apps", default="", help="comma-separated APPIDs to register")
    p.add_argument(
        "--detach", action="store_true", help="fork; the parent prints the server's pid and exits"
    )
    args = parser.parse_args(argv)
    paths = SandboxPaths(args.home)
    if args.detach:
        pid = os.fork()  # a fresh interpreter, no threads yet: safe
        if pid:
            sys.stdout.write(f"{pid}\n")
            sys.stdout.flush()
            os._exit(0)
        os.dup2(2, 1)  # the server's stdout goes to the log; the pipe to our caller closes
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("paramiko").setLevel(logging.WARNING)
    apps = [a.strip() for a in args.apps.split(",") if a.strip()]
    try:
        return serve(paths, args.ssh_port, args.api_port, apps=apps)
    except (KeyvaultError, OSError, ValueError) as exc:
        log.error("TA simulator failed: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
