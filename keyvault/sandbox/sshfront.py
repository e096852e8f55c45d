"""SSH front of the TA simulator: an SSH server on 127.0.0.1 for machines without root/sshd.

Built on paramiko's server mode. It is a simulator, not an sshd:

- public-key authentication only, for the keys of an authorized_keys-style file (any
  username; lines with options are ignored); its own ed25519 host key;
- ``exec`` requests only, and only the scripts keyvault itself sends
  (:mod:`keyvault.tahost`): the command line must be exactly ``Become.wrap(script)``
  for su, sudo or none, and the script exactly one of ``check_script(cmd)``,
  ``generate_script(rid, cmd)``, ``generate_many_script(jobs)``, ``fetch_script(rid)``,
  ``cleanup_script(rid)`` or ``cleanup_many_script(rids)`` with
  ``cmd`` ``ta-tool generate_root_secret`` or ``ta-tool generate_api_secret -appid
  APPID``. Candidates are pulled out of the script with regexes, re-rendered with the
  tahost functions and compared for equality. Anything else gets ``sandbox: refusing
  command`` on stderr and exit status 126. Shells, subsystems, PTYs, forwarding: refused;
- an accepted script runs as ``/bin/sh -c SCRIPT`` as the current user (there is no
  su: every "ta user" is this process's user), in a new session, with stdin
  /dev/null and only ``HOME`` (the simulated ta home), ``PATH`` (the ta-tool wrapper's
  directory first), ``USER``/``LOGNAME`` and ``SHELL``. Output (stdout and stderr
  combined) is streamed to the channel, then the exit status is sent.

Output is never logged (it carries keys); the log names only the kind of script.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import pwd
import re
import selectors
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko
from paramiko.common import MSG_CHANNEL_REQUEST

from keyvault import tahost
from keyvault.scope import APPID
from keyvault.ssh import sha256_fingerprint

log = logging.getLogger("keyvault.sandbox.sshfront")

LOOPBACK = "127.0.0.1"
MAX_SESSIONS = 32  # channels per connection, like sshd's MaxSessions
MAX_COMMAND_BYTES = 65536
MAX_BATCH = 50  # rotations in one generate_many_script
REFUSED_STATUS = 126
REFUSAL = b"sandbox: refusing command\n"
ROOT_COMMAND = "ta-tool generate_root_secret"
APP_TEMPLATE = "ta-tool generate_api_secret -appid {appid}"
_RID_RE = re.compile(r"@@KV:([a-z0-9-]{6,32}):")
_CLEANUP_IDS_RE = re.compile(r'umask 077; kv_ids="([a-z0-9-]{6,32}(?: [a-z0-9-]{6,32})*)"; ')
_CALL_RE = re.compile(r"([a-z0-9-]{6,32}) (.*)")
# An APPID per keyvault.scope; shlex.quote leaves all of these unquoted.
_APPID_RE = re.compile(rf"-appid ({APPID})")
_MAX_CANDIDATES = 4
_READ_CHUNK = 65536


# --- keys --------------------------------------------------------------------------------


def ensure_ed25519_key(
    path, *, comment: str = "keyvault-sandbox", public_file=None
) -> paramiko.PKey:
    """Load the OpenSSH ed25519 private key at ``path``; create it (mode 0600) if missing.

    With ``public_file``, also write the public key line there if it is missing.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    if not path.exists():
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        _write_private(path, pem)
    key = paramiko.Ed25519Key.from_private_key_file(str(path))
    if public_file is not None and not Path(public_file).exists():
        line = f"{key.get_name()} {key.get_base64()} {comment}\n"
        _write_private(Path(public_file), line.encode(), mode=0o644)
    return key


