"""keyvault.toml: unknown tables and keys are refused with the nearest valid name."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyvault.config import CONFIG_FILE_NAME, load_settings
from keyvault.errors import ConfigError
from tests.support.cli import Cli


def settings_with(tmp_path: Path, text: str):
    home = tmp_path / "kv"
    home.mkdir(mode=0o700, exist_ok=True)
    (home / CONFIG_FILE_NAME).write_text(text)
    return load_settings({"KEYVAULT_HOME": str(home)}), home / CONFIG_FILE_NAME


def refusal(tmp_path: Path, text: str) -> tuple[str, Path]:
    with pytest.raises(ConfigError) as info:
        settings_with(tmp_path, text)
    return str(info.value), tmp_path / "kv" / CONFIG_FILE_NAME


def test_a_misspelt_key_names_the_nearest_valid_one(tmp_path):
    message, path = refusal(tmp_path, "[ssh]\nconect_timeout = 5\n")
    assert message == (
        f"unknown key 'conect_timeout' in [ssh] of {path}; did you mean 'connect_timeout'?"
    )


def test_a_misspelt_table_names_the_nearest_valid_one(tmp_path):
    message, path = refusal(tmp_path, "[databse]\nurl = 'sqlite:///x.db'\n")
    assert message == f"unknown table [databse] in {path}; did you mean [database]?"


def test_a_key_with_nothing_near_lists_the_valid_ones(tmp_path):
    message, _ = refusal(tmp_path, "[rotation]\nparallelism = 4\n")
    assert "unknown key 'parallelism' in [rotation]" in message
    assert "valid keys here: batch_size" in message


def test_a_top_level_value_is_refused(tmp_path):
    message, path = refusal(tmp_path, "url = 'sqlite:///x.db'\n")
    assert message.startswith(f"unknown key 'url' in {path}")


def test_a_nested_table_is_checked_too(tmp_path):
    message, _ = refusal(tmp_path, "[ssh.options]\nconnect_timeout = 5\n")
    assert "unknown key 'options' in [ssh]" in message


def test_a_table_where_a_value_belongs_is_refused(tmp_path):
    message, _ = refusal(tmp_path, "[ssh.connect_timeout]\nseconds = 5\n")
    assert "connect_timeout in [ssh]" in message and "must be a value" in message


def test_a_value_where_a_table_belongs_is_refused(tmp_path):
    message, _ = refusal(tmp_path, "ssh = 5\n")
    assert "[ssh]" in message and "must be a table" in message


def test_free_form_tables_take_any_keys(tmp_path):
    settings, _ = settings_with(tmp_path, '[ta]\nerror_codes = { "-1005" = "too fast" }\n')
    assert settings.ta_error_codes == {-1005: "too fast"}


def test_every_valid_key_is_accepted(tmp_path):
    settings, _ = settings_with(
        tmp_path,
        "[ssh]\nconnect_timeout = 5\ncommand_timeout = 60\n[rotation]\nbatch_size = 7\n"
        "[ta]\ntimeout = 3\n",
    )
    assert (settings.ssh_connect_timeout, settings.ssh_command_timeout) == (5.0, 60.0)
    assert (settings.rotation_batch_size, settings.ta_timeout) == (7, 3.0)


def test_the_cli_refuses_an_unknown_key_in_one_line(tmp_path, monkeypatch):

    _, path = settings_with(tmp_path, "[ssh]\nconnect_timeout = 5\n")
    path.write_text("[ssh]\nconect_timeout = 5\n")
    for name in ("KEYVAULT_DATABASE_URL", "KEYVAULT_MASTER_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KEYVAULT_HOME", str(path.parent))
    result = Cli().invoke(["cluster", "list"])
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: unknown key 'conect_timeout' in [ssh] of {path}; did you mean 'connect_timeout'?\n"
    )
