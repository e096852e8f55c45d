"""A real ``keyvault serve`` for HTTP tests: a subprocess on 127.0.0.1, a populated store,
tokens, and helpers that never print a key.

``served`` (function scope, on SQLite and PostgreSQL through ``db_url``) builds this world
with the in-process CLI, then starts the server:

    clusters  c (root, apps a1 and a2)  and  c2 (root, app a1)
    tokens    root-c        root:c
              app-a1        app:c/a1
              app-all       app:c/*
              root-c2       root:c2
              app-a1a2      app:c/a1 + app:c/a2
              rotator       root:c + app:c/a1, --rotate

Keys come from ``leak_guard.new_key`` (registered with the leak guard) and are kept in
``World.keys``; compare them as ``ok = a == b; assert ok`` so that a failure report never
shows one. The server is started with ``python -m keyvault serve`` in
the ``home`` environment (``KEYVAULT_SERVE_WEBHOOKS=0``), waited for with a bounded poll of
``/healthz``, and stopped at teardown (SIGTERM, a bounded wait, then SIGKILL).

pytest does not rewrite this module's asserts (PYTEST_DONT_REWRITE): their messages show
stderr only, never a CompletedProcess with its stdout.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.support.cli import KEYVAULT, Cli, expect, proc_describe, run_keyvault
from tests.support.leak_guard import new_key
from tests.support.timeouts import TIMEOUT

REQUEST_TIMEOUT = 15.0  # any HTTP request

TOKENS = {
    "root-c": (["root:c"], False),
    "app-a1": (["app:c/a1"], False),
    "app-all": (["app:c/*"], False),
    "root-c2": (["root:c2"], False),
    "app-a1a2": (["app:c/a1", "app:c/a2"], False),
    "rotator": (["root:c", "app:c/a1"], True),
}
SCOPES = {("c", "root"), ("c", "app:a1"), ("c", "app:a2"), ("c2", "root"), ("c2", "app:a1")}
_KEYISH = re.compile(r"[A-Za-z0-9]{64}")


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the server retries if it is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrub(text: str) -> str:
    """Blank every 64-character key-shaped run, for text shown in failure messages."""
    return _KEYISH.sub("<64 chars>", text)


class Server:
    """``keyvault serve`` as a subprocess on 127.0.0.1."""

    def __init__(self, workdir: Path, env: dict | None = None, args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.args = args  # more `keyvault serve` options (--workers 2)
        base = env or os.environ
        self.env = {
            **base,
            "KEYVAULT_SERVE_WEBHOOKS": "0",
            "KEYVAULT_SERVE_SCHEDULER": "0",
            # PostgreSQL: the revision read on every request, so a change committed by the test
            # is seen by the very next request; tests/integration/test_revision_notify.py sets
            # it to exercise the notifications.
            "KEYVAULT_REVISION_RECHECK_MS": base.get("KEYVAULT_REVISION_RECHECK_MS", "0"),
        }
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        """Start the server and wait until it answers."""
        return self.launch().wait_healthy()

    def launch(self) -> Server:
        """Start the process without waiting (it boots while the caller does other work)."""
        self._starts += 1
        self.port = free_port()
        with (
            open(self.workdir / f"serve-{self._starts}.out", "wb") as out,
            open(self.workdir / f"serve-{self._starts}.err", "wb") as err,
        ):
            self.proc = subprocess.Popen(
                [*KEYVAULT, "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.workdir,
            )
        return self

    def wait_healthy(self) -> Server:
        """Poll /healthz (bounded); relaunch at most twice if the port was taken meanwhile."""
        for _attempt in range(3):
            if self._wait_healthy():
                return self
            last = self.log_tail()
            self.stop()
            if "address already in use" not in last.lower():
                break
            self.launch()
        pytest.fail(
            f"keyvault serve did not become healthy within {TIMEOUT:g}s: {last}",
            pytrace=False,
        )

    def _wait_healthy(self) -> bool:
        proc = self.proc
        assert proc is not None, "launch() first"
        deadline = time.monotonic() + TIMEOUT
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            while time.monotonic() < deadline:
                try:
                    if http.get(f"{self.url}/healthz").status_code == 200:
                        return True
                except httpx.TransportError:
                    pass
                try:  # the pause between polls doubles as the early-exit check
                    proc.wait(timeout=0.05)
                    return False
                except subprocess.TimeoutExpired:
                    pass
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=TIMEOUT)

    def log_tail(self, path: Path | None = None, chars: int = 1500) -> str:
        path = path or self.workdir / f"serve-{self._starts}.err"
        try:
            return scrub(path.read_text(errors="replace")[-chars:])
        except OSError:
            return ""


@dataclass
class World:
    """The populated store behind a running server."""

    server: Server
    cli: Cli
    db_url: str
    keys: dict = field(default_factory=dict, repr=False)  # (cluster, scope) -> current key
    versions: dict = field(default_factory=dict)  # (cluster, scope) -> current version
    tokens: dict = field(default_factory=dict, repr=False)  # name -> token
    history: list = field(default_factory=list, repr=False)  # every key ever stored

    @property
    def url(self) -> str:
        return self.server.url

    def http(self, token: str | None = None, **kwargs) -> httpx.Client:
        """An httpx client on the server, with ``token``'s bearer header if given (a name)."""
        headers = {"Authorization": f"Bearer {self.tokens[token]}"} if token else {}
        return httpx.Client(
            base_url=self.url, headers=headers, timeout=REQUEST_TIMEOUT, trust_env=False, **kwargs
        )

    def create_token(
        self, name: str, *scopes: str, rotate: bool = False, expires: str | None = None
    ) -> str:
        args = ["token", "create", name, "--json"] + [a for s in scopes for a in ("--scope", s)]
        args += (["--rotate"] if rotate else []) + (["--expires", expires] if expires else [])
        result = expect(self.cli(*args))
        self.tokens[name] = json.loads(result.stdout)["token"]
        return self.tokens[name]

    def import_key(self, cluster: str, scope: str, *, other_process: bool = False) -> int:
        """Store a new key for a scope (in-process CLI, or ``python -m keyvault import``)."""
        key = new_key()
        args = ["import", "--cluster", cluster] + (
            ["--root"] if scope == "root" else ["--appid", scope[4:]]
        )
        if other_process:
            result = run_keyvault(*args, input=key + "\n")
            assert result.returncode == 0, proc_describe(result)
        else:
            expect(self.cli(*args, input=key + "\n"))
        self.keys[(cluster, scope)] = key
        self.history.append(key)
        self.versions[(cluster, scope)] = self.versions.get((cluster, scope), 0) + 1
        return self.versions[(cluster, scope)]

    def holds_key(self, text: str) -> bool:
        """True if ``text`` contains any key this store ever held."""
        return any(k in text for k in self.history)


