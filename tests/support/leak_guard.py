"""A pytest plugin: the whole run's captured output must contain no generated key.

Every key the ta-tool emulator generates is logged by SHA-256 in its state dir
(``generated.sha256``). This plugin collects everything pytest captured — stdout,
stderr (fd level, so subprocesses too), log records (keyvault's loggers at DEBUG)
and failure reports — and at the end hashes every 64-character token in it. A
match is a leaked key: the run fails, naming only how many were found.

Keys a test makes itself come from ``new_key``, which logs them the same way (a
``generated.sha256`` under pytest's basetemp), so they are looked for too. Under
pytest-xdist the controller scans: it receives every worker's reports, and the workers'
basetemps are under its own.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import string
from pathlib import Path

import pytest

KEY_ALPHABET = string.ascii_letters + string.digits

_captured: list[str] = []
_state_dirs: set[Path] = set()
_key_log: Path | None = None


def new_key(length: int = 64) -> str:
    """A random key in TA's shape ([A-Za-z0-9]{64}), known to the guard; never print it."""
    key = "".join(secrets.choice(KEY_ALPHABET) for _ in range(length))
    if _key_log is not None:
        with open(_key_log, "a", encoding="ascii") as log:
            log.write(hashlib.sha256(key.encode()).hexdigest() + "\n")
    return key


def pytest_configure(config: pytest.Config) -> None:
    # Let keyvault's own debug logging reach the capture, so it is scanned too.
    logging.getLogger("keyvault").setLevel(logging.DEBUG)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for _title, content in report.sections:
        _captured.append(content)
    if report.longrepr is not None:
        _captured.append(str(report.longrepr))


@pytest.fixture(scope="session", autouse=True)
def _remember_basetemp(tmp_path_factory):
    from keyvault.sandbox.state import FINGERPRINT_LOG

    global _key_log
    basetemp = tmp_path_factory.getbasetemp()
    _state_dirs.add(basetemp)
    (basetemp / "new-keys").mkdir(exist_ok=True)
    _key_log = basetemp / "new-keys" / FINGERPRINT_LOG
    yield
    _key_log = None


def _fingerprints() -> set[str]:
    from keyvault.sandbox.state import FINGERPRINT_LOG

    roots = set(_state_dirs)
    try:
        from tests.support.sshd_env import load_sshd_env

        env = load_sshd_env()
        if env is not None:
            roots.add(Path(env.tatool_state_dir))
    except Exception:  # noqa: BLE001 - no sshd environment: nothing to add
        pass
    found: set[str] = set()
    for root in roots:
        for log in [root / FINGERPRINT_LOG, *root.rglob(FINGERPRINT_LOG)] if root.is_dir() else []:
            try:
                found |= {line.strip() for line in log.read_text().splitlines() if line.strip()}
            except OSError:
                continue
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from keyvault.sandbox.state import find_leaks

    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller gets every report and scans them all
    if session.config.pluginmanager.has_plugin("dsession"):
        # The xdist controller: the workers' basetemps (their new-keys) are under its own.
        _state_dirs.add(session.config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    fingerprints = _fingerprints()
    leaks = find_leaks("\n".join(_captured), fingerprints)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    line = (
        f"leak guard: scanned {sum(map(len, _captured))} captured characters against "
        f"{len(fingerprints)} generated keys: {leaks} leaked"
    )
    if reporter is not None:
        reporter.write_line(line)
    if leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