def _write_private(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def public_key_line(key: paramiko.PKey, comment: str = "") -> str:
    """``ssh-ed25519 AAAA... [comment]``."""
    return f"{key.get_name()} {key.get_base64()}" + (f" {comment}" if comment else "")


def read_authorized_keys(path) -> set[bytes]:
    """Public key blobs of an authorized_keys file; lines with options are skipped."""
    blobs: set[bytes] = set()
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return blobs
    for line in text.splitlines():
        parts = line.strip().split()
        if len(parts) < 2 or parts[0].startswith("#"):
            continue
        kind, data = parts[0], parts[1]
        if not re.fullmatch(r"(ssh|ecdsa|sk)-[A-Za-z0-9@.-]+", kind):
            log.warning("authorized_keys: skipping a line with options or an unknown key type")
            continue
        try:
            blob = base64.b64decode(data, validate=True)
        except ValueError:
            continue
        blobs.add(blob)
    return blobs


# --- which commands run -----------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    """A command the front will run: which tahost script, for what."""

    method: str  # su | sudo | none
    kind: str  # check | generate | fetch | cleanup
    script: str
    rid: str | None = None
    scope: str | None = None  # for generate: root or app:<APPID>
    batch: int = 1  # rotations in a generate_many_script

    def describe(self) -> str:
        parts = [f"{self.kind} via {self.method}"]
        if self.rid:
            parts.append(f"rotation {self.rid}")
        if self.scope:
            parts.append(self.scope)
        if self.batch > 1:
            parts.append(f"and {self.batch - 1} more")
        return ", ".join(parts)


def _unwrap(command: str, ta_user: str) -> tuple[str, str] | None:
    """(method, script) if ``command`` is exactly a ``Become.wrap`` of some script."""
    try:
        argv = shlex.split(command)
    except ValueError:
        return None
    if len(argv) == 5 and argv[:2] == ["su", "-"] and argv[2] == ta_user and argv[3] == "-c":
        method, script = "su", argv[4]
    elif (
        len(argv) == 7
        and argv[:3] == ["sudo", "-n", "-iu"]
        and argv[3] == ta_user
        and argv[4:6] == ["sh", "-c"]
    ):
        method, script = "sudo", argv[6]
    elif len(argv) == 3 and argv[:2] == ["bash", "-lc"]:
        method, script = "none", argv[2]
    else:
        return None
    if tahost.Become(method=method, ta_user=ta_user).wrap(script) != command:
        return None
    return method, script


def _candidates(pattern: re.Pattern, text: str) -> list[str]:
    found: list[str] = []
    for value in pattern.findall(text):
        if value not in found:
            found.append(value)
        if len(found) >= _MAX_CANDIDATES:
            break
    return found


def classify(command: str, *, ta_user: str = "ta") -> Accepted | None:
    """The keyvault script that ``command`` is, character for character; else None."""
    if len(command) > MAX_COMMAND_BYTES:
        return None
    unwrapped = _unwrap(command, ta_user)
    if unwrapped is None:
        return None
    method, script = unwrapped
    if script == tahost.check_script(ROOT_COMMAND):
        return Accepted(method, "check", script)
    many = _CLEANUP_IDS_RE.match(script)
    if many and script == tahost.cleanup_many_script(many.group(1).split(" ")):
        return Accepted(method, "cleanup", script, many.group(1).split(" ")[0])
    if script.startswith(tahost.GENERATE_PREFIX):
        return _classify_generate(method, script)
    for rid in _candidates(_RID_RE, script):
        if script == tahost.fetch_script(rid):
            return Accepted(method, "fetch", script, rid)
        if script == tahost.cleanup_script(rid):
            return Accepted(method, "cleanup", script, rid)
    return None


def _job(call: str) -> tuple[str, str, str] | None:
    """(rid, scope, command) of one ``kv_gen RID TOOL 'COMMAND'`` call, for the commands allowed."""
    found = _CALL_RE.fullmatch(call)
    if found is None:
        return None
    rid, rest = found.groups()
    try:
        words = shlex.split(rest)
    except ValueError:
        return None
    if len(words) != 2:
        return None
    command = words[1]
    if command == ROOT_COMMAND:
        return rid, "root", command
    appid = _APPID_RE.search(command)
    if appid is not None and command == tahost.render_command(APP_TEMPLATE, appid.group(1)):
        return rid, f"app:{appid.group(1)}", command
    return None


def _classify_generate(method: str, script: str) -> Accepted | None:
    # Splitting is only a way to find the parts: the whole script is re-rendered and
    # compared, so a part that merely contains the separator cannot slip through.
    body, clean = script[len(tahost.GENERATE_PREFIX) :], False
    cut = body.rfind("; echo @@KV:")
    if cut != -1 and ":CLEANUP@@; " in body[cut:]:  # the clean_from_stdin tail
        body, clean = body[:cut], True
    if not body.startswith("kv_gen "):
        return None
    calls = body[len("kv_gen ") :].split("; kv_gen ")
    if not 1 <= len(calls) <= MAX_BATCH:
        return None
    jobs = [_job(call) for call in calls]
    if any(job is None for job in jobs):
        return None
    if (
        tahost.generate_many_script([(rid, cmd) for rid, _, cmd in jobs], clean_from_stdin=clean)
        != script
    ):
        return None
    return Accepted(method, "generate", script, jobs[0][0], jobs[0][1], batch=len(jobs))


# --- the server -------------------------------------------------------------------------


def _feed_stdin(chan: paramiko.Channel, proc: subprocess.Popen) -> None:
    # What the client sends goes to the script's stdin, as sshd does; its EOF closes it.
    try:
        while True:
            data = chan.recv(_READ_CHUNK)
            if not data:
                break
            proc.stdin.write(data)
            proc.stdin.flush()
    except (paramiko.SSHException, OSError, EOFError, ValueError):
        pass  # the command or the channel is gone
    finally:
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.close()


def _handle_request_then_run(chan: paramiko.Channel, m) -> None:
    # paramiko answers an exec request (CHANNEL_SUCCESS) only after
    # check_channel_exec_request returns. Starting the command from inside that check
    # would race the answer: a fast refusal could close the channel first, and the
    # client would see "Channel closed" instead of exit status 126. So the command
    # starts here, once the answer is on its way.
    paramiko.Channel._handle_request(chan, m)
    server = chan.transport.server_object if chan.transport is not None else None
    if isinstance(server, _Session):
        server.run_pending(chan)


class _FrontTransport(paramiko.Transport):
    _channel_handler_table = {  # noqa: RUF012
        **paramiko.Transport._channel_handler_table,
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
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
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
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="sshfront-accept", daemon=True
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
        if self._accept_thread is None or self._stopping.is_set():
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
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
        for sock in (self._wake_r, self._wake_w):
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
    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r or self._stopping.is_set():
                        return
                    try:
                        sock, addr = self._listener.accept()
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
            self._listener.close()

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
        feeder = threading.Thread(
            target=_feed_stdin,
            args=(chan, proc),
            daemon=True,
            name=f"sshfront-stdin-{chan.get_id()}",
        )
        feeder.start()
        try:
            fd = proc.stdout.fileno()
            while True:
                chunk = os.read(fd, _READ_CHUNK)
                if not chunk:
                    break
                try:
                    chan.sendall(chunk)
                except (paramiko.SSHException, OSError, EOFError):
                    # The client is gone. Like sshd, close the pipe: the shell dies of
                    # SIGPIPE at its next write, while ta-tool's output, which goes to the
                    # pending file, survives.
                    break
            proc.stdout.close()
            return proc.wait()
        finally:
            if proc.stdout and not proc.stdout.closed:
                proc.stdout.close()
            if proc.returncode is None:
                proc.wait()
            with self._lock:
                self._procs.discard(proc)
