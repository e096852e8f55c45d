"""State store of the TA simulator: the current keys of one emulated TA cluster.

Layout of ``state_dir`` (mode 0700, files 0600):

- ``state.json``       the registry: ``{"format": 2, "apps": {APPID: project id}}``,
                       changed only when APPIDs are registered
- ``keys/root``, ``keys/app-APPID``  one file per scope: ``GENERATIONS KEY [PREVIOUS]``
                       (``-`` for no key yet); a generation rewrites only its own scope's
                       file, and keeps the key it replaced (dead, unless the noise option
                       ``accept_old_keys`` makes the Open API emulator accept it)
- ``generated.sha256`` SHA-256 of every key ever generated, one line per generation
                       (so also the total count)
- ``state.lock``       flock target: exclusive for read-modify-write, shared for reads
- ``noise.json``       optional fault/noise options read by the ta-tool emulator
- ``last_run.json`` and ``holding``: written by the ta-tool emulator (never a key)

Several ta-tool processes and the Open API emulator use one directory at once, so
every access goes through the lock. Files are replaced atomically but not fsynced: the
simulated cluster must survive killed processes (the page cache does), not power loss.
ta-tool starts once per key and its cost is in every rotation benchmark, so a
generation is O(1) in the number of APPIDs and the module imports little (json and re
only where needed). Stdlib only; importing has no side effects.
Admin CLI: ``python -m keyvault.sandbox.state {init,install,add-apps,generations} ...``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time

KEY_LENGTH = 64
KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
NOISE_OPTIONS = frozenset(
    {
        "banner",
        "crlf",
        "ansi",
        "delay_seconds",
        "fail_apps",
        "output_mode",
        "hold_file",
        "hold_before_print",
        "accept_old_keys",  # the Open API emulator: TA forgot to invalidate the previous key
    }
)
OUTPUT_MODES = ("normal", "no_key", "two_keys")
_FILES = ("state.json", "state.lock", "noise.json", "last_run.json", "holding", "generated.sha256")
# Characters of a key file name. Registration checks the APPID grammar (keyvault.scope); a
# generation only checks that the name is a safe file name (no '/', no '.'), which every
# registered APPID is, without paying for importing keyvault.scope on each ta-tool call.
_FILE_NAME_CHARS = frozenset(KEY_ALPHABET + "_-")
KEYS_DIR = "keys"
FORMAT = 2


class UnknownApp(Exception):
    """The APPID is not registered in the simulated cluster."""


FINGERPRINT_LOG = "generated.sha256"
_NOT_INITIALISED = "TA simulator state not initialised in {} (run: python -m keyvault.sandbox.state init --state-dir ...)"  # noqa: E501


def _path(state_dir, name):
    return os.path.join(os.fspath(state_dir), name)


def _follow_dir_owner(fd, state_dir):
    owner = _dir_owner(state_dir)
    if owner is not None:
        os.fchown(fd, *owner)


def _dir_owner(state_dir):
    # When root writes into a state dir that belongs to the ta user (init with
    # owner=...), new files must stay that user's or ta-tool loses access to them.
    if os.geteuid() != 0:
        return None
    st = os.stat(state_dir)
    return st.st_uid, st.st_gid


def _chown_tree(state_dir, owner):
    import pwd

    try:
        pw = pwd.getpwnam(owner)
    except KeyError:
        raise ValueError(f"no such user: {owner}") from None
    os.chown(state_dir, pw.pw_uid, pw.pw_gid)
    names = [*_FILES, KEYS_DIR]
    keys = _path(state_dir, KEYS_DIR)
    if os.path.isdir(keys):
        names += [os.path.join(KEYS_DIR, n) for n in os.listdir(keys)]
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.chown(_path(state_dir, name), pw.pw_uid, pw.pw_gid)


class _locked:
    """flock on state.lock for the duration of a ``with`` block."""

    def __init__(self, state_dir, *, exclusive):
        self.state_dir, self.exclusive, self.fd = state_dir, exclusive, None

    def __enter__(self):
        state_dir = self.state_dir
        if not os.path.isdir(state_dir):
            raise FileNotFoundError(
                f"TA simulator state dir {state_dir} does not exist "
                f"(run: python -m keyvault.sandbox.state init --state-dir ...)"
            )
        path = _path(state_dir, "state.lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            _follow_dir_owner(fd, state_dir)
        except PermissionError:
            # A reader without write access can still take a shared lock on the file.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the lock


def _write_file(state_dir, name, data: bytes):
    """Atomically replace state_dir/name with data (mode 0600, owned like state_dir)."""
    from keyvault.fsutil import atomic_write  # imports only os and contextlib

    # Not fsync'd: the simulated cluster must survive killed processes, not power loss.
    atomic_write(
        _path(state_dir, name), data, mode=0o600, durable=False, owner=_dir_owner(state_dir)
    )


def _write_json(state_dir, name, obj):
    import json

    _write_file(state_dir, name, (json.dumps(obj, sort_keys=True) + "\n").encode("utf-8"))


def _read_json(state_dir, name, default):
    try:
        f = open(_path(state_dir, name), encoding="utf-8")  # noqa: SIM115
    except FileNotFoundError:
        return default
    import json

    with f:
        return json.load(f)


def _scope_file(scope):
    if scope == "root":
        return os.path.join(KEYS_DIR, "root")
    if isinstance(scope, str) and scope.startswith("app:") and len(scope) > 4:
        if not set(scope[4:]) <= _FILE_NAME_CHARS:  # could never have been registered
            raise UnknownApp(f"appid {scope[4:]} does not exist")
        return os.path.join(KEYS_DIR, f"app-{scope[4:]}")
    raise ValueError(f"bad scope {scope!r}: expected 'root' or 'app:<APPID>'")


def _read_entry(state_dir, scope):
    """(generations, key or None) of a scope; UnknownApp when its file is missing."""
    count, key, _ = _read_entry3(state_dir, scope)
    return count, key


def _read_entry3(state_dir, scope):
    """(generations, key or None, the previous key or None) of a scope."""
    name = _scope_file(scope)
    try:
        with open(_path(state_dir, name), encoding="ascii") as f:
            count, key, *previous = f.read().split()
    except FileNotFoundError:
        if scope == "root":
            raise FileNotFoundError(_NOT_INITIALISED.format(state_dir)) from None
        raise UnknownApp(f"appid {scope[4:]} does not exist") from None
    old = previous[0] if previous and previous[0] != "-" else None
    return int(count), (None if key == "-" else key), old


def _write_entry(state_dir, scope, count, key, previous=None):
    line = f"{count} {key or '-'}" + (f" {previous}" if previous else "")
    _write_file(state_dir, _scope_file(scope), f"{line}\n".encode("ascii"))


def _load_registry(state_dir):
    registry = _read_json(state_dir, "state.json", None)
    if registry is None:
        raise FileNotFoundError(_NOT_INITIALISED.format(state_dir))
    if registry.get("format") != FORMAT:
        raise ValueError(
            f"TA simulator state in {state_dir} has an old format: run "
            f"`python -m keyvault.sandbox.state init --state-dir {state_dir}` to upgrade it"
        )
    return registry


def _upgrade(state_dir, old):
    # Format 1 kept every key and counter in state.json (rewritten on each generation).
    os.makedirs(_path(state_dir, KEYS_DIR), mode=0o700, exist_ok=True)
    _write_entry(state_dir, "root", old["root"]["generations"], old["root"]["key"])
    for appid, entry in old["apps"].items():
        _write_entry(state_dir, f"app:{appid}", entry["generations"], entry["key"])
    return {"format": FORMAT, "apps": {appid: e["project_id"] for appid, e in old["apps"].items()}}


def _register(state_dir, registry, apps):
    from keyvault.scope import APPID_RULE, is_appid  # the one APPID grammar

    for appid in apps:
        if not is_appid(appid):
            raise ValueError(f"bad APPID {appid!r}: expected {APPID_RULE}")
    for appid in apps:
        if appid not in registry["apps"]:
            registry["apps"][appid] = max(registry["apps"].values(), default=0) + 1
            _write_entry(state_dir, f"app:{appid}", 0, None)


def new_key() -> str:
    """Return a fresh random 64-char [A-Za-z0-9] token."""
    # os.urandom with rejection sampling (uniform over the 62 symbols); no `secrets`
    # import, whose start-up cost every emulated ta-tool run would pay.
    out: list[str] = []
    while len(out) < KEY_LENGTH:
        out.extend(KEY_ALPHABET[b % 62] for b in os.urandom(KEY_LENGTH) if b < 248)
    return "".join(out[:KEY_LENGTH])


def init_state(state_dir, apps=(), *, owner=None):
    """Create (or complete, or upgrade) the state dir and register APPIDs; keys are kept."""
    state_dir = os.fspath(state_dir)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    os.chmod(state_dir, 0o700)  # makedirs' mode passes through umask; an old dir keeps its own
    if owner is not None:
        _chown_tree(state_dir, owner)  # first, so files created below follow the dir owner
    with _locked(state_dir, exclusive=True):
        keys = _path(state_dir, KEYS_DIR)
        os.makedirs(keys, mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            st = os.stat(state_dir)
            os.chown(keys, st.st_uid, st.st_gid)
        registry = _read_json(state_dir, "state.json", None)
        if registry is None:
            registry = {"format": FORMAT, "apps": {}}
            _write_entry(state_dir, "root", 0, None)
        elif registry.get("format") != FORMAT:
            registry = _upgrade(state_dir, registry)
        _register(state_dir, registry, list(apps))
        _write_json(state_dir, "state.json", registry)
    if owner is not None:
        _chown_tree(state_dir, owner)


def add_apps(state_dir, apps):
    """Register more APPIDs (already known ones are kept); return {appid: project_id}."""
    apps = list(apps)
    with _locked(state_dir, exclusive=True):
        registry = _load_registry(state_dir)
        _register(state_dir, registry, apps)
        _write_json(state_dir, "state.json", registry)
    return dict(registry["apps"])


def read_state(state_dir):
    """Return the whole state as a fresh dict (keys included: handle with care)::

    {"root": {"key", "generations"}, "apps": {APPID: {"key", "generations", "project_id"}},
     "total_generations": N}
    """
    with _locked(state_dir, exclusive=False):
        registry = _load_registry(state_dir)
        count, key = _read_entry(state_dir, "root")
        apps = {}
        for appid, pid in registry["apps"].items():
            n, k = _read_entry(state_dir, f"app:{appid}")
            apps[appid] = {"key": k, "generations": n, "project_id": pid}
        return {
            "root": {"key": key, "generations": count},
            "apps": apps,
            "total_generations": _count_generations(state_dir),
        }


def previous_keys(state_dir):
    """The key each scope's last generation replaced (None if none), by scope: ``root`` and
    ``app:<APPID>`` (keys: handle with care). Only the noise option ``accept_old_keys`` uses it."""
    with _locked(state_dir, exclusive=False):
        scopes = ["root", *(f"app:{appid}" for appid in _load_registry(state_dir)["apps"])]
        return {scope: _read_entry3(state_dir, scope)[2] for scope in scopes}


def _count_generations(state_dir):
    try:
        with open(_path(state_dir, FINGERPRINT_LOG), "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except FileNotFoundError:
        return 0


def current_key(state_dir, scope):
    """Return the valid key of scope ('root' or 'app:<APPID>'), or None if none yet."""
    with _locked(state_dir, exclusive=False):
        return _read_entry(state_dir, scope)[1]


def generations(state_dir, scope=None):
    """Return how many keys were generated for scope, or in total when scope is None."""
    with _locked(state_dir, exclusive=False):
        _load_registry(state_dir)
        return _count_generations(state_dir) if scope is None else _read_entry(state_dir, scope)[0]


def project_id(state_dir, appid):
    """Return the projectId of a registered APPID."""
    with _locked(state_dir, exclusive=False):
        try:
            return _load_registry(state_dir)["apps"][appid]
        except KeyError:
            raise UnknownApp(f"appid {appid} does not exist") from None


def generate(state_dir, scope, *, record=False):
    """Make a new key for scope, replacing (so invalidating) the previous one; return it.

    ``record`` also writes last_run.json (pid and scope, never the key) under the same lock.
    """
    with _locked(state_dir, exclusive=True):
        count, old = _read_entry(state_dir, scope)
        key = new_key()
        _write_entry(state_dir, scope, count + 1, key, old)
        _log_fingerprint(state_dir, key)
        if record:
            _write_last_run(state_dir, scope)
    return key


def _log_fingerprint(state_dir, key):
    # SHA-256 of every key ever generated (never the key): lets a test run prove
    # that no generated key leaked into any captured output or log.
    fd = os.open(_path(state_dir, FINGERPRINT_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        _follow_dir_owner(fd, state_dir)
        os.write(fd, _sha256_hex(key.encode()).encode() + b"\n")
    finally:
        os.close(fd)


def _sha256_hex(data: bytes) -> str:
    # CPython's built-in SHA-256 module: importing hashlib loads OpenSSL, about 3 ms that
    # every emulated ta-tool run would pay. Same digest either way.
    try:
        from _sha256 import sha256  # Python 3.11
    except ImportError:
        try:
            from _sha2 import sha256  # Python 3.12+
        except ImportError:
            from hashlib import sha256
    return sha256(data).hexdigest()


def generated_fingerprints(state_dir) -> set[str]:
    """SHA-256 hex digests of every key this simulator ever generated."""
    try:
        with open(_path(state_dir, FINGERPRINT_LOG), encoding="ascii") as f:
            return {line.strip() for line in f if line.strip()}
    except FileNotFoundError:
        return set()


def find_leaks(text, fingerprints) -> int:
    """How many 64-char tokens in ``text`` are keys whose SHA-256 is in ``fingerprints``."""
    import re

    found = 0
    for token in set(re.findall(r"[A-Za-z0-9]{64}", text)):
        if _sha256_hex(token.encode()) in fingerprints:
            found += 1
    return found


def _write_last_run(state_dir, scope):
    """Write last_run.json with this process's pid and the scope (never the key)."""
    # By hand rather than with json: ta-tool then never imports it. A scope is root or
    # app:<APPID> with APPID characters [A-Za-z0-9_-] (keyvault.scope), which need no escaping.
    text = f'{{"pid": {os.getpid()}, "scope": "{scope}", "time": {time.time()!r}}}\n'
    _write_file(state_dir, "last_run.json", text.encode("ascii"))


