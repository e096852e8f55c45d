"""Settings: built once per entrypoint from the environment and ``keyvault.toml``.

Nothing here runs at import time; ``load_settings()`` is called by the CLI, the
HTTP app or a job, and the resulting ``Settings`` object is passed down.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from keyvault.errors import ConfigError

DEFAULT_APPID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
DEFAULT_KEY_PATTERN = r"[A-Za-z0-9]{64}"
# su's password prompt differs by locale; matched against the PTY tail.
DEFAULT_SU_PROMPT = r"(?i)(password|passwort|mot de passe|contraseña|密码)[^\n:]*[:：]\s*$"
CONFIG_FILE_NAME = "keyvault.toml"
# Rotations whose ta-tool calls share one `su` session in bulk runs (see docs/rotation.md).
DEFAULT_ROTATION_BATCH_SIZE = 50
MAX_ROTATION_BATCH_SIZE = 50


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

    @property
    def config_file(self) -> Path:
        return self.home / CONFIG_FILE_NAME

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

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


def _read_secret_file(path: str, what: str) -> str:
    try:
        return Path(path).expanduser().read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(
            f"cannot read the {what} file {path}: {exc.strerror}",
            hint="check the path and its permissions",
        ) from None


def load_settings(env: Mapping[str, str] | None = None, *, actor: str | None = None) -> Settings:
    """Build the settings from ``env`` (default ``os.environ``) and the config file."""
    env = os.environ if env is None else env
    home = default_home(env)
    data: dict = {}
    config_file = home / CONFIG_FILE_NAME
    if config_file.exists():
        try:
            data = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(
                f"cannot read {config_file}: {exc}", hint="fix the file or move it away"
            ) from None
    db = data.get("database", {})
    mk = data.get("master_key", {})
    ssh = data.get("ssh", {})
    validation = data.get("validation", {})
    ta = data.get("ta", {})
    rotation = data.get("rotation", {})

    database_url = (
        env.get("KEYVAULT_DATABASE_URL") or db.get("url") or (f"sqlite:///{home / 'keyvault.db'}")
    )
    master_key_file = Path(
        env.get("KEYVAULT_MASTER_KEY_FILE") or mk.get("file") or home / "master.key"
    ).expanduser()

    passphrase = env.get("KEYVAULT_SSH_PASSPHRASE")
    if passphrase is None and (
        env.get("KEYVAULT_SSH_PASSPHRASE_FILE") or ssh.get("passphrase_file")
    ):
        passphrase = _read_secret_file(
            env.get("KEYVAULT_SSH_PASSPHRASE_FILE") or ssh["passphrase_file"], "SSH passphrase"
        )
    su_password = env.get("KEYVAULT_SU_PASSWORD")
    if su_password is None and (
        env.get("KEYVAULT_SU_PASSWORD_FILE") or ssh.get("su_password_file")
    ):
        su_password = _read_secret_file(
            env.get("KEYVAULT_SU_PASSWORD_FILE") or ssh["su_password_file"], "su password"
        )

    known_hosts = env.get("KEYVAULT_KNOWN_HOSTS") or ssh.get("known_hosts_file")
    identity = env.get("KEYVAULT_SSH_IDENTITY") or ssh.get("identity_file")
    appid_pattern = validation.get("appid_pattern", DEFAULT_APPID_PATTERN)
    su_prompt = ssh.get("su_prompt", DEFAULT_SU_PROMPT)
    for name, pattern in (
        ("validation.appid_pattern", appid_pattern),
        ("ssh.su_prompt", su_prompt),
    ):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{name} in {config_file} is not a valid regex: {exc}") from None
    batch_size = rotation.get("batch_size", DEFAULT_ROTATION_BATCH_SIZE)
    if type(batch_size) is not int or not 1 <= batch_size <= MAX_ROTATION_BATCH_SIZE:
        raise ConfigError(
            f"rotation.batch_size in {config_file} must be a whole number from 1 to "
            f"{MAX_ROTATION_BATCH_SIZE}, not {batch_size!r}"
        )
    try:
        codes = {int(k): str(v) for k, v in ta.get("error_codes", {}).items()}
        return Settings(
            home=home,
            database_url=database_url,
            master_key_file=master_key_file,
            appid_pattern=appid_pattern,
            known_hosts_file=Path(known_hosts).expanduser() if known_hosts else None,
            ssh_connect_timeout=float(ssh.get("connect_timeout", 10.0)),
            ssh_command_timeout=float(ssh.get("command_timeout", 300.0)),
            rotation_batch_size=batch_size,
            ssh_identity_file=Path(identity).expanduser() if identity else None,
            ssh_passphrase=passphrase,
            su_password=su_password,
            su_prompt=su_prompt,
            ta_error_codes=codes,
            ta_timeout=float(ta.get("timeout", 10.0)),
            actor=actor or env.get("KEYVAULT_ACTOR") or env.get("USER") or "cli",
            serve_webhooks=env.get("KEYVAULT_SERVE_WEBHOOKS", "1") not in ("0", "false", "no"),
            serve_scheduler=env.get("KEYVAULT_SERVE_SCHEDULER", "0") in ("1", "true", "yes"),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid value in {config_file}: {exc}") from None
