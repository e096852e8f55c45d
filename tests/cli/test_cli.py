"""The click CLI: help, exit codes, one-line errors, JSON output, lazy imports."""

from __future__ import annotations

import json
import sys

import click
import pytest

from keyvault.cli import main
from tests.support.cli import Cli, clear_keyvault_env, expect, one_error_line, run_process
from tests.support.leak_guard import new_key

HEAVY = ("sqlalchemy", "alembic", "paramiko", "cryptography", "psycopg")
CLUSTER = "ta2"


def groups(command: click.Command = main, path: tuple[str, ...] = ()):
    """Every group of the CLI, with the argv that reaches it."""
    if isinstance(command, click.Group):
        yield path, command
        for name, sub in command.commands.items():
            yield from groups(sub, (*path, name))


def all_commands(command: click.Command = main, path: tuple[str, ...] = ()):
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from all_commands(sub, (*path, name))
    else:
        yield path


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """An environment whose home does not exist: commands that need it must say so."""
    clear_keyvault_env(monkeypatch)
    home = tmp_path / "no-home"
    monkeypatch.setenv("KEYVAULT_HOME", str(home))
    return home


# --- help ----------------------------------------------------------------------------


def test_the_cli_has_the_documented_commands():
    found = {" ".join(path) for path in all_commands()}
    assert {
        "init",
        "db upgrade",
        "db current",
        "db check",
        "cluster add",
        "cluster list",
        "import",
        "secrets list",
        "secrets show",
        "secrets history",
        "master-key rotate",
    } <= found


@pytest.mark.parametrize("path", [p for p, _ in groups()], ids=lambda p: " ".join(p) or "keyvault")
def test_help_of_every_group_lists_its_commands(path, nowhere):
    group = dict(groups())[path]
    for flag in ("--help", "-h"):
        result = Cli().invoke([*path, flag])
        assert result.exit_code == 0, result.output
        assert result.stderr == ""
        listed = result.stdout.split("Commands:", 1)[1]
        for name in group.commands:
            assert f"  {name} " in listed or listed.rstrip().endswith(f"  {name}"), name
    assert not nowhere.exists()  # help touches nothing


@pytest.mark.parametrize("path", list(all_commands()), ids=lambda p: " ".join(p))
def test_help_of_every_command(path, nowhere):
    result = Cli().invoke([*path, "--help"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: ")
    assert not nowhere.exists()


def test_version(nowhere):
    result = Cli().invoke(["--version"])
    assert result.exit_code == 0
    assert "0.1.0" in result.stdout


def test_secrets_and_keys_never_come_from_argv():
    import_params = {p.name for p in dict(all_commands_with_objects())[("import",)].params}
    assert not {"key", "secret", "value"} & import_params


def all_commands_with_objects(command: click.Command = main, path: tuple[str, ...] = ()):
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from all_commands_with_objects(sub, (*path, name))
    else:
        yield path, command


# --- exit codes and errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["no-such-command"],
        ["secrets", "show"],  # --cluster missing
        ["secrets", "show", "--cluster", CLUSTER, "--root", "--appid", "demo"],
        ["secrets", "show", "--cluster", CLUSTER],
        ["secrets", "show", "--cluster", CLUSTER, "--root", "--version", "two"],
        ["import", "--cluster", CLUSTER, "--bogus"],
        ["cluster", "add", CLUSTER],  # --open-api-url missing
    ],
    ids=[
        "unknown-command",
        "missing-cluster",
        "root-and-appid",
        "no-scope",
        "bad-version",
        "unknown-option",
        "missing-url",
    ],
)
def test_usage_errors_exit_2(args, nowhere):
    result = Cli().invoke(args, input="")
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    # One line, like every other error, pointing at the command's --help.
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "--help" in result.stderr
    assert "Traceback" not in result.output
    assert not nowhere.exists()


@pytest.mark.parametrize(
    "appid", ["x; rm -rf ~", "$(id)", "a'b", 'a"b', "a\nb", "-rf", "a" * 65, "ａｐｐ"]
)
def test_invalid_appid_is_exit_2_with_one_error_line(appid, nowhere):
    result = Cli().invoke(["secrets", "show", "--cluster", CLUSTER, f"--appid={appid}"])
    one_error_line(result, 2, "invalid APPID")
    assert result.stdout == ""
    assert not nowhere.exists()  # refused before anything was opened or written


