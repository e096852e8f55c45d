"""Transports that run a shell command on a TA host and return its output.

``Connector.connect(target)`` opens a ``Connection``; ``Connection.run`` runs one
command and returns an ``ExecResult``. The real transport is OpenSSH's protocol
through paramiko (``keyvault.ssh.paramiko_transport``); ``keyvault.ssh.local``
runs commands on this machine and is injected by fast tests only.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SshTarget:
    """Where and how to connect: one host of a cluster."""

    address: str
    port: int
    username: str
    identity_file: str | None = None
    pinned_fingerprint: str | None = None
    passphrase: str | None = field(default=None, repr=False)
    cluster: str = "CLUSTER"  # only for hints such as `keyvault host trust CLUSTER ADDRESS`

    @property
    def label(self) -> str:
        return f"{self.username}@{self.address}:{self.port}"


@dataclass(frozen=True)
class ExecResult:
    """Output of one command. ``exit_status`` is None when the connection dropped."""

    output: bytes = field(repr=False)
    exit_status: int | None


@dataclass(frozen=True)
class StdinReply:
    """What an ``on_output`` callback sends back: bytes for the command's stdin, then maybe its end."""

    data: bytes = field(default=b"", repr=False)
    close: bool = False


class Connection(Protocol):
    label: str

    def run(
        self,
        command: str,
        *,
        password: str | None = None,
        timeout: float,
        idle_timeout: float | None = None,
        on_output: Callable[[bytes], StdinReply | None] | None = None,
    ) -> ExecResult:
        """Run ``command``; with ``password``, answer a prompt on a PTY.

        Gives up (exit status None) after ``timeout`` seconds in all, or ``idle_timeout``
        seconds without output.

        ``on_output`` sees each chunk of output as it arrives (it may hold keys) and may
        answer with a :class:`StdinReply` (not with ``password``: the PTY is su's).
        """

    def close(self) -> None:
        """Close the connection."""


class Connector(Protocol):
    def connect(self, target: SshTarget) -> Connection:
        """Open an authenticated connection with the host key verified."""

    def offered_fingerprint(self, target: SshTarget) -> str:
        """The SHA256 fingerprint of the host key the server offers (no authentication)."""


def sha256_fingerprint(key_blob: bytes) -> str:
    """OpenSSH's ``SHA256:...`` form of a public key blob."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key_blob).digest()).decode().rstrip("=")
