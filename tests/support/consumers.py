"""Consumers of a served keyvault as real processes: ``keyvault agent`` and ``keyvault run``.

    agent = Consumer.start(world, tmp_path, "agent", "--cluster", "c", ...)
    wait_until(lambda: path.exists(), "the key file")
    agent.stop()                  # SIGTERM, bounded wait; returns the exit status

Processes get the token through a file (never argv), the repository (keyvault and
keyvault_client) first on PYTHONPATH, and no KEYVAULT_* setting of the test run. Their stderr goes to
a file, shown scrubbed of key-shaped strings in failure messages. ``wait_until`` polls a
condition (a file's content, a process's end) until the shared TIMEOUT: a bound that only a
hang reaches, never a duration that must pass.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import http as http_support
from tests.support.http import World, scrub
from tests.support.timeouts import TIMEOUT

REPO = Path(__file__).resolve().parents[2]
CLIENT_PROJECT = REPO / "clients" / "python"  # pyproject.toml of ta-keyvault-client
POLL = 0.02  # seconds between two looks at a condition


def consumer_env(extra: dict | None = None) -> dict:
    """Our environment without KEYVAULT_* settings, the sources first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYVAULT_")}
    path = [str(REPO), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    env.update(extra or {})
    return env


def token_file(world: World, directory: Path, name: str = "consumer-c") -> Path:
    """A file holding token ``name`` (default: one reading every key of cluster c)."""
    if name not in world.tokens:
        world.create_token(name, "root:c", "app:c/*")
    path = directory / f"{name}.token"
    path.write_text(world.tokens[name] + "\n")
    path.chmod(0o600)
    return path


def wait_until(condition: Callable[[], object], what: str, proc: Consumer | None = None) -> object:
    """Poll ``condition`` until it is truthy (returned); fail after TIMEOUT, or early when
    ``proc`` exited meanwhile."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.proc.poll() is not None:
            value = condition()
            if value:
                return value
            pytest.fail(f"{what}: the {proc.name} exited {proc.proc.returncode}: {proc.log()}")
        time.sleep(POLL)
    pytest.fail(f"{what}: not within {TIMEOUT:g}s" + (f"; {proc.log()}" if proc else ""))


def read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class Consumer:
    """``python -m keyvault <command> ARGS`` as a subprocess."""

    def __init__(self, proc: subprocess.Popen, name: str, stderr: Path) -> None:
        self.proc = proc
        self.name = name
        self.stderr = stderr

    @classmethod
    def start(cls, workdir: Path, command: str, *args: str, **popen) -> Consumer:
        stderr = workdir / f"{command}-{time.monotonic_ns()}.err"
        with open(stderr, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "keyvault", command, *args],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=popen.pop("env", None) or consumer_env(),
                cwd=workdir,
                **popen,
            )
        return cls(proc, command, stderr)

    def log(self) -> str:
        return scrub(read(self.stderr))[-2000:]

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
            pytest.fail(f"the {self.name} did not exit within {TIMEOUT:g}s: {self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait()


def restart_on_same_port(world: World) -> None:
    """Start the stopped server again on the port it had (consumers know only that URL)."""
    port = world.server.port
    assert port is not None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(http_support, "free_port", lambda: port)
        world.server.start()
