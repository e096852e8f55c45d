"""Destructive commands ask first; declining is one `error:` line and changes nothing.

The question needs a terminal, so these run the real executable with its standard input
on a pseudo-terminal (``pty``), answering as a person would.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest

from tests.support.cli import Cli
from tests.support.timeouts import TIMEOUT

CLUSTER = "ta2"


def ok(result, code: int = 0):
    assert result.exit_code == code, f"exit {result.exit_code}; stderr: {result.stderr!r}"
    return result


def on_terminal(*args: str, answer: str) -> subprocess.CompletedProcess:
    """Run keyvault with stdin on a pty, typing ``answer``; stdout and stderr are pipes."""
    leader, follower = pty.openpty()
    try:
        os.write(leader, answer.encode())
        return subprocess.run(
            [sys.executable, "-c", "from keyvault.cli import run; run()", *args],
            stdin=follower,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    finally:
        os.close(follower)
        os.close(leader)


@pytest.fixture
def store(cli):
    ok(cli("init"))
    ok(cli("cluster", "add", CLUSTER, "--open-api-url", "http://ta2:8992"))
    ok(cli("token", "create", "svc", "--scope", f"root:{CLUSTER}"))
    ok(cli("host", "add", CLUSTER, "ta2.internal"))
    return cli


def token_status(cli) -> str:
    [row] = json.loads(ok(cli("token", "list", "--json")).stdout)
    return row["status"]


def hosts(cli) -> list[str]:
    return [h["address"] for h in json.loads(ok(cli("host", "list", "--json")).stdout)]


def master_key_id(cli) -> str:
    return json.loads(ok(cli("init", "--json")).stdout)["master_key_id"]


DESTRUCTIVE = [
    ("token", "revoke", "svc"),
    ("host", "remove", CLUSTER, "ta2.internal"),
    ("master-key", "rotate"),
]


def state(cli) -> tuple:
    return token_status(cli), hosts(cli), master_key_id(cli)


@pytest.mark.parametrize("args", DESTRUCTIVE, ids=lambda a: " ".join(a[:2]))
def test_declining_is_one_error_line_and_changes_nothing(store, args):
    before = state(store)
    result = on_terminal(*args, answer="n\n")
    assert result.returncode == 1, result.stderr
    assert "Aborted" not in result.stderr, repr(result.stderr)
    # The prompt has no newline of its own (on a terminal the typed answer ends the line),
    # so in this pipe the error follows it on the last line.
    assert result.stderr.count("error: ") == 1
    assert result.stderr.endswith(
        "[y/N]: error: not confirmed, nothing was changed; pass --yes to skip the question\n"
    )
    assert "[y/N]" in result.stderr  # the question was asked
    assert state(store) == before


@pytest.mark.parametrize("args", DESTRUCTIVE, ids=lambda a: " ".join(a[:2]))
def test_end_of_input_at_the_question_is_a_decline(store, args):
    before = state(store)
    result = on_terminal(*args, answer="\x04")  # ^D
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1].endswith(
        ": error: not confirmed, nothing was changed; pass --yes to skip the question"
    )
    assert state(store) == before


def test_agreeing_does_it(store):
    result = on_terminal("token", "revoke", "svc", answer="y\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "token svc revoked"
    assert token_status(store) == "revoked"
    result = on_terminal("host", "remove", CLUSTER, "ta2.internal", answer="y\n")
    assert result.returncode == 0, result.stderr
    assert hosts(store) == []


@pytest.mark.parametrize("args", DESTRUCTIVE, ids=lambda a: " ".join(a[:2]))
def test_without_a_terminal_yes_is_required(store, args):
    before = state(store)
    result = Cli().invoke(list(args), input="y\n")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "pass --yes" in result.stderr
    assert state(store) == before


def test_yes_skips_the_question_and_json_shows_what_was_done(store):
    revoked = json.loads(ok(store("token", "revoke", "svc", "--yes", "--json")).stdout)
    assert (revoked["name"], revoked["status"]) == ("svc", "revoked")
    removed = json.loads(
        ok(store("host", "remove", CLUSTER, "ta2.internal", "--yes", "--json")).stdout
    )
    assert (removed["cluster"], removed["address"], removed["port"]) == (
        CLUSTER,
        "ta2.internal",
        22,
    )
    old = master_key_id(store)
    rotated = json.loads(ok(store("master-key", "rotate", "--yes", "-o", "json")).stdout)
    assert rotated["old_master_key_id"] == old
    assert rotated["new_master_key_id"] == master_key_id(store) != old
    assert rotated["rewrapped"] == 0


def test_a_missing_host_is_not_found_before_any_question(store):
    result = store("host", "remove", CLUSTER, "nowhere.internal")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no host nowhere.internal in cluster ta2")
