"""The leak guard itself must catch a generated key in captured output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.timeouts import TIMEOUT

REPO = Path(__file__).resolve().parents[2]

INNER = """
from keyvault.sandbox import state

def test_prints_a_generated_key(tmp_path):
    state.init_state(tmp_path / "sim", ["a"])
    print("oops", state.generate(tmp_path / "sim", "app:a"))
"""


def run_inner(tmp_path, body: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_inner.py").write_text(body)
    env_path = str(REPO)  # tests.support.leak_guard, and keyvault
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.support.leak_guard",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'inner'}",
            "--rootdir",
            str(tmp_path),
            "-c",
            "/dev/null",
            str(tmp_path / "test_inner.py"),
        ],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": env_path, "KEYVAULT_TEST_SSHD": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_a_printed_key_fails_the_run(tmp_path):
    result = run_inner(tmp_path, INNER)
    assert "1 leaked" in result.stdout
    assert result.returncode == 1


def test_a_clean_run_passes(tmp_path):
    result = run_inner(tmp_path, INNER.replace('print("oops", ', "(").replace("))", "))"))
    assert "0 leaked" in result.stdout
    assert result.returncode == 0
