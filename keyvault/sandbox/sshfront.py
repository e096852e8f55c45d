"""SSH front of the TA simulator: an SSH server on 127.0.0.1 for machines without root/sshd.

Built on paramiko's server mode. It is a simulator, not an sshd:

- public-key authentication only, for the keys of an authorized_keys-style file (any
  username; lines with options are ignored); its own ed25519 host key
  (:mod:`keyvault.sandbox.sshkeys`);
- ``exec`` requests only, and only the scripts keyvault itself sends, recognised
  character for character by :func:`keyvault.sandbox.commands.classify`. Anything else
  gets ``sandbox: refusing command`` on stderr and exit status 126. Shells, subsystems,
  PTYs, forwarding: refused;
- an accepted script runs as ``/bin/sh -c SCRIPT`` as the current user (there is no
  su: every "ta user" is this process's user), in a new session, with stdin
  /dev/null and only ``HOME`` (the simulated ta home), ``PATH`` (the ta-tool wrapper's
  directory first), ``USER``/``LOGNAME`` and ``SHELL``. Output (stdout and stderr
  combined) is streamed to the channel, then the exit status is sent.

Output is never logged (it carries keys); the log names only the kind of script.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import selectors
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

import paramiko
from paramiko.common import MSG_CHANNEL_REQUEST

from keyvault.sandbox.commands import Accepted, classify
from keyvault.sandbox.sshkeys import ensure_ed25519_key, public_key_line, read_authorized_keys
from keyvault.ssh import sha256_fingerprint

__all__ = [
    "REFUSED_STATUS",
    "Accepted",
    "SshFront",
    "classify",
    "ensure_ed25519_key",
    "public_key_line",
    "read_authorized_keys",
]

log = logging.getLogger("keyvault.sandbox.sshfront")

LOOPBACK = "127.0.0.1"
MAX_SESSIONS = 32  # channels per connection, like sshd's MaxSessions
REFUSED_STATUS = 126
REFUSAL = b"sandbox: refusing command\n"
_READ_CHUNK = 65536


# --- the server -------------------------------------------------------------------------


def _feed_stdin(chan: paramiko.Channel, stdin: IO[bytes]) -> None:
    # What the client sends goes to the script's stdin, as sshd does; its EOF closes it.
    try:
        while True:
            data = chan.recv(_READ_CHUNK)
            if not data:
                break
            stdin.write(data)
            stdin.flush()
    except (paramiko.SSHException, OSError, EOFError, ValueError):
        pass  # the command or the channel is gone
    finally:
        with contextlib.suppress(OSError, ValueError):
            stdin.close()


def _handle_request_then_run(chan: paramiko.Channel, m: paramiko.Message) -> None:
    # paramiko answers an exec request (CHANNEL_SUCCESS) only after
    # check_channel_exec_request returns. Starting the command from inside that check
    # would race the answer: a fast refusal could close the channel first, and the
    # client would see "Channel closed" instead of exit status 126. So the command
    # starts here, once the answer is on its way.
    paramiko.Channel._handle_request(chan, m)  # type: ignore[attr-defined]  # private, no stub
    server = chan.transport.server_object if chan.transport is not None else None
    if isinstance(server, _Session):
        server.run_pending(chan)


class _FrontTransport(paramiko.Transport):
    # paramiko's private dispatch table (no stub): exec requests go through the hook above.
    _channel_handler_table = {  # noqa: RUF012
        **paramiko.Transport._channel_handler_table,  # type: ignore[attr-defined]
        MSG_CHANNEL_REQUEST: _handle_request_then_run,
    }


class _Session(paramiko.ServerInterface):
    """The server side of one SSH connection."""

    def __init__(self, front: SshFront, peer: str) -> None:
        self.front = front
        self.peer = peer
        self._lock = threading.Lock()
        self._channels: dict[int, paramiko.Channel | None] = {}
        self._pending: dict[int, Accepted | None] = {}
        self._exec_seen: set[int] = set()

    # authentication
    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_none(self, username):
        return paramiko.AUTH_FAILED

    def check_auth_password(self, username, password):
        return paramiko.AUTH_FAILED

    def check_auth_publickey(self, username, key):
        if key.asbytes() in read_authorized_keys(self.front.authorized_keys_file):
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_auth_interactive(self, username, submethods):
        return paramiko.AUTH_FAILED

    # channels
    def check_channel_request(self, kind, chanid):
        if kind != "session":
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        with self._lock:
            for cid, chan in list(self._channels.items()):
                if chan is not None and chan.closed:
                    del self._channels[cid]
                    self._exec_seen.discard(cid)
            if len(self._channels) >= self.front.max_sessions:
                return paramiko.OPEN_FAILED_RESOURCE_SHORTAGE
            self._channels[chanid] = None
        return paramiko.OPEN_SUCCEEDED

    def accepted(self, chan: paramiko.Channel) -> None:
        with self._lock:
            self._channels[chan.get_id()] = chan

    def check_channel_pty_request(
        self, channel, term, width, height, pixelwidth, pixelheight, modes
    ):
        return False  # keyvault needs a PTY only to type an su password; here there is none

    def check_channel_shell_request(self, channel):
        return False

    def check_channel_subsystem_request(self, channel, name):
        return False

    def check_channel_env_request(self, channel, name, value):
        return False

    def check_channel_exec_request(self, channel, command):
        cid = channel.get_id()
        with self._lock:
            if cid in self._exec_seen:
                return False  # one command per channel
            self._exec_seen.add(cid)
        try:
            text = command.decode("utf-8") if isinstance(command, bytes) else str(command)
        except UnicodeDecodeError:
            text = None
        accepted = classify(text, ta_user=self.front.ta_user) if text is not None else None
        with self._lock:
            self._pending[cid] = accepted
        return True  # refusals are answered on the channel: stderr + status 126

    def run_pending(self, chan: paramiko.Channel) -> None:
        with self._lock:
            if chan.get_id() not in self._pending:
                return
            accepted = self._pending.pop(chan.get_id())
        self.front._spawn_worker(chan, accepted, self.peer)


class SshFront:
    """The SSH front: ``start()`` binds 127.0.0.1 and serves in daemon threads."""

    def __init__(
        self,
        *,
        host_key_file,
        authorized_keys_file,
        ta_home,
        bin_dir,
        host: str = LOOPBACK,
        port: int = 0,
        ta_user: str = "ta",
        max_sessions: int = MAX_SESSIONS,
        stop_timeout: float = 10.0,
    ) -> None:
        if host != LOOPBACK:
            raise ValueError(f"the sandbox SSH front binds to {LOOPBACK} only, not {host!r}")
        self.host = host
        self.requested_port = int(port)
        self.port: int | None = None
        self.host_key_file = Path(host_key_file)
        self.authorized_keys_file = Path(authorized_keys_file)
        self.ta_home = Path(ta_home)
        self.bin_dir = Path(bin_dir)
        self.ta_user = ta_user
        self.max_sessions = max_sessions
        self.stop_timeout = stop_timeout
        self.host_key = ensure_ed25519_key(self.host_key_file, comment="keyvault-sandbox-host")
        self.host_key_fingerprint = sha256_fingerprint(self.host_key.asbytes())
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        # A socket pair wakes the accept loop at stop(); made by start().
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._accept_thread: threading.Thread | None = None
        self._transports: set[paramiko.Transport] = set()
        self._threads: set[threading.Thread] = set()
        self._procs: set[subprocess.Popen] = set()

    @property
    def host_public_key(self) -> str:
        return public_key_line(self.host_key)

    def __enter__(self) -> SshFront:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # lifecycle
    def start(self) -> int:
        """Bind and serve in a daemon thread; return the port."""
        if self._accept_thread is not None:
            raise RuntimeError("SshFront already started")
        self.ta_home.mkdir(mode=0o700, parents=True, exist_ok=True)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.requested_port))
            listener.listen(64)
        except BaseException:
            listener.close()
            raise
        self.port = listener.getsockname()[1]
        self._wake = socket.socketpair()
        self._accept_thread = threading.Thread(
            target=self._accept_loop,
            args=(listener, self._wake[0]),
            name="sshfront-accept",
            daemon=True,
        )
        self._accept_thread.start()
        log.info(
            "SSH front listening on %s:%d (host key %s)",
            self.host,
            self.port,
            self.host_key_fingerprint,
        )
        return self.port

    def stop(self) -> None:
        """Stop accepting, close every connection, end commands still running."""
        if self._accept_thread is None or self._wake is None or self._stopping.is_set():
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake[1].send(b"x")
        self._accept_thread.join(self.stop_timeout)
        with self._lock:
            transports = list(self._transports)
            procs = list(self._procs)
        for transport in transports:
            transport.close()
            with transport.lock:  # wake the connection thread waiting in accept()
                transport.server_accept_cv.notify_all()
        self._signal_procs(procs, signal.SIGTERM)
        if not self._join_threads(self.stop_timeout):
            with self._lock:
                procs = list(self._procs)
            self._signal_procs(procs, signal.SIGKILL)
            self._join_threads(self.stop_timeout)
        for sock in self._wake:
            sock.close()
        log.info("SSH front on port %s stopped", self.port)

    @staticmethod
    def _signal_procs(procs, sig) -> None:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)  # each command runs in its own session

    def _join_threads(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = [t for t in self._threads if t.is_alive()]
            if not threads:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            threads[0].join(min(remaining, 0.5))

    def _track(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads = {t for t in self._threads if t.is_alive()}
            self._threads.add(thread)

    # accepting connections
    def _accept_loop(self, listener: socket.socket, wake: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(listener, selectors.EVENT_READ)
            sel.register(wake, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj is wake or self._stopping.is_set():
                        return
                    try:
                        sock, addr = listener.accept()
                    except OSError as exc:
                        log.warning("accept failed: %s", exc)
                        continue
                    thread = threading.Thread(
                        target=self._serve_connection,
                        args=(sock, addr),
                        name=f"sshfront-conn-{addr[1]}",
                        daemon=True,
                    )
                    self._track(thread)
                    thread.start()
        finally:
            sel.close()
            listener.close()

    def _serve_connection(self, sock: socket.socket, addr) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        try:
            # Without it every new channel stalls ~40 ms on delayed ACKs.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport = _FrontTransport(sock)
        except Exception as exc:  # noqa: BLE001 - never kill the thread with a traceback
            log.warning("connection from %s: %s", peer, exc)
            sock.close()
            return
        with self._lock:
            if self._stopping.is_set():
                transport.close()
                sock.close()
                return
            self._transports.add(transport)
        try:
            transport.add_server_key(self.host_key)
            session = _Session(self, peer)
            try:
                transport.start_server(server=session)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                log.info("connection from %s: handshake failed: %s", peer, exc)
                return
            while transport.is_active() and not self._stopping.is_set():
                chan = transport.accept(0.5)
                if chan is not None:
                    session.accepted(chan)
        finally:
            transport.close()
            sock.close()
            with self._lock:
                self._transports.discard(transport)

    # running commands
    def _spawn_worker(self, chan: paramiko.Channel, accepted: Accepted | None, peer: str) -> None:
        thread = threading.Thread(
            target=self._run_command,
            args=(chan, accepted, peer),
            name=f"sshfront-exec-{chan.get_id()}",
            daemon=True,
        )
        self._track(thread)
        thread.start()

    def _environment(self) -> dict:
        try:
            user = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            user = str(os.getuid())
        return {
            "HOME": str(self.ta_home),
            "PATH": f"{self.bin_dir}:/usr/bin:/bin",
            "USER": user,
            "LOGNAME": user,
            "SHELL": "/bin/sh",
        }

    def _run_command(self, chan: paramiko.Channel, accepted: Accepted | None, peer: str) -> None:
        try:
            if accepted is None or self._stopping.is_set():
                log.info("%s: refused a command", peer)
                with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
                    chan.sendall_stderr(REFUSAL)
                    chan.send_exit_status(REFUSED_STATUS)
                return
            try:
                status = self._execute(chan, accepted)
            except OSError as exc:
                log.warning("%s: %s could not start: %s", peer, accepted.describe(), exc)
                with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
                    chan.sendall_stderr(b"sandbox: cannot run the command\n")
                status = 127
            log.info("%s: %s -> exit %s", peer, accepted.describe(), status)
            if status >= 0:  # killed by a signal: like sshd, no exit status
                with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
                    chan.send_exit_status(status)
        finally:
            with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
                chan.close()

    def _execute(self, chan: paramiko.Channel, accepted: Accepted) -> int:
        with self._lock:
            if self._stopping.is_set():
                return REFUSED_STATUS
            proc = subprocess.Popen(
                ["/bin/sh", "-c", accepted.script],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                cwd=str(self.ta_home),
                close_fds=True,
                start_new_session=True,
            )
            self._procs.add(proc)
        try:
            if proc.stdin is None or proc.stdout is None:  # never: both are pipes
                raise OSError("the command's pipes are missing")
            threading.Thread(
                target=_feed_stdin,
                args=(chan, proc.stdin),
                daemon=True,
                name=f"sshfront-stdin-{chan.get_id()}",
            ).start()
            _stream_output(proc.stdout, chan)
            return proc.wait()
        finally:
            if proc.stdout and not proc.stdout.closed:
                proc.stdout.close()
            if proc.returncode is None:
                proc.wait()
            with self._lock:
                self._procs.discard(proc)


def _stream_output(stdout: IO[bytes], chan: paramiko.Channel) -> None:
    """Copy the command's output to the channel until it ends or the client is gone."""
    fd = stdout.fileno()
    while True:
        chunk = os.read(fd, _READ_CHUNK)
        if not chunk:
            break
        try:
            chan.sendall(chunk)
        except (paramiko.SSHException, OSError, EOFError):
            # The client is gone. Like sshd, close the pipe: the shell dies of SIGPIPE at
            # its next write, while ta-tool's output, which goes to the pending file, survives.
            break
    stdout.close()
