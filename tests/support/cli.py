"""The keyvault CLI harness: an isolated home, and keyvault run in-process or as a process.

``home`` makes an isolated ``KEYVAULT_HOME`` / ``KEYVAULT_DATABASE_URL`` (the ``db_url``
of the test) / ``KEYVAULT_MASTER_KEY_FILE`` and sets them in ``os.environ`` with
``monkeypatch``, which is how the CLI and any subprocess read their configuration;
``env`` is that environment as a dict. Then:

    cli("secrets", "list", "--json")      # in-process, click's CliRunner -> click Result
    run_keyvault("serve", "--help")       # `python -m keyvault ...` -> CompletedProcess
    run_process([sys.executable, ...])    # any other child, bounded the same way

Results may hold a key on stdout: assertion messages show stderr only (``expect``,
``describe``, ``proc_describe``), and pytest does not rewrite this module's asserts
(PYTEST_DONT_REWRITE), which would print the result objects, stdout and all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.timeouts import TIMEOUT

KEYVAULT = (sys.executable, "-m", "keyvault")


@dataclass(frozen=True)
class Home:
    """An isolated keyvault home and the environment that points at it."""

    path: Path
    database_url: str
    master_key_file: Path
    env: dict

    @property
    def config_file(self) -> Path:
        return self.path / "keyvault.toml"


def clear_keyvault_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove the caller's KEYVAULT_* settings (not the KEYVAULT_TEST_* switches)."""
    for name in list(os.environ):
        if name.startswith("KEYVAULT_") and not name.startswith("KEYVAULT_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def home(tmp_path_factory, db_url: str, monkeypatch) -> Home:
    """KEYVAULT_HOME (not yet created), KEYVAULT_DATABASE_URL and KEYVAULT_MASTER_KEY_FILE,
    set in ``os.environ`` for the CLI and for subprocesses."""
    path = tmp_path_factory.mktemp("kvhome") / "home"
    master_key_file = path / "master.key"
    env = {
        "KEYVAULT_HOME": str(path),
        "KEYVAULT_DATABASE_URL": db_url,
        "KEYVAULT_MASTER_KEY_FILE": str(master_key_file),
        "KEYVAULT_ACTOR": "pytest",
    }
    clear_keyvault_env(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Home(path=path, database_url=db_url, master_key_file=master_key_file, env=env)


@pytest.fixture
def env(home: Home) -> dict:
    """The environment dict of ``home`` (already applied to ``os.environ``)."""
    return dict(home.env)


def pytest_configure(config: pytest.Config) -> None:
    # A run started as a background job of a non-interactive shell (`pytest ... &` in a
    # script, some CI runners) inherits SIGINT ignored, and so does every child it starts:
    # a Python child then never gets the KeyboardInterrupt a test sends it as its Ctrl-C,
    # and the test hangs until its timeout (test_cli_serves_until_interrupted did). With a
    # handler here, children start with SIGINT at its default, as in an interactive run.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# ----------------------------------------------------------------------------- in-process


class Cli:
    """Runs ``keyvault`` in-process with click's CliRunner (separate stdout and stderr)."""

    def __init__(self) -> None:
        from click.testing import CliRunner

        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | bytes | None = None):  # noqa: A002
        return self.invoke(list(args), input=input)

    def invoke(self, args: list[str], input: str | bytes | None = None):  # noqa: A002
        """The same, with the arguments as a list (tests that build them)."""
        from keyvault.cli import main

        return self.runner.invoke(main, args, input=input, catch_exceptions=False)


@pytest.fixture
def cli(env) -> Cli:
    """``cli("secrets", "list", "--json")`` → click Result, in the ``env`` environment."""
    return Cli()


def describe(result) -> str:
    """A failure message for a CLI result that never shows stdout (it may hold a key)."""
    return f"exit {result.exit_code}; stderr: {result.stderr.strip()!r}"


def expect(result, code: int = 0):
    """Assert the exit code; on failure show only stderr (errors never contain keys)."""
    assert result.exit_code == code, describe(result)
    return result


def one_error_line(result, code: int, *fragments: str) -> str:
    """The exit code is ``code`` and stderr is exactly one line 'error: ...' with ``fragments``."""
    assert result.exit_code == code, describe(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, describe(result)
    assert lines[0].startswith("error: "), describe(result)
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], describe(result)
    return lines[0]


# ------------------------------------------------------------------------- real processes


def run_process(
    argv: Sequence[str],
    *,
    input: str | None = None,  # noqa: A002 - the name subprocess.run uses
    env: dict | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = TIMEOUT,
) -> subprocess.CompletedProcess:
    """Run a child to its end (text output captured, stdin ``input`` or nothing), bounded
    by ``timeout``; the environment is ``os.environ`` (the ``home`` of the test) unless
    ``env`` is given."""
    return subprocess.run(
        list(argv),
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,  # never the terminal's
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else dict(os.environ),
        cwd=cwd,
    )


def run_keyvault(
    *args: str,
    input: str | None = None,  # noqa: A002 - the name subprocess.run uses
    env: dict | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess:
    """``python -m keyvault ARGS`` in another process (see ``run_process``)."""
    return run_process([*KEYVAULT, *args], input=input, env=env, cwd=cwd)


def spawn_process(
    argv: Sequence[str],
    *,
    env: dict | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.Popen:
    """Start a child (no stdin, text pipes for stdout and stderr); the caller waits for it
    (``communicate(timeout=TIMEOUT)``)."""
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env if env is not None else dict(os.environ),
        cwd=cwd,
    )


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie its parent has not reaped yet counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The comm field may hold spaces and parentheses: the state follows the last ')'.
    return stat.rpartition(")")[2].split()[0] == "Z"


def proc_describe(result: subprocess.CompletedProcess) -> str:
    """A failure message for a subprocess that shows only its stderr (stdout may hold a secret)."""
    return f"exit {result.returncode}; stderr: {result.stderr.strip()[-800:]!r}"


def audit_report(cli, *args: str) -> dict:
    """`keyvault audit verify --json`: the report, whether the chain verified (exit 0) or not (1)."""
    import json

    result = cli("audit", "verify", "--json", *args)
    assert result.exit_code in (0, 1), result.stderr
    return json.loads(result.stdout)