def test_missing_store_is_exit_1_naming_keyvault_init(tmp_path, monkeypatch, nowhere):
    nowhere.mkdir(mode=0o700)
    one_error_line(Cli().invoke(["secrets", "list"]), 1, "keyvault init")


def test_unreadable_config_is_exit_1(nowhere):
    nowhere.mkdir(mode=0o700)
    (nowhere / "keyvault.toml").write_text("[database\n")
    one_error_line(Cli().invoke(["cluster", "list"]), 1, "keyvault.toml")


def test_garbage_sqlite_file_is_a_clean_database_error(tmp_path, monkeypatch, nowhere):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an SQLite database, not at all" * 100)
    monkeypatch.setenv("KEYVAULT_DATABASE_URL", f"sqlite:///{garbage}")
    one_error_line(Cli().invoke(["secrets", "list"]), 1, "database")


@pytest.mark.parametrize(
    "args",
    [
        ["secrets", "list"],
        ["cluster", "list"],
        ["db", "current"],
        ["db", "check"],
        ["db", "upgrade"],
        ["init"],
    ],
    ids=lambda a: " ".join(a),
)
def test_unreachable_postgres_is_a_clean_database_error(monkeypatch, nowhere, args):
    monkeypatch.setenv(
        "KEYVAULT_DATABASE_URL",
        "postgresql+psycopg://kv:Pw-sEcReT-99@127.0.0.1:1/none?connect_timeout=2",
    )
    line = one_error_line(Cli().invoke(args), 1, "the database", "Connection refused")
    assert "internal error" not in line
    assert "Pw-sEcReT-99" not in line  # the URL is shown without its password


def test_operational_errors_exit_1_with_one_line(cli: Cli):
    expect(cli("init"))
    one_error_line(
        cli("secrets", "list", "--cluster", "nope"),
        1,
        "no cluster named 'nope'",
        "keyvault cluster",
    )
    one_error_line(cli("secrets", "show", "--cluster", "nope", "--root"), 1, "no cluster")
    one_error_line(cli("import", "--cluster", "nope", "--root", input=new_key()), 1, "no cluster")
    expect(cli("cluster", "add", CLUSTER, "--open-api-url", "http://ta2:8992"))
    one_error_line(
        cli("cluster", "add", CLUSTER, "--open-api-url", "http://ta2:8992"), 1, "already exists"
    )
    one_error_line(cli("secrets", "history", "--cluster", CLUSTER, "--root"), 1, "no key stored")
    # input errors found by keyvault (not by click) are exit 2, one line as well
    one_error_line(cli("import", "--cluster", CLUSTER, "--root", input=""), 2, "no key given")
    one_error_line(
        cli("cluster", "add", "bad name", "--open-api-url", "http://x"), 2, "invalid cluster name"
    )


# --- JSON ------------------------------------------------------------------------------


def test_json_output_parses(cli: Cli):
    expect(cli("init"))
    assert json.loads(expect(cli("cluster", "list", "--json")).stdout) == []
    assert json.loads(expect(cli("secrets", "list", "--json")).stdout) == []
    expect(
        cli(
            "cluster", "add", CLUSTER, "--open-api-url", "http://ta2:8992/", "--login-name", "admin"
        )
    )
    keys = [new_key(), new_key()]
    for key in keys:
        expect(cli("import", "--cluster", CLUSTER, "--appid", "demo", input=key + "\n"))
    expect(cli("import", "--cluster", CLUSTER, "--root", input=new_key() + "\n"))

    clusters = json.loads(expect(cli("cluster", "list", "--json")).stdout)
    assert clusters[0]["name"] == CLUSTER
    assert clusters[0]["open_api_url"] == "http://ta2:8992"  # trailing slash dropped
    assert clusters[0]["options"] == {"login_name": "admin"}

    listed = json.loads(expect(cli("secrets", "list", "--json")).stdout)
    assert [(r["scope"], r["version"]) for r in listed] == [("app:demo", 2), ("root", 1)]
    assert all("key" not in r for r in listed)

    rows = json.loads(
        expect(cli("secrets", "history", "--cluster", CLUSTER, "--appid", "demo", "--json")).stdout
    )
    assert [(r["version"], r["state"], r["superseded_by"]) for r in rows] == [
        (1, "invalidated", 2),
        (2, "current", None),
    ]
    assert all("key" not in r for r in rows)

    shown = json.loads(
        expect(cli("secrets", "show", "--cluster", CLUSTER, "--appid", "demo", "--json")).stdout
    )
    assert shown["version"] == 2 and shown["key"].startswith("********")
    revealed = json.loads(
        expect(
            cli("secrets", "show", "--cluster", CLUSTER, "--appid", "demo", "--reveal", "--json")
        ).stdout
    )
    ok = revealed["key"] == keys[1]
    assert ok, "--reveal --json did not return the imported key"

    current = json.loads(expect(cli("db", "current", "--json")).stdout)
    assert current["current"] == current["head"]


