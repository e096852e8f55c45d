"""State store of the TA simulator: the current keys of one emulated TA cluster.

Layout of ``state_dir`` (mode 0700, files 0600):

- ``state.json``    keys and counters, always replaced atomically
- ``state.lock``    flock target: exclusive for read-modify-write, shared for reads
- ``noise.json``    optional fault/noise options read by the ta-tool emulator
- ``last_run.json`` and ``holding``: written by the ta-tool emulator (never a key)

Several ta-tool processes and the Open API emulator use one directory at once, so
every access goes through the lock. Stdlib only; importing has no side effects.
Admin CLI: ``python -m keyvault.sandbox.state {init,install,add-apps,generations} ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import re
import secrets
import shlex
import string
import sys
import tempfile
import time

KEY_LENGTH = 64
KEY_ALPHABET = string.ascii_letters + string.digits
NOISE_OPTIONS = frozenset(
    {"banner", "crlf", "ansi", "delay_seconds", "fail_apps", "output_mode", "hold_file",
     "hold_before_print"}
)
OUTPUT_MODES = ("normal", "no_key", "two_keys")
_FILES = ("state.json", "state.lock", "noise.json", "last_run.json", "holding")
_APPID_RE = re.compile(r"[A-Za-z0-9_.-]+")


class UnknownApp(Exception):
    """The APPID is not registered in the simulated cluster."""


FINGERPRINT_LOG = "generated.sha256"


def _path(state_dir, name):
    return os.path.join(os.fspath(state_dir), name)


def _follow_dir_owner(fd, state_dir):
    # When root writes into a state dir that belongs to the ta user (init with
    # owner=...), new files must stay that user's or ta-tool loses access to them.
    if os.geteuid() == 0:
        st = os.stat(state_dir)
        os.fchown(fd, st.st_uid, st.st_gid)


def _chown_tree(state_dir, owner):
    try:
        pw = pwd.getpwnam(owner)
    except KeyError:
        raise ValueError(f"no such user: {owner}") from None
    os.chown(state_dir, pw.pw_uid, pw.pw_gid)
    for name in _FILES:
        with contextlib.suppress(FileNotFoundError):
            os.chown(_path(state_dir, name), pw.pw_uid, pw.pw_gid)


@contextlib.contextmanager
def _locked(state_dir, *, exclusive):
    if not os.path.isdir(state_dir):
        raise FileNotFoundError(f"TA simulator state dir {state_dir} does not exist "
                                f"(run: python -m keyvault.sandbox.state init --state-dir ...)")
    path = _path(state_dir, "state.lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _follow_dir_owner(fd, state_dir)
    except PermissionError:
        # A reader without write access can still take a shared lock on the file.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_json(state_dir, name, obj):
    """Atomically replace state_dir/name with obj as JSON (mode 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=state_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
            _follow_dir_owner(f.fileno(), state_dir)
        os.replace(tmp, _path(state_dir, name))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # makes the rename itself durable
    finally:
        os.close(dfd)


def _read_json(state_dir, name, default):
    try:
        with open(_path(state_dir, name), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def _load(state_dir):
    state = _read_json(state_dir, "state.json", None)
    if state is None:
        raise FileNotFoundError(f"TA simulator state not initialised in {state_dir} "
                                f"(run: python -m keyvault.sandbox.state init --state-dir ...)")
    return state


def _entry(state, scope):
    if scope == "root":
        return state["root"]
    if isinstance(scope, str) and scope.startswith("app:") and len(scope) > 4:
        appid = scope[4:]
        if appid not in state["apps"]:
            raise UnknownApp(f"appid {appid} does not exist")
        return state["apps"][appid]
    raise ValueError(f"bad scope {scope!r}: expected 'root' or 'app:<APPID>'")


def _register(state, apps):
    for appid in apps:
        if not isinstance(appid, str) or not _APPID_RE.fullmatch(appid):
            raise ValueError(f"bad APPID {appid!r}: expected [A-Za-z0-9_.-]+")
        if appid not in state["apps"]:
            next_id = max((a["project_id"] for a in state["apps"].values()), default=0) + 1
            state["apps"][appid] = {"key": None, "generations": 0, "project_id": next_id}


def new_key():
    """Return a fresh random 64-char [A-Za-z0-9] token."""
    return "".join(secrets.choice(KEY_ALPHABET) for _ in range(KEY_LENGTH))


def init_state(state_dir, apps=(), *, owner=None):
    """Create (or complete) the state dir and register APPIDs; existing keys are kept."""
    state_dir = os.fspath(state_dir)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    os.chmod(state_dir, 0o700)  # makedirs' mode passes through umask; an old dir keeps its own
    if owner is not None:
        _chown_tree(state_dir, owner)  # first, so files created below follow the dir owner
    with _locked(state_dir, exclusive=True):
        try:
            state = _load(state_dir)
        except FileNotFoundError:
            state = {"root": {"key": None, "generations": 0}, "apps": {}, "total_generations": 0}
        _register(state, apps)
        _write_json(state_dir, "state.json", state)
    if owner is not None:
        _chown_tree(state_dir, owner)


def add_apps(state_dir, apps):
    """Register more APPIDs (already known ones are kept); return {appid: project_id}."""
    with _locked(state_dir, exclusive=True):
        state = _load(state_dir)
        _register(state, apps)
        _write_json(state_dir, "state.json", state)
    return {appid: a["project_id"] for appid, a in state["apps"].items()}


def read_state(state_dir):
    """Return the whole state as a fresh dict (keys included: handle with care)."""
    with _locked(state_dir, exclusive=False):
        return _load(state_dir)


def current_key(state_dir, scope):
    """Return the valid key of scope ('root' or 'app:<APPID>'), or None if none yet."""
    return _entry(read_state(state_dir), scope)["key"]


def generations(state_dir, scope=None):
    """Return how many keys were generated for scope, or in total when scope is None."""
    state = read_state(state_dir)
    return state["total_generations"] if scope is None else _entry(state, scope)["generations"]


def project_id(state_dir, appid):
    """Return the projectId of a registered APPID."""
    return _entry(read_state(state_dir), f"app:{appid}")["project_id"]


def generate(state_dir, scope):
    """Make a new key for scope, replacing (so invalidating) the previous one; return it."""
    with _locked(state_dir, exclusive=True):
        state = _load(state_dir)
        entry = _entry(state, scope)
        key = new_key()
        entry["key"] = key
        entry["generations"] += 1
        state["total_generations"] += 1
        _write_json(state_dir, "state.json", state)
        _log_fingerprint(state_dir, key)
    return key


def _log_fingerprint(state_dir, key):
    # SHA-256 of every key ever generated (never the key): lets a test run prove
    # that no generated key leaked into any captured output or log.
    fd = os.open(_path(state_dir, FINGERPRINT_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        _follow_dir_owner(fd, state_dir)
        os.write(fd, hashlib.sha256(key.encode()).hexdigest().encode() + b"\n")
    finally:
        os.close(fd)


def generated_fingerprints(state_dir) -> set[str]:
    """SHA-256 hex digests of every key this simulator ever generated."""
    try:
        with open(_path(state_dir, FINGERPRINT_LOG), encoding="ascii") as f:
            return {line.strip() for line in f if line.strip()}
    except FileNotFoundError:
        return set()


def find_leaks(text, fingerprints) -> int:
    """How many 64-char tokens in ``text`` are keys whose SHA-256 is in ``fingerprints``."""
    found = 0
    for token in set(re.findall(r"[A-Za-z0-9]{64}", text)):
        if hashlib.sha256(token.encode()).hexdigest() in fingerprints:
            found += 1
    return found


def record_run(state_dir, scope):
    """Write last_run.json with this process's pid and the scope (never the key)."""
    with _locked(state_dir, exclusive=True):
        _write_json(state_dir, "last_run.json",
                    {"pid": os.getpid(), "scope": scope, "time": time.time()})


def set_noise(state_dir, **options):
    """Merge ta-tool fault/noise options into noise.json (None removes one); return all."""
    unknown = set(options) - NOISE_OPTIONS
    if unknown:
        raise ValueError(f"unknown noise option(s): {', '.join(sorted(unknown))}")
    if options.get("output_mode") not in (None, *OUTPUT_MODES):
        raise ValueError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}")
    for name in ("banner", "fail_apps"):
        value = options.get(name)
        if value is not None and (isinstance(value, str) or not all(isinstance(v, str)
                                                                    for v in value)):
            raise ValueError(f"{name} must be a list of strings")
    if options.get("hold_file") is not None:
        options["hold_file"] = os.fspath(options["hold_file"])
    with _locked(state_dir, exclusive=True):
        noise = _read_json(state_dir, "noise.json", {})
        for name, value in options.items():
            if value is None:
                noise.pop(name, None)
            else:
                noise[name] = list(value) if isinstance(value, tuple) else value
        _write_json(state_dir, "noise.json", noise)
    return noise


def read_noise(state_dir):
    """Return the current noise options ({} when none are set)."""
    with _locked(state_dir, exclusive=False):
        return _read_json(state_dir, "noise.json", {})


def clear_noise(state_dir):
    """Remove all noise options."""
    with _locked(state_dir, exclusive=True), contextlib.suppress(FileNotFoundError):
        os.unlink(_path(state_dir, "noise.json"))


def install_wrapper(dest, state_dir, *, python=sys.executable, owner=None, pythonpath=None):
    """Write an executable sh script at dest that runs the ta-tool emulator on state_dir."""
    dest = os.fspath(dest)
    state_dir = os.path.abspath(os.fspath(state_dir))  # the wrapper runs from any cwd
    env = f"TA_SIM_STATE_DIR={shlex.quote(state_dir)}"
    if pythonpath:  # `su - ta` resets the environment; lets an uninstalled checkout work
        env = f"PYTHONPATH={shlex.quote(os.fspath(pythonpath))} {env}"
    script = ("#!/bin/sh\n# ta-tool emulator of the keyvault TA simulator (not the real TA tool)\n"
              f'{env} exec {shlex.quote(os.fspath(python))} -m keyvault.sandbox.tatool "$@"\n')
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ta-tool.", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(script)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if owner is not None and os.path.isdir(state_dir):
        _chown_tree(state_dir, owner)  # the owner runs the wrapper, so must lock/write state


def main(argv=None):
    """Admin CLI: init, install, add-apps, generations."""
    parser = argparse.ArgumentParser(prog="python -m keyvault.sandbox.state",
                                     description="Manage the state of the TA simulator.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="create the state dir and register APPIDs")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--apps", default="", help="comma-separated APPIDs")
    p.add_argument("--owner", help="user to own the state (e.g. ta)")
    p = sub.add_parser("install", help="install a ta-tool wrapper script")
    p.add_argument("--dest", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--owner")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--pythonpath", help="PYTHONPATH for the wrapper (uninstalled checkout)")
    p = sub.add_parser("add-apps", help="register more APPIDs")
    p.add_argument("--state-dir", required=True)
    p.add_argument("apps", nargs="+")
    p = sub.add_parser("generations", help="print how many keys were generated")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--scope", help="'root' or 'app:<APPID>' (default: total)")
    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            apps = [a.strip() for a in args.apps.split(",") if a.strip()]
            init_state(args.state_dir, apps, owner=args.owner)
        elif args.command == "install":
            install_wrapper(args.dest, args.state_dir, python=args.python, owner=args.owner,
                            pythonpath=args.pythonpath)
        elif args.command == "add-apps":
            add_apps(args.state_dir, args.apps)
        else:
            print(generations(args.state_dir, args.scope))
    except (UnknownApp, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