def key_matches(world: World, body: dict, cluster: str, scope: str) -> bool:
    """The body is the current key of (cluster, scope) — compared without showing it."""
    return (
        body.get("cluster") == cluster
        and body.get("scope") == scope
        and body.get("version") == world.versions[(cluster, scope)]
        and body.get("key") == world.keys[(cluster, scope)]
    )


def build_world(cli: Cli, db_url: str, workdir: Path) -> World:
    """Create the store (see the module docstring) and start a server on it."""
    expect(cli("init"))
    # The server boots meanwhile: it loads keys and tokens per request, never at start.
    world = World(server=Server(workdir).launch(), cli=cli, db_url=db_url)
    try:
        for cluster in ("c", "c2"):
            # Nothing listens there: only the client test calls TA, through its own emulator.
            expect(cli("cluster", "add", cluster, "--open-api-url", "http://127.0.0.1:9"))
        for cluster, scope in sorted(SCOPES):
            world.import_key(cluster, scope)
        for name, (scopes, rotate) in TOKENS.items():
            world.create_token(name, *scopes, rotate=rotate)
        world.server.wait_healthy()
    except BaseException:
        world.server.stop()
        raise
    return world


@pytest.fixture
def served(cli: Cli, db_url: str, tmp_path) -> Iterator[World]:
    """A store with two clusters, five keys and six tokens, served by ``keyvault serve``."""
    workdir = tmp_path / "serve"
    workdir.mkdir()
    world = build_world(cli, db_url, workdir)
    try:
        yield world
    finally:
        world.server.stop()


__all__ = [
    "REQUEST_TIMEOUT",
    "SCOPES",
    "TOKENS",
    "Server",
    "World",
    "build_world",
    "free_port",
    "key_matches",
    "scrub",
    "served",
]


class CountingReceiver:
    """A webhook receiver on 127.0.0.1 (a private address: refused unless allowed) that
    answers 204 and counts the POSTs it got; ``got`` is set on the first."""

    def __init__(self) -> None:
        self.requests = 0
        self.got = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.requests += 1
                self.send_response(204)
                self.end_headers()
                receiver.got.set()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[CountingReceiver]:
    """A ``CountingReceiver`` for the test, closed after it."""
    r = CountingReceiver()
    try:
        yield r
    finally:
        r.close()


def add_sshd_cluster(world: World, sshd_env, api_url: str, name: str = "t") -> None:
    """Cluster ``name`` on the real test sshd's TA host (root, `su` to ta, pinned host key),
    its Open API at ``api_url``, and a token ``rotator-<name>`` that may rotate its root."""
    expect(world.cli("cluster", "add", name, "--open-api-url", api_url, "--login-name", "root"))
    expect(
        world.cli(
            "host", "add", name, sshd_env.host, "--port", str(sshd_env.port),
            "--user", "root", "--identity", str(sshd_env.identity("root")),
            "--become", "su", "--fingerprint", sshd_env.host_key_fingerprint,
        )
    )  # fmt: skip
    world.create_token(f"rotator-{name}", f"root:{name}", rotate=True)
