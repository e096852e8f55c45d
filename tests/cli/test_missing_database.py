"""A command on a missing SQLite database says to run `init` and leaves no file behind.

sqlite3 creates a missing file on connect; before this, `secrets list` on a mistyped
`database_url` (or a deleted database) left an empty database there and then complained
that it had no schema. Only a schema upgrade (`init`, `db upgrade`) may create the file.
"""

from __future__ import annotations

import pytest

from tests.support.cli import expect, one_error_line

READ_COMMANDS = [
    ("secrets", "list"),
    ("cluster", "list"),
    ("rotations", "list"),
    ("audit", "list"),
    ("db", "current"),
    ("db", "check"),
]


@pytest.fixture
def missing(cli, home, monkeypatch):
    """An initialised home whose database_url names a file that does not exist."""
    expect(cli("init"))
    path = home.path / "elsewhere" / "typo.db"
    path.parent.mkdir()
    monkeypatch.setenv("KEYVAULT_DATABASE_URL", f"sqlite:///{path}")
    return path


@pytest.mark.parametrize("args", READ_COMMANDS, ids=" ".join)
def test_read_commands_do_not_create_the_file(cli, missing, args):
    one_error_line(cli(*args), 1, f"no keyvault database at {missing}", "keyvault init")
    assert not missing.exists()
    assert list(missing.parent.iterdir()) == []  # no -wal / -shm / journal either


def test_status_reports_it_and_creates_nothing(cli, missing):
    result = cli("status")
    assert result.exit_code == 3
    assert "no keyvault database" in result.stdout
    assert not missing.exists()


def test_db_upgrade_creates_it(cli, missing):
    expect(cli("db", "upgrade"))
    assert missing.exists()
    expect(cli("cluster", "list"))