def test_tables_for_people(cli: Cli):
    expect(cli("init"))
    assert expect(cli("secrets", "list")).stdout.strip() == "(none)"
    expect(cli("cluster", "add", CLUSTER, "--open-api-url", "http://ta2:8992"))
    key = new_key()
    expect(cli("import", "--cluster", CLUSTER, "--root", input=key))
    table = expect(cli("secrets", "list")).stdout.splitlines()
    assert table[0].split()[:3] == ["CLUSTER", "SCOPE", "VERSION"]
    assert table[1].split()[:3] == [CLUSTER, "root", "1"]
    shown = expect(cli("secrets", "show", "--cluster", CLUSTER, "--root")).stdout
    assert "--reveal to print" in shown and key not in shown


# --- lazy imports ----------------------------------------------------------------------

PROBE = f"""
import sys
from keyvault.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
print("HEAVY=" + ",".join(sorted({{m.split(".")[0] for m in sys.modules}} & {set(HEAVY)!r})))
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["secrets", "--help"],
        ["secrets", "show", "--help"],
        ["db", "--help"],
        ["import", "-h"],
    ],
    ids=lambda a: " ".join(a),
)
def test_help_imports_no_heavy_library(args, nowhere):
    result = run_process([sys.executable, "-c", PROBE, *args])
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout or "version" in result.stdout
    heavy_loaded = result.stdout.rsplit("HEAVY=", 1)[1].strip()
    assert heavy_loaded == "", f"`keyvault {' '.join(args)}` imported {heavy_loaded}"


def test_importtime_of_help_lists_no_heavy_module(nowhere):
    result = run_process([sys.executable, "-X", "importtime", "-m", "keyvault", "--help"])
    assert result.returncode == 0
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if "|" in line
    }
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert "keyvault" in imported and "click" in imported


# --- the executable (`keyvault`, `python -m keyvault`) ------------------------------------


def keyvault_process(*args: str, code: str = "from keyvault.cli import run; run()"):
    return run_process([sys.executable, "-c", code, *args])


def test_executable_keeps_exit_status_and_error_line(nowhere):
    result = keyvault_process("secrets", "list")
    assert result.returncode == 1, result
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1, (
        result.stderr
    )
    assert keyvault_process("secrets", "show", "--cluster").returncode == 2


def test_executable_flushes_output_into_a_pipe(nowhere):
    # A pipe makes stdout block-buffered: output not flushed before the fast exit would be lost.
    expect_ok = keyvault_process("init")
    assert expect_ok.returncode == 0, expect_ok.stderr
    listed = keyvault_process("cluster", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []


def test_executable_waits_for_a_thread_still_running(nowhere):
    # A non-daemon thread still running gets the normal shutdown, which waits for it: this
    # one prints only once the main thread has finished.
    code = (
        "import threading\n"
        "from keyvault.cli import run\n"
        "def after_main():\n"
        "    threading.main_thread().join()\n"
        "    print('thread ran to its end', flush=True)\n"
        "threading.Thread(target=after_main).start()\n"
        "run()\n"
    )
    result = keyvault_process("--version", code=code)
    assert result.returncode == 0, result.stderr
    assert "version" in result.stdout and "thread ran to its end" in result.stdout


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (3, 3), ("stopped: reason", 1)])
def test_exit_status_of_system_exit(code, status, capsys):
    from keyvault.cli import exit_status

    assert exit_status(SystemExit(code)) == status
    assert capsys.readouterr().err == ("stopped: reason\n" if isinstance(code, str) else "")
