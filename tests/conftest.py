"""Test-suite wiring: the shared fixtures and hooks live in ``tests/support/`` (see its
``__init__``) and are loaded here as plugins; test modules import helpers from
``tests.support.<module>`` (the repository root is on ``sys.path`` through pytest's
``pythonpath`` setting in pyproject.toml)."""

# A plugin must be listed before any other plugin imports it (pytest rewrites the asserts
# of each as it registers it, and cannot once it has been imported).
pytest_plugins = [
    "tests.support.leak_guard",
    "tests.support.db",
    "tests.support.cli",
    "tests.support.sshd",
    "tests.support.http",
]
