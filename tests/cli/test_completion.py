"""Shell completion: the scripts, and names completed from a real database by real processes.

Each completion runs the executable as the shell script does: ``_KEYVAULT_COMPLETE`` with
``COMP_WORDS``/``COMP_CWORD`` (bash) in the environment, one ``type,value`` line per answer.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.cli import Cli
from tests.support.timeouts import TIMEOUT

KEY = "C" * 64


def ok(result, code: int = 0):
    assert result.exit_code == code, f"exit {result.exit_code}; stderr: {result.stderr!r}"
    return result


def complete(words: str, env: dict[str, str] | None = None) -> tuple[list[str], str]:
    """What bash would offer for the last word of ``words`` (and what went to stderr)."""
    argv = words.split(" ")
    result = subprocess.run(
        [sys.executable, "-c", "from keyvault.cli import run; run()"],
        env={
            **os.environ,
            **(env or {}),
            "_KEYVAULT_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(argv) - 1),
        },
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    offered = [line.split(",", 1)[1] for line in result.stdout.splitlines() if line]
    return offered, result.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_the_script_of_each_shell(shell, tmp_path, monkeypatch):
    monkeypatch.setenv("KEYVAULT_HOME", str(tmp_path / "untouched"))
    result = Cli().invoke(["completion", shell])
    assert result.exit_code == 0
    assert "_KEYVAULT_COMPLETE" in result.stdout
    assert f"{shell}_complete" in result.stdout  # the script calls keyvault back
    assert not (tmp_path / "untouched").exists()  # printing a script touches no store


def test_an_unknown_shell_is_a_usage_error():
    result = Cli().invoke(["completion", "tcsh"])
    assert result.exit_code == 2 and result.stderr.startswith("error: ")


@pytest.fixture
def store(cli):
    for args in (
        ("init",),
        ("cluster", "add", "prod", "--open-api-url", "http://prod:8992"),
        ("cluster", "add", "staging", "--open-api-url", "http://staging:8992"),
        ("cluster", "set", "prod", "--project-id", "billing=3", "--project-id", "search=4"),
        ("cluster", "set", "staging", "--project-id", "beta=9"),
        ("host", "add", "prod", "ta1.internal"),
        ("token", "create", "reader", "--scope", "root:prod"),
    ):
        ok(cli(*args))
    ok(cli("import", "--cluster", "prod", "--appid", "ads", input=KEY + "\n"))
    return cli


def test_commands_and_options_complete(store):
    assert complete("keyvault sta")[0] == ["status"]
    assert "--remove-project-id" in complete("keyvault cluster set prod --re")[0]


def test_cluster_names_complete(store):
    assert complete("keyvault cluster set ")[0] == ["prod", "staging"]
    assert complete("keyvault secrets show --cluster st")[0] == ["staging"]
    assert complete("keyvault host list --cluster p")[0] == ["prod"]


def test_appids_complete_for_the_given_cluster(store):
    assert complete("keyvault secrets show --cluster prod --appid ")[0] == [
        "ads",
        "billing",
        "search",
    ]
    assert complete("keyvault secrets show --cluster staging --appid ")[0] == ["beta"]
    assert complete("keyvault policy set --cluster prod --appid b")[0] == ["billing"]
    assert complete("keyvault cluster set prod --remove-project-id s")[0] == ["search"]
    assert complete("keyvault cluster set prod --project-id bi")[0] == ["billing="]


def test_other_names_complete(store):
    assert complete("keyvault token revoke ")[0] == ["reader"]
    assert complete("keyvault host remove prod ")[0] == ["ta1.internal"]


def test_rotation_ids_come_from_the_store(store, home):
    from keyvault.db import make_engine, session_factory, transaction
    from keyvault.models import Cluster, Rotation, utcnow
    from keyvault.services.names import rotation_ids

    engine = make_engine(home.database_url)
    try:
        with transaction(session_factory(engine)) as session:
            cluster_id = session.query(Cluster.id).filter(Cluster.name == "prod").scalar()
            now = utcnow()
            for rid, state in (("aaa000000001", "completed"), ("bbb000000002", "needs_recovery")):
                session.add(
                    Rotation(
                        id=rid,
                        cluster_id=cluster_id,
                        scope="root",
                        state=state,
                        host_label="h",
                        actor="pytest",
                        created_at=now,
                        updated_at=now,
                    )
                )
        with transaction(session_factory(engine)) as session:
            assert rotation_ids(session) == ["bbb000000002", "aaa000000001"]  # unresolved first
    finally:
        engine.dispose()


def test_an_unreachable_database_completes_nothing_and_prints_nothing(store):
    unreachable = {
        "KEYVAULT_DATABASE_URL": "postgresql+psycopg://kv:pw@127.0.0.1:1/none",
    }
    offered, stderr = complete("keyvault cluster set ", unreachable)
    assert offered == [] and stderr == ""
    # Commands and options still complete without the database.
    assert complete("keyvault clu", unreachable)[0] == ["cluster"]


def test_a_missing_sqlite_file_is_not_created(tmp_path):
    missing = tmp_path / "nothing-here.db"
    offered, stderr = complete(
        "keyvault cluster set ",
        {"KEYVAULT_HOME": str(tmp_path / "kv"), "KEYVAULT_DATABASE_URL": f"sqlite:///{missing}"},
    )
    assert offered == [] and stderr == ""
    assert not missing.exists() and not (tmp_path / "kv").exists()


def test_a_broken_config_completes_nothing_and_prints_nothing(store, home):
    home.config_file.write_text("[database\n")
    offered, stderr = complete("keyvault cluster set ")
    assert offered == [] and stderr == ""
