"""Settings: built once per entrypoint from the environment and ``keyvault.toml``.

Nothing here runs at import time; ``load_settings()`` is called by the CLI, the
HTTP app or a job, and the resulting ``Settings`` object is passed down.
"""

from __future__ import annotations

import difflib
import os
import pwd
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from keyvault.errors import ConfigError
from keyvault.scope import DEFAULT_APPID_PATTERN
from keyvault.textsafe import printable

DEFAULT_KEY_PATTERN = r"[A-Za-z0-9]{64}"
# su's password prompt differs by locale; matched against the PTY tail.
DEFAULT_SU_PROMPT = r"(?i)(password|passwort|mot de passe|contraseña|密码)[^\n:]*[:：]\s*$"
CONFIG_FILE_NAME = "keyvault.toml"
# Rotations whose ta-tool calls share one `su` session in bulk runs (see docs/rotation.md).
DEFAULT_ROTATION_BATCH_SIZE = 50
MAX_ROTATION_BATCH_SIZE = 50
# How the HTTP server commits audit records (docs/deployment.md, "Audit durability"):
# fast: survives a crash of keyvault; durable: also of the database's host (flushed to disk);
# journal: on a local file before the key is sent, in the database right after.
AUDIT_DURABILITY = ("fast", "durable", "journal")
AUDIT_DURABILITY_ENV = "KEYVAULT_AUDIT_DURABILITY"


@dataclass(frozen=True)
class Settings:
    """Everything an entrypoint needs to know about its environment."""

    home: Path
    database_url: str
    master_key_file: Path
    appid_pattern: str = DEFAULT_APPID_PATTERN
    known_hosts_file: Path | None = None
    ssh_connect_timeout: float = 10.0
    ssh_command_timeout: float = 300.0
    rotation_batch_size: int = DEFAULT_ROTATION_BATCH_SIZE
    ssh_identity_file: Path | None = None
    ssh_passphrase: str | None = field(default=None, repr=False)
    su_password: str | None = field(default=None, repr=False)
    su_prompt: str = DEFAULT_SU_PROMPT
    ta_error_codes: Mapping[int, str] = field(default_factory=dict)
    ta_timeout: float = 10.0
    actor: str = "cli"
    serve_webhooks: bool = True
    serve_scheduler: bool = False
    # Leases of the scheduler and the webhook worker (services/leases.py), in seconds.
    lease_ttl: float = 15.0
    scheduler_interval: float = 60.0  # `serve --scheduler`: seconds between runs
    # The JSON-lines audit sink: a file path, or "-" (stdout); None: the database only.
    audit_sink: str | None = None
    audit_durability: str = "fast"

    @property
    def config_file(self) -> Path:
        return self.home / CONFIG_FILE_NAME

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def audit_journal_dir(self) -> Path:  # [audit] durability = "journal"
        return self.home / "audit-journal"

    def __repr__(self) -> str:  # never show passwords
        return f"Settings(home={str(self.home)!r}, database_url={_mask_url(self.database_url)!r})"


def _mask_url(url: str) -> str:
    """Hide the password of a database URL: in the userinfo (even with no user) and in the query."""
    url = re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url, flags=re.IGNORECASE)


def default_home(env: Mapping[str, str]) -> Path:
    """The keyvault home: ``$KEYVAULT_HOME`` or ``~/.keyvault``."""
    raw = env.get("KEYVAULT_HOME")
    if raw:
        return Path(raw).expanduser().absolute()
    return Path(env.get("HOME") or Path.home()).expanduser() / ".keyvault"


# Every table and key keyvault.toml may hold; anything else is refused with the nearest
# valid name, so a typo (``conect_timeout``) fails loudly instead of being ignored.
# ``None`` is a value; ``FREE_FORM`` is a table whose keys are data (TA return codes).
FREE_FORM: Final = "free-form table"
CONFIG_KEYS: Final[dict[str, dict[str, object]]] = {
    "database": {"url": None},
    "master_key": {"file": None},
    "ssh": {
        "known_hosts_file": None,
        "identity_file": None,
        "passphrase_file": None,
        "su_password_file": None,
        "connect_timeout": None,
        "command_timeout": None,
        "su_prompt": None,
    },
    "validation": {"appid_pattern": None},
    "ta": {"timeout": None, "error_codes": FREE_FORM},
    "rotation": {"batch_size": None},
    "audit": {"sink": None, "durability": None},
}


