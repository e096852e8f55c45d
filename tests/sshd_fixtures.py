"""Fixtures for the real sshd (tests/sshd/setup.sh) and PostgreSQL, imported by
tests/conftest.py (fixtures and hooks, by name).

Both are optional for a developer (tests that need them are skipped, with the reason)
and required in CI: ``KEYVAULT_TEST_REQUIRE_SSHD=1`` / ``KEYVAULT_TEST_REQUIRE_POSTGRES=1``
turn the skip into a failure. Tests using ``sshd_env`` get the ``sshd`` marker and
those using ``postgres_url`` the ``postgres`` marker, so ``-m 'not sshd'`` works.
"""

from __future__ import annotations

import os

import pytest
from sshd_env import SshdEnv, load_sshd_env, require_sshd

POSTGRES_URL_VAR = "KEYVAULT_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_VAR = "KEYVAULT_TEST_REQUIRE_POSTGRES"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def require_postgres(url: str | None = None) -> str:
    """Return a PostgreSQL URL that answers ``SELECT 1``; else fail (required) or skip."""
    url = url or os.environ.get(POSTGRES_URL_VAR) or DEFAULT_POSTGRES_URL
    problem = None
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(url, connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        finally:
            engine.dispose()
    except ImportError as exc:
        problem = (
            f"the PostgreSQL driver is not installed ({exc}); pip install -e '.[postgres,test]'"
        )
    except Exception as exc:  # noqa: BLE001 - any connect error means "no PostgreSQL"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        problem = f"cannot connect to PostgreSQL ({first})"
    if problem is None:
        return url
    shown = url.split("@")[-1]
    message = (
        f"{problem} at {shown}; start it (pg_ctlcluster --skip-systemctl-redirect <ver> main "
        f"start) or set {POSTGRES_URL_VAR}"
    )
    if _truthy(REQUIRE_POSTGRES_VAR):
        pytest.fail(f"{REQUIRE_POSTGRES_VAR}=1 but {message}", pytrace=False)
    pytest.skip(message)
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def sshd_env() -> SshdEnv:
    """The test sshd (tests/sshd/setup.sh): host, port, identities, ta password..."""
    return require_sshd(load_sshd_env())


@pytest.fixture
def ta_sim(sshd_env: SshdEnv):
    """The ta-tool emulator's state dir behind the test sshd, with no noise options
    before and after the test (keys and counters are shared: compare, don't assume)."""
    from keyvault.sandbox import state as st

    state_dir = sshd_env.tatool_state_dir
    st.clear_noise(state_dir)
    yield state_dir
    st.clear_noise(state_dir)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A reachable PostgreSQL URL ($KEYVAULT_TEST_POSTGRES_URL, default the local test db)."""
    return require_postgres()


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so that the markers exist whatever
    # ini file is in use (filterwarnings=error turns unknown marks into errors).
    config.addinivalue_line("markers", "sshd: needs the real OpenSSH sshd fixture")
    config.addinivalue_line("markers", "postgres: runs against PostgreSQL")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "sshd_env" in names and item.get_closest_marker("sshd") is None:
            item.add_marker(pytest.mark.sshd)
        if "postgres_url" in names and item.get_closest_marker("postgres") is None:
            item.add_marker(pytest.mark.postgres)