def set_noise(state_dir, **options):
    """Merge ta-tool fault/noise options into noise.json (None removes one); return all."""
    unknown = set(options) - NOISE_OPTIONS
    if unknown:
        raise ValueError(f"unknown noise option(s): {', '.join(sorted(unknown))}")
    if options.get("output_mode") not in (None, *OUTPUT_MODES):
        raise ValueError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}")
    for name in ("banner", "fail_apps"):
        value = options.get(name)
        if value is not None and (
            isinstance(value, str) or not all(isinstance(v, str) for v in value)
        ):
            raise ValueError(f"{name} must be a list of strings")
    if options.get("accept_old_keys") not in (None, True, False):
        raise ValueError("accept_old_keys must be true or false")
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
    if not os.path.exists(_path(state_dir, "noise.json")):
        if not os.path.isdir(state_dir):
            raise FileNotFoundError(f"TA simulator state dir {state_dir} does not exist")
        return {}  # the usual case, answered without the lock or json
    with _locked(state_dir, exclusive=False):
        return _read_json(state_dir, "noise.json", {})


def clear_noise(state_dir):
    """Remove all noise options."""
    with _locked(state_dir, exclusive=True), contextlib.suppress(FileNotFoundError):
        os.unlink(_path(state_dir, "noise.json"))


