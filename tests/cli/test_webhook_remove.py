"""`keyvault webhook remove` asks first, like the other destructive commands.

The question needs a terminal: the interactive cases run the real CLI in a subprocess whose
stdin is a pseudo-terminal, and answer it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.cli import Cli, expect
from tests.support.timeouts import TIMEOUT

CLUSTER = "c"


@pytest.fixture
def hook_id(cli: Cli) -> int:
    expect(cli("init"))
    expect(cli("cluster", "add", CLUSTER, "--open-api-url", "http://127.0.0.1:9"))
    expect(
        cli(
            "webhook",
            "add",
            "--allow-private-network",
            "http://127.0.0.1:9/hook",
            "--scope",
            f"root:{CLUSTER}",
        )
    )
    (hook,) = json.loads(expect(cli("webhook", "list", "--json")).stdout)
    return int(hook["id"])


def _status(cli: Cli, hook_id: int) -> str:
    hooks = json.loads(expect(cli("webhook", "list", "--all", "--json")).stdout)
    return next(h["status"] for h in hooks if h["id"] == hook_id)


def _remove_on_a_terminal(hook_id: int, answer: str) -> subprocess.CompletedProcess[bytes]:
    primary, secondary = os.openpty()
    try:
        with subprocess.Popen(
            [sys.executable, "-m", "keyvault", "webhook", "remove", str(hook_id)],
            stdin=secondary,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc:
            os.close(secondary)
            secondary = -1
            os.write(primary, answer.encode() + b"\n")
            out, err = proc.communicate(timeout=TIMEOUT)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        os.close(primary)
        if secondary != -1:
            os.close(secondary)


def test_without_a_terminal_it_needs_yes(cli: Cli, hook_id: int):
    result = cli("webhook", "remove", str(hook_id))
    assert result.exit_code == 2 and "pass --yes" in result.stderr
    assert _status(cli, hook_id) == "active"


def test_yes_removes_without_asking(cli: Cli, hook_id: int):
    out = expect(cli("webhook", "remove", str(hook_id), "--yes")).stdout
    assert out.startswith(f"webhook {hook_id} removed")
    assert _status(cli, hook_id) == "removed"


def test_a_missing_webhook_fails_before_the_question(cli: Cli, hook_id: int):
    result = cli("webhook", "remove", str(hook_id + 1))
    assert result.exit_code == 1 and f"no webhook with id {hook_id + 1}" in result.stderr


def test_declining_on_a_terminal_removes_nothing(cli: Cli, hook_id: int):
    result = _remove_on_a_terminal(hook_id, "n")
    assert result.returncode != 0
    assert b"Remove it now?" in result.stderr and b"removed" not in result.stdout
    assert _status(cli, hook_id) == "active"


def test_confirming_on_a_terminal_removes(cli: Cli, hook_id: int):
    result = _remove_on_a_terminal(hook_id, "y")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.decode().startswith(f"webhook {hook_id} removed")
    assert _status(cli, hook_id) == "removed"
