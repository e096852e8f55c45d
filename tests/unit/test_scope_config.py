"""APPID and scope validation; settings from keyvault.toml and the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyvault.config import DEFAULT_APPID_PATTERN, Settings, load_settings, os_actor
from keyvault.errors import ConfigError, InvalidInput
from keyvault.scope import app_scope, parse_scope, root_scope, validate_appid

# --- APPID and scope ------------------------------------------------------------

HOSTILE_APPIDS = [
    "x; rm -rf ~",
    "$(id)",
    "`id`",
    "a$(id)",
    "'quoted'",
    '"quoted"',
    "app'",
    'app"',
    "app\nid",
    "app\n",
    "\napp",
    "app\r",
    "app\x00",
    "-rf",
    "-appid",
    "_leading_underscore",
    "a" * 65,
    "",
    " ",
    "app id",
    "app\tid",
    "app/../../etc",
    "app|cat",
    "app&",
    "app>out",
    "app*",
    "ａｐｐ",  # fullwidth letters
    "appé",
    "应用",
    "app\u200b",  # zero-width space
    "app\u0661",  # Arabic-Indic digit one
]

GOOD_APPIDS = ["a", "A", "0", "demo", "app_1", "app-1", "9f8e7d6c5b4a", "a" * 64, "A-_0"]


@pytest.mark.parametrize("appid", HOSTILE_APPIDS, ids=lambda v: repr(v)[:20])
def test_hostile_appids_are_refused(appid):
    with pytest.raises(InvalidInput) as info:
        validate_appid(appid)
    message = str(info.value)
    assert "invalid APPID" in message
    assert "\n" not in message and "\r" not in message  # one line, whatever the input
    assert info.value.exit_code == 2
    with pytest.raises(InvalidInput):
        app_scope(appid)
    with pytest.raises(InvalidInput):
        parse_scope(f"app:{appid}")


@pytest.mark.parametrize("appid", GOOD_APPIDS)
def test_good_appids_are_accepted(appid):
    assert validate_appid(appid) == appid
    scope = app_scope(appid)
    assert str(scope) == f"app:{appid}"
    assert not scope.is_root
    assert parse_scope(str(scope)) == scope


def test_non_string_appid_is_refused():
    with pytest.raises(InvalidInput):
        validate_appid(123)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        validate_appid(None)  # type: ignore[arg-type]


def test_hostile_value_is_shown_escaped_and_shortened():
    with pytest.raises(InvalidInput) as info:
        validate_appid("x" * 500 + "\n$(id)")
    assert len(str(info.value)) < 300


def test_root_scope():
    scope = root_scope()
    assert scope.is_root and str(scope) == "root"
    assert parse_scope("root") == scope
    assert scope.describe() == "the root key"
    assert app_scope("demo").describe() == "the key of app demo"


@pytest.mark.parametrize(
    "text", ["ROOT", "app", "app:", "project:demo", " root", "root ", "", "app:a:b"]
)
def test_invalid_scopes_are_refused(text):
    with pytest.raises(InvalidInput):
        parse_scope(text)


def test_custom_appid_pattern():
    pattern = r"^[0-9]{4}$"
    assert validate_appid("1234", pattern) == "1234"
    with pytest.raises(InvalidInput, match=r"\[0-9\]\{4\}"):
        validate_appid("demo", pattern)
    # A custom pattern is matched in full, even without anchors.
    with pytest.raises(InvalidInput):
        validate_appid("12345", "[0-9]{4}")


# --- settings ---------------------------------------------------------------------


def write_config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "keyvault.toml").write_text(text)


def test_defaults_from_home(tmp_path):
    home = tmp_path / "kv"
    settings = load_settings({"KEYVAULT_HOME": str(home)})
    assert settings.home == home
    assert settings.database_url == f"sqlite:///{home / 'keyvault.db'}"
    assert settings.master_key_file == home / "master.key"
    assert settings.config_file == home / "keyvault.toml"
    assert settings.appid_pattern == DEFAULT_APPID_PATTERN
    assert settings.su_password is None and settings.ssh_passphrase is None


def test_home_defaults_to_dot_keyvault_in_home(tmp_path):
    settings = load_settings({"HOME": str(tmp_path)})
    assert settings.home == tmp_path / ".keyvault"
    assert settings.master_key_file == tmp_path / ".keyvault" / "master.key"


def test_relative_home_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings({"KEYVAULT_HOME": "rel"})
    assert settings.home == tmp_path / "rel"
    assert settings.home.is_absolute()


def test_config_file_values(tmp_path):
    home = tmp_path / "kv"
    write_config(
        home,
        """
[database]
url = "postgresql+psycopg://kv@db.internal/keyvault"

[master_key]
file = "/etc/keyvault/master.key"

[validation]
appid_pattern = "^[a-z]{3,8}$"

[ssh]
known_hosts_file = "/etc/keyvault/known_hosts"
connect_timeout = 3
command_timeout = 60.5