def install_wrapper(dest, state_dir, *, python=sys.executable, owner=None, pythonpath=None):
    """Write an executable sh script at dest that runs the ta-tool emulator on state_dir.

    The emulator runs with ``python -P -S`` (no site-packages: it needs only the stdlib and
    this package) and finds this package through PYTHONPATH: ``pythonpath`` or, by
    default, the directory this copy of keyvault is in.
    """
    import shlex

    dest = os.fspath(dest)
    state_dir = os.path.abspath(os.fspath(state_dir))  # the wrapper runs from any cwd
    if pythonpath is None:
        pythonpath = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # `su - ta` resets the environment, so the wrapper sets it itself. The bytecode cache
    # goes under the running user's own home: the package's __pycache__ is often root's and
    # unreadable (umask 077), compiling on every run would double ta-tool's cost, and a
    # cache shared between users would let one plant code that another runs.
    env = (
        f"PYTHONPATH={shlex.quote(os.fspath(pythonpath))} "
        'PYTHONPYCACHEPREFIX="${HOME}/.cache/keyvault-ta-sim" '
        f"TA_SIM_STATE_DIR={shlex.quote(state_dir)}"
    )
    code = "import sys; from keyvault.sandbox.tatool import main; sys.exit(main())"
    script = (
        "#!/bin/sh\n# ta-tool emulator of the keyvault TA simulator (not the real TA tool)\n"
        f'{env} exec {shlex.quote(os.fspath(python))} -P -S -c {shlex.quote(code)} "$@"\n'
    )
    from keyvault.fsutil import atomic_write

    # Made here with the umask's mode, not atomic_write's 0700: the ta user runs the wrapper.
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    atomic_write(dest, script.encode("utf-8"), mode=0o755)
    if owner is not None and os.path.isdir(state_dir):
        _chown_tree(state_dir, owner)  # the owner runs the wrapper, so must lock/write state


def main(argv=None):
    """Admin CLI: init, install, add-apps, generations."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m keyvault.sandbox.state", description="Manage the state of the TA simulator."
    )
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
            install_wrapper(
                args.dest,
                args.state_dir,
                python=args.python,
                owner=args.owner,
                pythonpath=args.pythonpath,
            )
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
