"""A transport that runs commands on this machine: for fast tests, by injection only.

It honours the same contract as the SSH transport (combined output, exit status)
so the rotation state machine can be exercised without sshd; every behaviour it
covers is also tested through the real OpenSSH sshd.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from collections.abc import Callable, Mapping

from keyvault.errors import HostUnreachable
from keyvault.ssh import ExecResult, SshTarget, StdinReply


class LocalConnection:
    """Runs each command with ``sh -c`` in a fixed environment."""

    def __init__(self, label: str, env: Mapping[str, str]) -> None:
        self.label = label
        self._env = dict(env)
        self.commands: list[str] = []

    def run(
        self,
        command: str,
        *,
        password: str | None = None,
        timeout: float,
        idle_timeout: float | None = None,
        on_output: Callable[[bytes], StdinReply | None] | None = None,
    ) -> ExecResult:
        self.commands.append(command)
        deadline = time.monotonic() + timeout
        proc = subprocess.Popen(
            ["sh", "-c", command],
            env=self._env,
            stdin=subprocess.DEVNULL if on_output is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        output = bytearray()
        stdout = proc.stdout
        assert stdout is not None  # stdout=PIPE
        with proc, selectors.DefaultSelector() as sel:
            sel.register(stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                wait = remaining if idle_timeout is None else min(remaining, idle_timeout)
                if remaining <= 0 or not sel.select(wait):
                    proc.kill()
                    return ExecResult(bytes(output), None)
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    break
                output += chunk
                if on_output is not None:
                    _answer(proc, on_output(chunk))
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
            status = proc.wait()
        return ExecResult(bytes(output), status if status >= 0 else None)

    def close(self) -> None:
        pass


def _answer(proc: subprocess.Popen[bytes], reply: StdinReply | None) -> None:
    stdin = proc.stdin
    if reply is None or stdin is None or stdin.closed:
        return
    try:
        if reply.data:
            stdin.write(reply.data)
            stdin.flush()
        if reply.close:
            stdin.close()
    except BrokenPipeError:  # the command is gone, as a remote one may be
        pass


class LocalConnector:
    """Connects to nothing; ``unreachable`` addresses fail like a dead host."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        fingerprint: str = "SHA256:" + "A" * 43,
        unreachable: frozenset[str] = frozenset(),
    ) -> None:
        self.env = env
        self.fingerprint = fingerprint
        self.unreachable = unreachable
        self.connections: list[LocalConnection] = []

    def connect(self, target: SshTarget) -> LocalConnection:
        if target.address in self.unreachable:
            raise HostUnreachable(
                f"cannot connect to {target.address}:{target.port}", host=target.label
            )
        conn = LocalConnection(target.label, self.env)
        self.connections.append(conn)
        return conn

    def offered_fingerprint(self, target: SshTarget) -> str:
        return self.fingerprint