[ta]
timeout = 4
error_codes = { 1001 = "bad token" }
""",
    )
    settings = load_settings({"KEYVAULT_HOME": str(home)})
    assert settings.database_url == "postgresql+psycopg://kv@db.internal/keyvault"
    assert settings.master_key_file == Path("/etc/keyvault/master.key")
    assert settings.appid_pattern == "^[a-z]{3,8}$"
    assert settings.known_hosts_file == Path("/etc/keyvault/known_hosts")
    assert settings.ssh_connect_timeout == 3.0
    assert settings.ssh_command_timeout == 60.5
    assert settings.ta_timeout == 4.0
    assert settings.ta_error_codes == {1001: "bad token"}


def test_environment_overrides_the_config_file(tmp_path):
    home = tmp_path / "kv"
    write_config(
        home,
        '[database]\nurl = "sqlite:////from/file.db"\n[master_key]\nfile = "/from/file.key"\n',
    )
    env = {
        "KEYVAULT_HOME": str(home),
        "KEYVAULT_DATABASE_URL": "sqlite:////from/env.db",
        "KEYVAULT_MASTER_KEY_FILE": str(tmp_path / "env.key"),
        "KEYVAULT_ACTOR": "robot",
    }
    settings = load_settings(env)
    assert settings.database_url == "sqlite:////from/env.db"
    assert settings.master_key_file == tmp_path / "env.key"
    assert settings.actor == os_actor(env) and settings.actor.endswith("[declared: robot]")
    assert load_settings(env, actor="explicit").actor == "explicit"


def test_empty_environment_values_fall_back(tmp_path):
    home = tmp_path / "kv"
    settings = load_settings({"KEYVAULT_HOME": str(home), "KEYVAULT_DATABASE_URL": ""})
    assert settings.database_url == f"sqlite:///{home / 'keyvault.db'}"


def test_secret_files_are_read_without_their_newline(tmp_path):
    home = tmp_path / "kv"
    (tmp_path / "pass").write_text("s3cret-su\n")
    (tmp_path / "phrase").write_text("key-phrase\r\n")
    settings = load_settings(
        {
            "KEYVAULT_HOME": str(home),
            "KEYVAULT_SU_PASSWORD_FILE": str(tmp_path / "pass"),
            "KEYVAULT_SSH_PASSPHRASE_FILE": str(tmp_path / "phrase"),
        }
    )
    assert settings.su_password == "s3cret-su"
    assert settings.ssh_passphrase == "key-phrase"


def test_unreadable_secret_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="su password"):
        load_settings(
            {"KEYVAULT_HOME": str(tmp_path), "KEYVAULT_SU_PASSWORD_FILE": str(tmp_path / "none")}
        )


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[database\nurl = 1", "cannot read"),
        ('[validation]\nappid_pattern = "(unclosed"', "not a valid regex"),
        ('[ssh]\nsu_prompt = "[x"', "not a valid regex"),
        ('[ssh]\nconnect_timeout = "soon"', "invalid value"),
        ('[ta]\nerror_codes = { x = "y" }', "invalid value"),
    ],
)
def test_invalid_config_is_a_config_error(tmp_path, text, match):
    write_config(tmp_path / "kv", text)
    with pytest.raises(ConfigError, match=match) as info:
        load_settings({"KEYVAULT_HOME": str(tmp_path / "kv")})
    assert info.value.exit_code == 1


def test_appid_pattern_from_config_is_used(tmp_path):
    write_config(tmp_path / "kv", '[validation]\nappid_pattern = "^[0-9]+$"\n')
    settings = load_settings({"KEYVAULT_HOME": str(tmp_path / "kv")})
    assert validate_appid("42", settings.appid_pattern) == "42"
    with pytest.raises(InvalidInput):
        validate_appid("demo", settings.appid_pattern)


# --- Settings never shows a password --------------------------------------------

PASSWORD = "Pw-sEcReT-4711"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+psycopg://keyvault:{PASSWORD}@db.internal:5432/keyvault",
        f"postgresql://keyvault:{PASSWORD}@db.internal/keyvault?sslmode=require",
        f"postgresql://:{PASSWORD}@db.internal/keyvault",
        f"postgresql://keyvault@db.internal/keyvault?password={PASSWORD}",
        f"postgresql://keyvault@db.internal/keyvault?sslmode=require&password={PASSWORD}&x=1",
    ],
    ids=["userinfo", "userinfo-query", "empty-user", "query", "query-middle"],
)
def test_settings_repr_hides_the_database_password(tmp_path, url):
    settings = load_settings({"KEYVAULT_HOME": str(tmp_path), "KEYVAULT_DATABASE_URL": url})
    assert settings.database_url == url  # the real value is kept for connecting
    for text in (repr(settings), str(settings), f"{settings}", f"{settings!r}"):
        assert PASSWORD not in text
        assert "db.internal" in text


def test_settings_repr_hides_su_password_and_passphrase(tmp_path):
    settings = load_settings(
        {
            "KEYVAULT_HOME": str(tmp_path),
            "KEYVAULT_SU_PASSWORD": PASSWORD,
            "KEYVAULT_SSH_PASSPHRASE": PASSWORD[::-1],
        }
    )
    assert settings.su_password == PASSWORD
    for text in (repr(settings), str(settings)):
        assert PASSWORD not in text and PASSWORD[::-1] not in text
    assert isinstance(settings, Settings)


def test_schema_head_constant_matches_the_migrations():
    from keyvault.db import SCHEMA_HEAD, head_revision

    assert head_revision() == SCHEMA_HEAD
