"""``keyvault-agent`` (``keyvault agent``): keep key files current, pushed, not polled on a timer.

    keyvault-agent --addr http://kv1:8200 --addr http://kv2:8200 \\
        --token-file /etc/keyvault-agent/token --cluster prod --appid APP1 \\
        --file /etc/app/ta.env --format env --env-name TA_API_KEY \\
        --on-change 'systemctl reload app'
    keyvault-agent --config /etc/keyvault-agent/agent.toml     # several keys, one process

It follows ``/v1/events`` by long-poll (``keyvault_client.watch``), fetches a key when an
event names its scope, and after every outage revalidates each key by its ETag (a rotation
committed while keyvault was unreachable is found too). A file is replaced atomically
(``keyvault_client.fsutil``: temp file in the same directory, fsync, rename; mode 0600
unless told) when its content, its mode or (with ``--owner``) its owner differs from what it
should be. Directories the agent creates are mode 0700 and, with ``--owner``, given to that
owner. ``--on-change`` (split with shlex, no shell, a timeout, its exit status logged,
without any ``KEYVAULT_*`` variable in its environment) runs until it succeeds once for the
file's content: its success is recorded in ``.FILE.applied`` beside the file (0600; a salted
SHA-256 digest of the content, never the key), and whenever that does not match the file
(at start, after every write) it runs again; a failure or timeout is retried with capped
jittered backoff. So an agent killed between the write and the command runs it when it
starts again. While keyvault cannot be reached the last good file stays untouched.

The key is never printed, logged, put in argv or in a child's environment. Exit status:
0 after ``--once``, 2 for bad arguments, 1 for anything else (an unwritable target: the
old file is kept; a refused token; keyvault unreachable or a failed ``--on-change`` with
``--once``).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import pwd
import random
import shlex
import signal
import stat
import string
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from keyvault_client.client import Client, KeyInfo, Scope, scope_of
from keyvault_client.errors import InvalidInput, KeyvaultError
from keyvault_client.fsutil import atomic_write

log = logging.getLogger("keyvault_client.agent")
FORMATS = ("raw", "env", "json")
DEFAULT_ENV_NAME = "TA_API_KEY"
ON_CHANGE_TIMEOUT = 60.0
# Backoff between retries of a failed --on-change: doubling from the first, capped, jittered.
ON_CHANGE_RETRY = (1.0, 300.0)
_PLACEHOLDERS = {"key", "version", "cluster", "scope", "appid", "fingerprint"}


class AgentError(KeyvaultError):
    """The agent cannot do its job (an unwritable target, ...); ends it with exit 1."""

    code = "agent_error"


@dataclass
class Target:
    """One key and the file it is rendered to."""

    cluster: str
    scope: str
    file: str
    format: str = "raw"
    env_name: str = DEFAULT_ENV_NAME
    template: string.Template | None = field(default=None, repr=False)
    mode: int = 0o600
    owner: tuple[int, int] | None = None
    on_change: list[str] | None = None
    on_change_timeout: float = ON_CHANGE_TIMEOUT
    retry: bool = True  # retry a failed on_change in the background (not with --once)
    failures: int = field(default=0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _timer: threading.Timer | None = field(default=None, repr=False)

    @property
    def where(self) -> Scope:
        return (self.cluster, self.scope)

    def render(self, info: KeyInfo) -> bytes:
        if self.template is not None:
            values = {
                "key": info.key,
                "version": str(info.version),
                "cluster": info.cluster,
                "scope": info.scope,
                "appid": info.appid or "",
                "fingerprint": info.fingerprint,
            }
            return self.template.substitute(values).encode()
        if self.format == "env":
            return f"{self.env_name}={info.key}\n".encode()
        if self.format == "json":
            body = {
                "cluster": info.cluster,
                "scope": info.scope,
                "version": info.version,
                "fingerprint": info.fingerprint,
                "key": info.key,
            }
            return (json.dumps(body) + "\n").encode()
        return f"{info.key}\n".encode()

    def check_writable(self) -> None:
        """Fail early, with the one clear line, when the file cannot be replaced."""
        parent = os.path.dirname(os.path.abspath(self.file))
        probe = parent
        while not os.path.exists(probe):  # atomic_write creates missing directories
            probe = os.path.dirname(probe)
        if not os.access(probe, os.W_OK | os.X_OK):
            raise _unwritable(self.file, parent, "permission denied")

    @property
    def marker(self) -> str:
        """Where the success of ``on_change`` for the file's content is recorded."""
        head, tail = os.path.split(self.file)
        return os.path.join(head, f".{tail}.applied")

    def apply(self, info: KeyInfo) -> bool:
        """Make the file hold ``info`` (content, mode, owner); then run ``on_change`` unless
        it already succeeded for this content. True if the file was written."""
        data = self.render(info)
        written = not self._current(data)
        if written:
            try:
                atomic_write(self.file, data, mode=self.mode, owner=self.owner)
            except OSError as exc:
                raise _unwritable(
                    self.file, os.path.dirname(os.path.abspath(self.file)), exc.strerror or str(exc)
                ) from None
            log.info(
                "wrote %s (%s %s version %d, mode %04o)",
                self.file,
                info.cluster,
                info.scope,
                info.version,
                self.mode,
            )
        if self.on_change:
            self.settle(data)
        return written

    def _current(self, data: bytes) -> bool:
        """Whether the file is a regular file with this content, mode and owner."""
        try:
            st = os.lstat(self.file)
            if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != self.mode:
                return False
            if self.owner is not None and (st.st_uid, st.st_gid) != self.owner:
                return False
            fd = os.open(self.file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as fh:
                return fh.read(len(data) + 1) == data
        except OSError:
            return False  # missing or unreadable: (re)write it

    def settle(self, data: bytes) -> bool:
        """Run ``on_change`` unless the marker says it succeeded for ``data``; record a
        success, schedule a retry after a failure. True when applied."""
        with self._lock:
            if _marker_matches(self.marker, data):
                self.failures = 0
                return True
            assert self.on_change is not None
            if run_on_change(self.on_change, self.on_change_timeout, self.file) == 0:
                _write_marker(self.marker, data)
                self.failures = 0
                return True
            self.failures += 1
            if self.retry and (self._timer is None or not self._timer.is_alive()):
                base, cap = ON_CHANGE_RETRY
                delay = min(cap, base * 2 ** min(self.failures - 1, 30)) * random.uniform(0.5, 1)
                log.warning("on-change for %s: retrying in %.1fs", self.file, delay)
                self._timer = threading.Timer(delay, self._retry)
                self._timer.daemon = True
                self._timer.start()
            return False

    def _retry(self) -> None:
        """A retry of ``on_change`` for what the file holds now (the timer thread)."""
        try:
            fd = os.open(self.file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            log.error("on-change retry for %s: cannot read it: %s", self.file, exc.strerror)
            return  # the next rotation or revalidation writes it again
        self.settle(data)


def _digest(salt: bytes, data: bytes) -> str:
    return hashlib.sha256(salt + data).hexdigest()


def _marker_matches(path: str, data: bytes) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            marker = json.load(fh)
        salt, digest = bytes.fromhex(marker["salt"]), str(marker["digest"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # none yet, or damaged: run on-change (again)
    return hmac.compare_digest(digest, _digest(salt, data))


def _write_marker(path: str, data: bytes) -> None:
    """Record that on-change succeeded for ``data``: a salted digest, never the content."""
    salt = os.urandom(16)
    body = json.dumps({"salt": salt.hex(), "digest": _digest(salt, data)}) + "\n"
    try:
        atomic_write(path, body.encode(), mode=0o600)
    except OSError as exc:  # on-change then runs once more at the next start: harmless
        log.error("cannot record on-change success in %s: %s", path, exc.strerror)


def _unwritable(path: str, parent: str, reason: str) -> AgentError:
    return AgentError(
        f"cannot write {path}: {reason} (directory {parent}, uid {os.geteuid()}); "
        "the old file is kept",
        hint="make the directory writable by the agent's user or choose another --file",
    )


def child_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: ours without any ``KEYVAULT_*`` variable (the token, the
    token file, the address: the child owns none of them)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if not k.startswith("KEYVAULT_")}


def run_on_change(argv: list[str], timeout: float, file: str) -> int | None:
    """Run the on-change command (no shell); log and return its exit status (None: timed out)."""
    started = time.monotonic()
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, env=child_environment(), timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        log.error("on-change command %s for %s timed out after %gs", argv[0], file, timeout)
        return None
    except OSError as exc:
        log.error("on-change command %s for %s did not start: %s", argv[0], file, exc.strerror)
        return None
    level = logging.INFO if done.returncode == 0 else logging.ERROR
    log.log(
        level,
        "on-change command %s for %s exited %d (%.1fs)",
        argv[0],
        file,
        done.returncode,
        time.monotonic() - started,
    )
    return done.returncode


# -- configuration ---------------------------------------------------------------------------


def parse_mode(text: object) -> int:
    try:
        mode = int(str(text), 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise InvalidInput(f"invalid mode {str(text)[:20]!r}", hint="use octal, e.g. 0600 or 0640")
    return mode


def parse_owner(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    user, _, group = text.partition(":")
    try:
        entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise InvalidInput(
            f"unknown user {user[:40]!r} for --owner", hint="use USER[:GROUP]"
        ) from None
    gid = entry.pw_gid
    if group:
        import grp  # noqa: PLC0415 - only for --owner USER:GROUP

        try:
            gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
        except KeyError:
            raise InvalidInput(f"unknown group {group[:40]!r} for --owner") from None
    return entry.pw_uid, gid


def load_template(path: str) -> string.Template:
    try:
        with open(path, encoding="utf-8") as fh:
            template = string.Template(fh.read())
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(
            f"cannot read the template {path!r}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    names = set(template.get_identifiers()) if template.is_valid() else None
    if names is None or not names <= _PLACEHOLDERS:
        raise InvalidInput(
            f"the template {path!r} is not valid",
            hint="use only $key $version $cluster $scope $appid $fingerprint ($$ for a $)",
        )
    return template


def make_target(spec: Mapping[str, Any], where: str) -> Target:
    """A Target from command-line options or one ``[[key]]`` table of agent.toml."""
    cluster, appid, root, file = (spec.get(k) for k in ("cluster", "appid", "root", "file"))
    if not cluster or not file or bool(appid) == bool(root):
        raise InvalidInput(
            f"{where}: a key needs cluster, file and exactly one of appid or root",
            hint="e.g. --cluster prod --appid APP1 --file /etc/app/ta.key",
        )
    fmt = spec.get("format") or "raw"
    if fmt not in FORMATS:
        raise InvalidInput(f"{where}: unknown format {fmt!r}", hint=f"use {', '.join(FORMATS)}")
    env_name = spec.get("env_name") or DEFAULT_ENV_NAME
    if not env_name.isidentifier():
        raise InvalidInput(f"{where}: invalid env name {env_name[:40]!r}")
    on_change = spec.get("on_change")
    argv = shlex.split(on_change) if isinstance(on_change, str) else on_change
    if argv is not None and (not argv or not all(isinstance(a, str) for a in argv)):
        raise InvalidInput(f"{where}: on_change is empty")
    return Target(
        cluster=str(cluster),
        scope=scope_of(str(appid) if appid else None),
        file=os.path.abspath(str(file)),
        format=fmt,
        env_name=env_name,
        template=load_template(spec["template"]) if spec.get("template") else None,
        mode=parse_mode(spec.get("mode", "0600")),
        owner=parse_owner(spec.get("owner")),
        on_change=argv,
        on_change_timeout=float(spec.get("on_change_timeout", ON_CHANGE_TIMEOUT)),
    )


def load_config(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            document = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(
            f"cannot read {path!r}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    keys = document.get("key")
    if not isinstance(keys, list) or not keys:
        raise InvalidInput(f"{path}: no [[key]] table", hint="see docs/consumers.md")
    return document


class _Formatter(argparse.HelpFormatter):
    def add_usage(self, usage: Any, actions: Any, groups: Any, prefix: str | None = None) -> None:
        super().add_usage(usage, actions, groups, prefix or "Usage: ")  # as keyvault's click


class Parser(argparse.ArgumentParser):
    """argparse with keyvault's conventions: ``Usage:``, and a bad argument is one
    ``error:`` line naming where to read more (exit 2)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=_Formatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description="Keep TA key files current: follow keyvault's events, rewrite on rotation.",
    )
    p.add_argument(
        "--addr",
        action="append",
        help="keyvault URL (repeat to fail over; default KEYVAULT_ADDR, comma-separated)",
    )
    p.add_argument(
        "--token-file",
        help="file holding the token (default KEYVAULT_TOKEN, then KEYVAULT_TOKEN_FILE)",
    )
    p.add_argument("--cluster")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--appid")
    which.add_argument("--root", action="store_true", help="the cluster's root key")
    p.add_argument("--file", help="the file to keep current")
    p.add_argument("--format", choices=FORMATS, default="raw")
    p.add_argument("--env-name", default=DEFAULT_ENV_NAME, help="NAME in --format env")
    p.add_argument(
        "--template",
        help="a string.Template file ($key $version $cluster "
        "$scope $appid $fingerprint); overrides --format",
    )
    p.add_argument("--mode", default="0600", help="file mode (octal, default 0600)")
    p.add_argument("--owner", help="USER[:GROUP] to own the file (the agent runs as root)")
    p.add_argument("--on-change", help="command run after the file changed (no shell)")
    p.add_argument("--on-change-timeout", type=float, default=ON_CHANGE_TIMEOUT)
    p.add_argument("--consumer", help="name sent as X-Keyvault-Consumer (default: host name)")
    p.add_argument("--once", action="store_true", help="render and exit")
    p.add_argument("--config", help="agent.toml with several [[key]] tables")
    p.add_argument("--wait", type=float, default=25.0, help=argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], list[Target]]:
    if args.config:
        if args.cluster or args.file:
            raise InvalidInput("--config and --cluster/--file exclude each other")
        document = load_config(args.config)
        targets = [
            make_target(t, f"{args.config} key {i + 1}") for i, t in enumerate(document["key"])
        ]
    else:
        document = {}
        targets = [make_target(vars(args), "the command line")]
    addr = args.addr or document.get("addr")
    settings = {
        "url": addr if addr else None,
        "token_file": args.token_file or document.get("token_file"),
        "consumer": args.consumer or document.get("consumer"),
    }
    return settings, targets


def follow(client: Client, targets: Sequence[Target], *, once: bool, wait: float) -> int:
    """Render every target now (``once``) or for ever, following rotations."""
    if once:
        failed = []
        for target in targets:
            target.retry = False
            target.apply(client.get(target.cluster, target.scope))
            if target.failures:
                failed.append(target.file)
        if failed:
            raise AgentError(
                f"the on-change command failed for {', '.join(failed)}",
                hint="it runs again at the next start (see the log line above)",
            )
        return 0
    for target in targets:
        target.check_writable()
    scopes = list(dict.fromkeys(t.where for t in targets))
    log.info("following %d key(s) at %s", len(scopes), ", ".join(client.urls))
    for rotation in client.watch(scopes, wait=wait):
        for target in targets:
            if target.where == (rotation.cluster, rotation.scope):
                target.apply(rotation.key)
    return 0


class _Stopped(BaseException):
    """SIGTERM/SIGINT: leave the long-poll at once (no half-written file: atomic_write)."""


def _on_signal(signum: int, _frame: object) -> None:
    raise _Stopped(signum)


def setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("keyvault_client")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        logging.getLogger().addHandler(handler)


def main(argv: Sequence[str] | None = None, *, prog: str = "keyvault-agent") -> int:
    """The command; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    setup_logging(args.quiet)
    try:
        settings, targets = _settings(args)
        client = Client(**settings, max_stale=0)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _on_signal)
        return follow(client, targets, once=args.once, wait=args.wait)
    except KeyvaultError as exc:
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except _Stopped:
        log.info("stopped")
        return 0


def _one_line(text: str) -> str:
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def run() -> None:
    """The ``keyvault-agent`` console script."""
    sys.exit(main())
