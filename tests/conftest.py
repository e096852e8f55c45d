"""Test-suite wiring: puts tests/ on sys.path (it has no __init__.py, so helper
modules are imported by plain name) and imports the shared fixtures, which pytest
finds through these imports.

- sshd_fixtures: ``sshd_env`` (the real sshd of tests/sshd/setup.sh, see
  tests/sshd_env.py), ``ta_sim`` (its ta-tool emulator state, noise cleared) and
  ``postgres_url``; skipped when missing, failing under ``KEYVAULT_TEST_REQUIRE_SSHD=1``
  / ``KEYVAULT_TEST_REQUIRE_POSTGRES=1``; adds the ``sshd``/``postgres`` markers.
- db_fixtures: database and CLI fixtures (db_url on SQLite and PostgreSQL, env/home, cli).
"""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

# Database and CLI fixtures (db_url on SQLite and PostgreSQL, env/home, cli).
from db_fixtures import (  # noqa: E402,F401  (fixtures, found by pytest through this import)
    blank_database,
    blank_db_url,
    cli,
    database,
    db_url,
    engine,
    env,
    home,
    postgres_server,
)
from sshd_fixtures import (  # noqa: E402,F401  (fixtures and hooks, found by pytest here)
    postgres_url,
    pytest_collection_modifyitems,
    pytest_configure,
    sshd_env,
    ta_sim,
)

# The whole run's captured output must hold no generated key (tests/leak_guard.py).
pytest_plugins = ["leak_guard"]
