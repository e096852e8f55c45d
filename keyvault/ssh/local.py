"""A transport that runs commands on this machine: for fast tests, by injection only.

It honours the same contract as the SSH transport (combined output, exit status)
so the rotation state machine can be exercised without sshd; every behaviour it
covers is also tested through the real OpenSSH sshd.
"""

from __future__ import annotations

import subprocess
from typing import Mapping

from keyvault.errors import HostUnreachable
from keyvault.ssh import ExecResult, SshTarget


class LocalConnection:
    """Runs each command with ``sh -c`` in a fixed environment."""

    def __init__(self, label: str, env: Mapping[str, str]) -> None:
        self.label = label
        self._env = dict(env)
        self.commands: list[str] = []

    def run(self, command: str, *, password: str | None = None, timeout: float) -> ExecResult:
        self.commands.append(command)
        try:
            proc = subprocess.run(["sh", "-c", command], env=self._env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            return ExecResult(exc.output or b"", None)
        return ExecResult(proc.stdout, proc.returncode)

    def close(self) -> None:
        pass


class LocalConnector:
    """Connects to nothing; ``unreachable`` addresses fail like a dead host."""

    def __init__(self, env: Mapping[str, str], *, fingerprint: str = "SHA256:" + "A" * 43,
                 unreachable: frozenset[str] = frozenset()) -> None:
        self.env = env
        self.fingerprint = fingerprint
        self.unreachable = unreachable
        self.connections: list[LocalConnection] = []

    def connect(self, target: SshTarget) -> LocalConnection:
        if target.address in self.unreachable:
            raise HostUnreachable(f"cannot connect to {target.address}:{target.port}", host=target.label)
        conn = LocalConnection(target.label, self.env)
        self.connections.append(conn)
        return conn

    def offered_fingerprint(self, target: SshTarget) -> str:
        return self.fingerprint
