"""The real transport: paramiko over a TCP socket with TCP_NODELAY.

Host keys are always verified: against the fingerprint pinned in the database,
or an OpenSSH known_hosts file named in the config. Nothing is ever auto-added.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko

from keyvault.errors import AuthenticationFailed, ConnectionLost, HostKeyError, HostUnreachable
from keyvault.ssh import ExecResult, SshTarget, StdinReply, sha256_fingerprint

if TYPE_CHECKING:
    from keyvault.config import Settings

_READ_CHUNK = 65536


class _CallbackFailed(Exception):
    """Carries an exception raised by an ``on_output`` callback out of the read loop."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__()
        self.cause = cause


class ParamikoConnection:
    """One authenticated SSH connection; each ``run`` opens a channel."""

    def __init__(self, transport: paramiko.Transport, label: str, su_prompt: str) -> None:
        self._transport = transport
        self.label = label
        self._prompt = re.compile(su_prompt.encode() if isinstance(su_prompt, str) else su_prompt)

    def __repr__(self) -> str:
        return f"ParamikoConnection({self.label})"

    def run(
        self,
        command: str,
        *,
        password: str | None = None,
        timeout: float,
        idle_timeout: float | None = None,
        on_output: Callable[[bytes], StdinReply | None] | None = None,
    ) -> ExecResult:
        deadline = time.monotonic() + timeout
        try:
            chan = self._transport.open_session(timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectionLost(
                f"cannot open a channel on {self.label}: {exc}", host=self.label
            ) from None
        output = bytearray()
        try:
            if password is not None:
                chan.get_pty(term="dumb", width=500, height=40)
            else:
                chan.set_combine_stderr(True)
            chan.exec_command(command)
            sent = password is None
            stdin_open = True
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return ExecResult(bytes(output), None)
                chan.settimeout(remaining if idle_timeout is None else min(remaining, idle_timeout))
                try:
                    chunk = chan.recv(_READ_CHUNK)
                except TimeoutError:
                    return ExecResult(bytes(output), None)
                if not chunk:
                    break
                output += chunk
                if on_output is not None:
                    try:
                        reply = on_output(chunk)
                    except BaseException as exc:
                        # Not a transport failure: it must not read as a lost connection.
                        raise _CallbackFailed(exc) from exc
                    if reply is not None and stdin_open:  # after the end of input, replies are moot
                        if reply.data:
                            chan.sendall(reply.data)
                        if reply.close:
                            chan.shutdown_write()
                            stdin_open = False
                if not sent and password is not None and self._prompt.search(bytes(output[-200:])):
                    # The prompt came; type the password once. It never enters `output`'s
                    # consumers because su does not echo it.
                    chan.sendall((password + "\n").encode())
                    sent = True
            # EOF seen: the exit status follows; bound the wait by the same deadline.
            chan.status_event.wait(max(0.0, deadline - time.monotonic()))
            status = chan.exit_status if chan.exit_status_ready() else -1
            # -1: no status (connection lost, or killed by a signal): treat as unknown.
            return ExecResult(bytes(output), None if status < 0 else status)
        except (paramiko.SSHException, OSError, EOFError):
            return ExecResult(bytes(output), None)
        except _CallbackFailed as failed:
            raise failed.cause from None
        finally:
            chan.close()

    def is_active(self) -> bool:
        """False once the connection has dropped."""
        return self._transport.is_active()

    def close(self) -> None:
        self._transport.close()


class ParamikoConnector:
    """Opens verified, authenticated connections."""

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        known_hosts_file: Path | None = None,
        su_prompt: str = r"(?i)password[^\n:]*:\s*$",
        default_identity: Path | None = None,
        passphrase: str | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.known_hosts_file = known_hosts_file
        self.su_prompt = su_prompt
        self.default_identity = default_identity
        self._passphrase = passphrase

    def _open(self, target: SshTarget) -> paramiko.Transport:
        try:
            sock = socket.create_connection(
                (target.address, target.port), timeout=self.connect_timeout
            )
        except OSError as exc:
            raise HostUnreachable(
                f"cannot connect to {target.address}:{target.port}: {exc.strerror or exc}",
                host=target.label,
            ) from None
        # Without this every new channel stalls ~40 ms on delayed ACKs.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=self.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            transport.close()
            raise HostUnreachable(
                f"SSH handshake with {target.label} failed: {exc}", host=target.label
            ) from None
        return transport

    def offered_fingerprint(self, target: SshTarget) -> str:
        transport = self._open(target)
        try:
            return sha256_fingerprint(transport.get_remote_server_key().asbytes())
        finally:
            transport.close()

    def _verify_host_key(self, transport: paramiko.Transport, target: SshTarget) -> None:
        key = transport.get_remote_server_key()
        offered = sha256_fingerprint(key.asbytes())
        trust = f"keyvault host trust {target.cluster} {target.address}" + (
            f" --port {target.port}" if target.port != 22 else ""
        )
        if target.pinned_fingerprint:
            if offered != target.pinned_fingerprint:
                raise HostKeyError(
                    f"HOST KEY CHANGED for {target.address}:{target.port}: offered {offered}, "
                    f"pinned {target.pinned_fingerprint}",
                    host=target.label,
                    offered=offered,
                    pinned=target.pinned_fingerprint,
                    hint=f"if the host was really re-keyed, check the new key out of band and run `{trust}`",
                )
            return
        if self.known_hosts_file is not None and self.known_hosts_file.exists():
            host_keys = paramiko.HostKeys(str(self.known_hosts_file))
            name = target.address if target.port == 22 else f"[{target.address}]:{target.port}"
            known = host_keys.lookup(name)
            if known is not None and key.get_name() in known:
                if known[key.get_name()].asbytes() == key.asbytes():
                    return
                raise HostKeyError(
                    f"HOST KEY CHANGED for {name}: offered {offered} differs from {self.known_hosts_file}",
                    host=target.label,
                    offered=offered,
                    pinned=None,
                    hint="check the new key out of band and fix the known_hosts file",
                )
        raise HostKeyError(
            f"unknown host key for {target.address}:{target.port}: offered {offered}",
            host=target.label,
            offered=offered,
            pinned=None,
            hint=f"verify it out of band, then run `{trust}`",
        )

    def _authenticate(self, transport: paramiko.Transport, target: SshTarget) -> None:
        identity = target.identity_file or (
            str(self.default_identity) if self.default_identity else None
        )
        passphrase = target.passphrase if target.passphrase is not None else self._passphrase
        try:
            if identity:
                try:
                    pkey = paramiko.PKey.from_path(identity, password=passphrase)
                except (OSError, paramiko.SSHException, ValueError) as exc:
                    raise AuthenticationFailed(
                        f"cannot load the private key {identity}: {type(exc).__name__}",
                        host=target.label,
                        hint="check the path, and KEYVAULT_SSH_PASSPHRASE(_FILE) for an encrypted key",
                    ) from None
                transport.auth_publickey(target.username, pkey)
            else:
                agent = paramiko.Agent()
                try:
                    for key in agent.get_keys():
                        try:
                            transport.auth_publickey(target.username, key)
                            break
                        except paramiko.AuthenticationException:
                            continue
                finally:
                    agent.close()
        except paramiko.AuthenticationException:
            pass
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise HostUnreachable(
                f"SSH authentication with {target.label} broke off: {exc}", host=target.label
            ) from None
        if not transport.is_authenticated():
            raise AuthenticationFailed(
                f"{target.label} refused authentication",
                host=target.label,
                hint="check the host's --user and --identity, or load the key into ssh-agent",
            )

    def connect(self, target: SshTarget) -> ParamikoConnection:
        transport = self._open(target)
        try:
            self._verify_host_key(transport, target)
            self._authenticate(transport, target)
        except BaseException:
            transport.close()
            raise
        transport.set_keepalive(15)
        return ParamikoConnection(transport, target.label, self.su_prompt)


def connector_from_settings(settings: Settings) -> ParamikoConnector:
    """The real connector, configured from ``Settings`` (CLI, HTTP rotate, scheduler)."""
    return ParamikoConnector(
        connect_timeout=settings.ssh_connect_timeout,
        known_hosts_file=settings.known_hosts_file,
        su_prompt=settings.su_prompt,
        default_identity=settings.ssh_identity_file,
        passphrase=settings.ssh_passphrase,
    )