def check_known_keys(
    data: Mapping[str, object], schema: Mapping[str, object], *, path: Path, table: str = ""
) -> None:
    """Refuse a key ``schema`` does not name (in nested tables too), suggesting the nearest."""
    for key, value in data.items():
        where = f"[{table}] of {path}" if table else str(path)
        if key not in schema:
            what = "key" if table or not isinstance(value, dict) else "table"
            close = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)
            shown = (lambda k: f"[{k}]") if what == "table" else (lambda k: repr(k))
            hint = (
                f"did you mean {shown(close[0])}?"
                if close
                else f"valid {what}s here: {', '.join(sorted(schema))}"
            )
            raise ConfigError(f"unknown {what} {shown(key)} in {where}", hint=hint)
        expected = schema[key]
        dotted = f"{table}.{key}" if table else key
        if isinstance(expected, dict) or expected == FREE_FORM:
            if not isinstance(value, dict):
                raise ConfigError(f"[{dotted}] in {path} must be a table, not {value!r}")
            if isinstance(expected, dict):
                check_known_keys(value, expected, path=path, table=dotted)
        elif isinstance(value, dict):
            raise ConfigError(f"{key} in {where} must be a value, not a table")


def read_config_file(path: Path) -> dict[str, Any]:
    """The parsed and key-checked config file, or ``{}`` when there is none."""
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"cannot read {path}: {exc}", hint="fix the file or move it away"
        ) from None
    check_known_keys(data, CONFIG_KEYS, path=path)
    return data


def _read_secret_file(path: str, what: str) -> str:
    try:
        return Path(path).expanduser().read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(
            f"cannot read the {what} file {path}: {exc.strerror}",
            hint="check the path and its permissions",
        ) from None


def _secret(env: Mapping[str, str], name: str, file_setting: str | None, what: str) -> str | None:
    """``$NAME``, else the content of ``$NAME_FILE`` or of the config's file setting."""
    value = env.get(name)
    if value is not None:
        return value
    file = env.get(f"{name}_FILE") or file_setting
    return _read_secret_file(file, what) if file else None


def _checked_regex(pattern: str, name: str, config_file: Path) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{name} in {config_file} is not a valid regex: {exc}") from None
    return pattern


def _checked_batch_size(value: object, config_file: Path) -> int:
    if type(value) is not int or not 1 <= value <= MAX_ROTATION_BATCH_SIZE:
        raise ConfigError(
            f"rotation.batch_size in {config_file} must be a whole number from 1 to "
            f"{MAX_ROTATION_BATCH_SIZE}, not {value!r}"
        )
    return value


def _checked_durability(env: Mapping[str, str], audit: Mapping[str, Any], config_file: Path) -> str:
    if env.get(AUDIT_DURABILITY_ENV):
        value: object = env[AUDIT_DURABILITY_ENV]
        where = AUDIT_DURABILITY_ENV
    else:
        value, where = audit.get("durability", "fast"), f"audit.durability in {config_file}"
    if value not in AUDIT_DURABILITY:
        raise ConfigError(
            f"{where} must be one of {', '.join(map(repr, AUDIT_DURABILITY))}, not {value!r}",
            hint="see docs/deployment.md, section Audit durability",
        )
    return str(value)


