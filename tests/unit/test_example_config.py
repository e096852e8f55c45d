"""ops/keyvault.example.toml: it loads, documents exactly the options config.py reads,
shows their real defaults, and names the environment variables that really override them.

The example keeps every option commented out (``# key = value`` right under its
section), so as shipped it changes nothing; "enabled" below means every such line
uncommented. What config.py reads is its table of accepted keys (``CONFIG_KEYS``; any
other key is refused), each of which its source must read, so a new option there fails
here until the example explains it.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

import keyvault.config
from keyvault.config import CONFIG_FILE_NAME, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "ops" / "keyvault.example.toml"
ASSIGNMENT = re.compile(r"^#\s?([a-z_]+)\s*=\s*(\S.*)$")
SECTION = re.compile(r"^\[([a-z_]+)\]\s*$")

# (section, key) -> the Settings field it sets.
FIELDS = {
    ("database", "url"): "database_url",
    ("master_key", "file"): "master_key_file",
    ("ssh", "known_hosts_file"): "known_hosts_file",
    ("ssh", "identity_file"): "ssh_identity_file",
    ("ssh", "passphrase_file"): "ssh_passphrase",
    ("ssh", "su_password_file"): "su_password",
    ("ssh", "connect_timeout"): "ssh_connect_timeout",
    ("ssh", "command_timeout"): "ssh_command_timeout",
    ("ssh", "su_prompt"): "su_prompt",
    ("validation", "appid_pattern"): "appid_pattern",
    ("ta", "timeout"): "ta_timeout",
    ("ta", "error_codes"): "ta_error_codes",
    ("rotation", "batch_size"): "rotation_batch_size",
    ("audit", "sink"): "audit_sink",
    ("audit", "durability"): "audit_durability",
}
# Environment variable -> the (section, key) it overrides.
OVERRIDES = {
    "KEYVAULT_DATABASE_URL": ("database", "url"),
    "KEYVAULT_AUDIT_SINK": ("audit", "sink"),
    "KEYVAULT_AUDIT_DURABILITY": ("audit", "durability"),
    "KEYVAULT_MASTER_KEY_FILE": ("master_key", "file"),
    "KEYVAULT_KNOWN_HOSTS": ("ssh", "known_hosts_file"),
    "KEYVAULT_SSH_IDENTITY": ("ssh", "identity_file"),
    "KEYVAULT_SSH_PASSPHRASE_FILE": ("ssh", "passphrase_file"),
    "KEYVAULT_SU_PASSWORD_FILE": ("ssh", "su_password_file"),
}
SECRET_FILE_KEYS = {
    ("ssh", "passphrase_file"): "example-passphrase",
    ("ssh", "su_password_file"): "example-su-pw",
}


def keys_read_by_config() -> set[tuple[str, str]]:
    """(section, key) pairs config.py accepts (CONFIG_KEYS), each one read in its source."""
    source = Path(keyvault.config.__file__).read_text()
    keys = {(s, k) for s, table in keyvault.config.CONFIG_KEYS.items() for k in table}
    for section, key in keys:
        assert f'.get("{section}"' in source, f"config.py never reads [{section}]"
        assert f'.get("{key}"' in source, f"config.py accepts [{section}] {key} but never reads it"
    return keys


def env_vars_read_by_config() -> set[str]:
    """Every KEYVAULT_* name config.py mentions."""
    tree = ast.parse(Path(keyvault.config.__file__).read_text())
    return {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and re.fullmatch(r"KEYVAULT_[A-Z_]+", n.value)
    }


def parse_example() -> tuple[dict[tuple[str, str], list[str]], str]:
    """The commented-out options with the comment block above each, and the enabled text."""
    blocks: dict[tuple[str, str], list[str]] = {}
    section, comments, enabled = None, [], []
    for line in EXAMPLE.read_text().splitlines():
        if m := SECTION.match(line):
            section, comments = m.group(1), []
            enabled.append(line)
        elif section and (m := ASSIGNMENT.match(line)):
            key = (section, m.group(1))
            assert key not in blocks, f"{key} appears twice in the example"
            blocks[key] = comments
            comments = []
            enabled.append(f"{m.group(1)} = {m.group(2)}")
        elif line.startswith("#"):
            comments.append(line)
            enabled.append(line)
        else:
            comments = []
            enabled.append(line)
    return blocks, "\n".join(enabled) + "\n"


def write_home(tmp_path: Path, text: str) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700, exist_ok=True)
    (home / CONFIG_FILE_NAME).write_text(text)
    return home


def enabled_with_temp_secrets(tmp_path: Path) -> tuple[str, dict]:
    """The enabled example with the secret-file options pointing at files made here."""
    _, text = parse_example()
    data = tomllib.loads(text)
    for (section, key), content in SECRET_FILE_KEYS.items():
        secret = tmp_path / f"{key}.txt"
        secret.write_text(content + "\n")
        secret.chmod(0o600)
        pattern = re.compile(rf'^{key} = "[^"]*"$', re.M)
        assert pattern.search(text), f"[{section}] {key} in the example is not a plain string"
        text = pattern.sub(f'{key} = "{secret}"', text)
    return text, data


def test_example_as_shipped_parses_and_changes_nothing(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    env = {"KEYVAULT_HOME": str(home), "HOME": str(tmp_path)}
    without = load_settings(env)
    (home / CONFIG_FILE_NAME).write_text(EXAMPLE.read_text())
    assert tomllib.loads(EXAMPLE.read_text()).keys() == {
        "database",
        "master_key",
        "ssh",
        "validation",
        "ta",
        "rotation",
        "audit",
    }
    assert load_settings(env) == without


def test_example_documents_exactly_the_options_config_reads():
    read = keys_read_by_config()
    # Sanity of the derivation itself: it must find the sections and some keys.
    assert {s for s, _ in read} == {
        "database",
        "master_key",
        "ssh",
        "validation",
        "ta",
        "rotation",
        "audit",
    }
    assert read == set(FIELDS), "update FIELDS (and the example) for the options config.py reads"
    blocks, text = parse_example()
    documented = {(s, k) for s, table in tomllib.loads(text).items() for k in table}
    assert documented == set(blocks)
    assert documented == read, (
        f"not in the example: {sorted(read - documented)}; "
        f"not read by config.py: {sorted(documented - read)}"
    )
    for key, comments in blocks.items():
        assert len(" ".join(comments)) > 40, f"[{key[0]}] {key[1]} has no explanation"


def test_every_option_enabled_loads_and_lands(tmp_path):
    text, data = enabled_with_temp_secrets(tmp_path)
    home = write_home(tmp_path, text)
    s = load_settings({"KEYVAULT_HOME": str(home), "HOME": str(tmp_path)})
    assert s.database_url == data["database"]["url"]
    assert s.database_url.startswith("postgresql+psycopg://")
    assert s.master_key_file == Path(data["master_key"]["file"])
    assert s.known_hosts_file == Path(data["ssh"]["known_hosts_file"])
    assert s.ssh_identity_file == Path(data["ssh"]["identity_file"])
    assert s.ssh_passphrase == SECRET_FILE_KEYS[("ssh", "passphrase_file")]
    assert s.su_password == SECRET_FILE_KEYS[("ssh", "su_password_file")]
    assert s.ssh_connect_timeout == float(data["ssh"]["connect_timeout"])
    assert s.ssh_command_timeout == float(data["ssh"]["command_timeout"])
    assert s.su_prompt == data["ssh"]["su_prompt"]
    assert s.appid_pattern == data["validation"]["appid_pattern"]
    assert s.ta_timeout == float(data["ta"]["timeout"])
    assert s.ta_error_codes == {int(k): v for k, v in data["ta"]["error_codes"].items()}
    assert all(code < 0 for code in s.ta_error_codes)
    # The secrets never show in the settings' repr.
    assert "example-su-pw" not in repr(s) and "example-passphrase" not in repr(s)


def test_example_shows_the_real_defaults():
    _, text = parse_example()
    data = tomllib.loads(text)
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    for section, key in (
        ("ssh", "connect_timeout"),
        ("ssh", "command_timeout"),
        ("ssh", "su_prompt"),
        ("validation", "appid_pattern"),
        ("ta", "timeout"),
    ):
        assert data[section][key] == defaults[FIELDS[(section, key)]], f"[{section}] {key}"
    with_defaults = re.findall(r"-?\d+", "\n".join(parse_example()[0][("ta", "error_codes")]))
    from keyvault.ta import DEFAULT_RETURN_CODES

    assert {int(c) for c in with_defaults} >= set(DEFAULT_RETURN_CODES), (
        "the comment lists the built-in codes"
    )


def test_every_environment_variable_is_named_and_overrides_what_the_example_says(tmp_path):
    blocks, _ = parse_example()
    example = EXAMPLE.read_text()
    for name in env_vars_read_by_config() | {"KEYVAULT_DEBUG"}:
        assert name in example, f"{name} is not explained in the example"
    for name, key in OVERRIDES.items():
        assert f"Env: {name} overrides this" in " ".join(blocks[key]), (
            f"[{key[0]}] {key[1]} should name {name}"
        )

    text, _ = enabled_with_temp_secrets(tmp_path)
    home = write_home(tmp_path, text)
    other = tmp_path / "other-secret.txt"
    other.write_text("from-env-file\n")
    values = {
        "KEYVAULT_DATABASE_URL": ("sqlite:////tmp/elsewhere.db", "sqlite:////tmp/elsewhere.db"),
        "KEYVAULT_MASTER_KEY_FILE": ("/srv/kv/master.key", Path("/srv/kv/master.key")),
        "KEYVAULT_KNOWN_HOSTS": ("/srv/kv/known_hosts", Path("/srv/kv/known_hosts")),
        "KEYVAULT_SSH_IDENTITY": ("/srv/kv/id_ed25519", Path("/srv/kv/id_ed25519")),
        "KEYVAULT_SSH_PASSPHRASE_FILE": (str(other), "from-env-file"),
        "KEYVAULT_SU_PASSWORD_FILE": (str(other), "from-env-file"),
        "KEYVAULT_AUDIT_SINK": ("/srv/kv/audit.jsonl", "/srv/kv/audit.jsonl"),
        "KEYVAULT_AUDIT_DURABILITY": ("durable", "durable"),
    }
    assert set(values) == set(OVERRIDES)
    base = {"KEYVAULT_HOME": str(home), "HOME": str(tmp_path)}
    for name, (raw, expected) in values.items():
        field = FIELDS[OVERRIDES[name]]
        assert getattr(load_settings(base), field) != expected
        assert getattr(load_settings({**base, name: raw}), field) == expected, name
    # The value variables beat both their *_FILE variable and the file option.
    s = load_settings(
        {
            **base,
            "KEYVAULT_SSH_PASSPHRASE_FILE": str(other),
            "KEYVAULT_SSH_PASSPHRASE": "pp",
            "KEYVAULT_SU_PASSWORD_FILE": str(other),
            "KEYVAULT_SU_PASSWORD": "pw",
        }
    )
    assert (s.ssh_passphrase, s.su_password) == ("pp", "pw")
    # Env-only settings documented in the example.
    s = load_settings({**base, "KEYVAULT_ACTOR": "ops-bot", "KEYVAULT_SERVE_WEBHOOKS": "no"})
    assert ("[declared: ops-bot]" in s.actor, s.serve_webhooks) == (True, False)
    assert load_settings(base).serve_webhooks is True
    assert load_settings({**base, "KEYVAULT_SERVE_SCHEDULER": "yes"}).serve_scheduler is True
    assert load_settings(base).serve_scheduler is False


@pytest.mark.parametrize(
    ("section", "key", "bad"),
    [
        ("ssh", "su_prompt", "'(unclosed'"),
        ("validation", "appid_pattern", "'[a-'"),
        ("ssh", "connect_timeout", '"soon"'),
    ],
)
def test_a_bad_value_in_an_example_option_is_refused_naming_the_file(tmp_path, section, key, bad):
    from keyvault.errors import ConfigError

    text, _ = enabled_with_temp_secrets(tmp_path)
    text = re.sub(rf"^{key} = .*$", f"{key} = {bad}", text, flags=re.M)
    home = write_home(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings({"KEYVAULT_HOME": str(home), "HOME": str(tmp_path)})
    assert CONFIG_FILE_NAME in str(info.value)
