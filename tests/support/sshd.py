"""The real test sshd's fixtures and the suite's markers (a plugin, see tests/conftest.py).

``sshd_env`` is the sshd of tests/sshd/setup.sh (read by ``tests.support.sshd_env``),
``ta_sim`` the state of the ta-tool emulator behind it. Optional for a developer (the
tests are skipped, with the reason), required in CI: ``KEYVAULT_TEST_REQUIRE_SSHD=1``
turns the skip into a failure (``KEYVAULT_TEST_REQUIRE_POSTGRES=1`` likewise for
PostgreSQL, see ``tests.support.db``). Tests using ``sshd_env`` get the ``sshd`` marker
and those using ``postgres_url`` the ``postgres`` marker, so ``-m 'not sshd'`` works.
"""

from __future__ import annotations

import pytest

from tests.support.sshd_env import SshdEnv, load_sshd_env, require_sshd


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


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so that the markers exist whatever
    # ini file is in use (filterwarnings=error turns unknown marks into errors).
    config.addinivalue_line("markers", "sshd: needs the real OpenSSH sshd fixture")
    config.addinivalue_line("markers", "postgres: runs against PostgreSQL")
    config.addinivalue_line("markers", "slow: takes long; make test-fast leaves it out")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "sshd_env" in names and item.get_closest_marker("sshd") is None:
            item.add_marker(pytest.mark.sshd)
        if "postgres_url" in names and item.get_closest_marker("postgres") is None:
            item.add_marker(pytest.mark.postgres)