def _optional_path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def _ssh_fields(env: Mapping[str, str], ssh: Mapping[str, Any], config_file: Path) -> dict:
    """The Settings fields of the SSH connection: ``[ssh]`` and its environment overrides."""
    return {
        "known_hosts_file": _optional_path(
            env.get("KEYVAULT_KNOWN_HOSTS") or ssh.get("known_hosts_file")
        ),
        "ssh_identity_file": _optional_path(
            env.get("KEYVAULT_SSH_IDENTITY") or ssh.get("identity_file")
        ),
        "ssh_connect_timeout": float(ssh.get("connect_timeout", 10.0)),
        "ssh_command_timeout": float(ssh.get("command_timeout", 300.0)),
        "ssh_passphrase": _secret(
            env, "KEYVAULT_SSH_PASSPHRASE", ssh.get("passphrase_file"), "SSH passphrase"
        ),
        "su_password": _secret(
            env, "KEYVAULT_SU_PASSWORD", ssh.get("su_password_file"), "su password"
        ),
        "su_prompt": _checked_regex(
            ssh.get("su_prompt", DEFAULT_SU_PROMPT), "ssh.su_prompt", config_file
        ),
    }


_LABEL_LIMIT = 40  # the whole actor fits the 128 characters of the actor columns


def os_actor(env: Mapping[str, str]) -> str:
    """Who runs this process, as the audit log and the rotations record it.

    The OS user of the effective uid (which the environment cannot change), with the
    invoking user when run through sudo: "keyvault (sudo by alice)". ``KEYVAULT_ACTOR`` is
    only a label the caller declares, kept after the OS identity ("[declared: ops-bot]"),
    never instead of it; a label equal to the sudo user adds nothing and is left out.
    """
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid without a passwd entry (a container)
        user = f"uid {uid}"
    sudo_user = printable(env.get("SUDO_USER", "").strip())[:_LABEL_LIMIT]
    actor = f"{user} (sudo by {sudo_user})" if sudo_user and sudo_user != user else user
    label = printable(env.get("KEYVAULT_ACTOR", "").strip())[:_LABEL_LIMIT]
    if label and label not in (user, sudo_user):
        actor += f" [declared: {label}]"
    return actor


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    value = float(env.get(name) or default)
    if not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds")
    return value


def load_settings(env: Mapping[str, str] | None = None, *, actor: str | None = None) -> Settings:
    """Build the settings from ``env`` (default ``os.environ``) and the config file."""
    env = os.environ if env is None else env
    home = default_home(env)
    config_file = home / CONFIG_FILE_NAME
    data = read_config_file(config_file)
    db = data.get("database", {})
    mk = data.get("master_key", {})
    validation = data.get("validation", {})
    ta = data.get("ta", {})
    rotation = data.get("rotation", {})
    try:
        return Settings(
            home=home,
            database_url=env.get("KEYVAULT_DATABASE_URL")
            or db.get("url")
            or f"sqlite:///{home / 'keyvault.db'}",
            master_key_file=Path(
                env.get("KEYVAULT_MASTER_KEY_FILE") or mk.get("file") or home / "master.key"
            ).expanduser(),
            appid_pattern=_checked_regex(
                validation.get("appid_pattern", DEFAULT_APPID_PATTERN),
                "validation.appid_pattern",
                config_file,
            ),
            rotation_batch_size=_checked_batch_size(
                rotation.get("batch_size", DEFAULT_ROTATION_BATCH_SIZE), config_file
            ),
            **_ssh_fields(env, data.get("ssh", {}), config_file),
            ta_error_codes={int(k): str(v) for k, v in ta.get("error_codes", {}).items()},
            ta_timeout=float(ta.get("timeout", 10.0)),
            actor=actor or os_actor(env),
            serve_webhooks=env.get("KEYVAULT_SERVE_WEBHOOKS", "1") not in ("0", "false", "no"),
            serve_scheduler=env.get("KEYVAULT_SERVE_SCHEDULER", "0") in ("1", "true", "yes"),
            lease_ttl=_positive(env, "KEYVAULT_LEASE_TTL", 15.0),
            scheduler_interval=_positive(env, "KEYVAULT_SCHEDULER_INTERVAL", 60.0),
            audit_sink=env.get("KEYVAULT_AUDIT_SINK") or data.get("audit", {}).get("sink") or None,
            audit_durability=_checked_durability(env, data.get("audit", {}), config_file),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid value in {config_file}: {exc}") from None
