"""keyvault.client against real HTTP servers on 127.0.0.1: a small stand-in of keyvault's API
(written here, one key per scope, ETag/304, rotate by swapping the key) and the TA Open API
emulator of keyvault.sandbox for the refresh-once-and-retry helper.

Keys are compared as ``ok = a == b; assert ok``: pytest then shows no key in a failure report
(the leak guard scans every report for the simulator's keys).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from keyvault.client import Client, KeyInfo
from keyvault.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    KeyvaultError,
    NotFound,
    TaApiError,
    TaTransportError,
    Unauthorized,
    Unavailable,
)
from keyvault.sandbox import state as st
from keyvault.sandbox.openapi import serving
from keyvault.ta import TaClient
from tests.support.timeouts import TIMEOUT

REPO = Path(__file__).resolve().parents[2]
TOKEN = "kvt_" + "Rd7Q" * 11  # reader of cluster C: root and every app
ROTATOR = "kvt_" + "Zx9W" * 11  # may rotate
NARROW = "kvt_" + "Nn3B" * 11  # reads app:C/APP1 only
CLUSTER = "C"


# -- a stand-in of keyvault's HTTP API --------------------------------------------------------


@dataclass
class Entry:
    """One scope's key: a static history, or ``provider() -> (version, key)`` read per request."""

    versions: dict = field(default_factory=dict)  # version -> key
    provider: object = None

    def current(self):
        if self.provider is not None:
            return self.provider()
        version = max(self.versions)
        return version, self.versions[version]


@dataclass
class Seen:
    method: str
    path: str
    if_none_match: str | None
    status: int


class FakeVault(ThreadingHTTPServer):
    daemon_threads = True  # keep-alive handler threads must not block teardown

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _VaultHandler)
        self.lock = threading.Lock()
        self.tokens = {
            TOKEN: ({"root:C", "app:C/*"}, False),
            ROTATOR: ({"app:C/*"}, True),
            NARROW: ({"app:C/APP1"}, False),
        }
        self.entries: dict[tuple[str, str], Entry] = {}
        self.seen: list[Seen] = []
        self.inject: dict[str, tuple[int, bytes, str]] = {}  # path -> (status, body, type)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)  # a client that timed out is fine

    def put(self, cluster, scope, key, version=None):
        with self.lock:
            entry = self.entries.setdefault((cluster, scope), Entry())
            version = version or max(entry.versions, default=0) + 1
            entry.versions[version] = key
            return version

    def rotate(self, cluster, scope):
        return self.put(cluster, scope, secrets.token_urlsafe(40))

    def key_of(self, cluster, scope, version):
        with self.lock:
            return self.entries[(cluster, scope)].versions[version]

    def gets(self, path=None):
        with self.lock:
            return [s for s in self.seen if s.method == "GET" and (path is None or s.path == path)]


class _VaultHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def _send(self, status, body=None, headers=()):
        payload = (
            b""
            if body is None
            else (body if isinstance(body, bytes) else json.dumps(body).encode())
        )
        with self.server.lock:  # recorded before the answer goes out: the client may be quick
            self.server.seen.append(
                Seen(
                    self.command,
                    urlsplit(self.path).path,
                    self.headers.get("If-None-Match"),
                    status,
                )
            )
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if status != 304:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if status != 304:
            self.wfile.write(payload)

    def _fail(self, status, code, detail):
        self._send(status, {"error": code, "detail": detail})

    def _route(self):
        server, path = self.server, urlsplit(self.path).path
        if path in server.inject:
            status, body, ctype = server.inject[path]
            with server.lock:
                server.seen.append(Seen(self.command, path, None, status))
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token not in server.tokens:
            return self._fail(401, "unauthorized", "missing, unknown, expired or revoked token")
        scopes, can_rotate = server.tokens[token]
        parts = [unquote(p) for p in path.strip("/").split("/")]
        rotate = parts[-1:] == ["rotate"]
        if rotate:
            parts = parts[:-1]
        if parts[:2] != ["v1", "clusters"] or len(parts) < 4:
            return self._fail(404, "not_found", "no such route")
        cluster = parts[2]
        if parts[3:] == ["root"]:
            scope, grant = "root", {f"root:{cluster}"}
        elif len(parts) == 5 and parts[3] == "apps":
            scope, grant = f"app:{parts[4]}", {f"app:{cluster}/{parts[4]}", f"app:{cluster}/*"}
        else:
            return self._fail(404, "not_found", "no such route")
        if not scopes & grant or (rotate and not can_rotate):
            return self._fail(403, "forbidden", f"token does not cover {scope} of {cluster}")
        with server.lock:
            entry = server.entries.get((cluster, scope))
        if entry is None:
            return self._fail(404, "not_found", f"no key for {scope} of {cluster}")
        if rotate:
            if self.command != "POST":
                return self._fail(400, "invalid_input", "POST only")
            version = server.rotate(cluster, scope)
            return self._send(200, {"cluster": cluster, "scope": scope, "version": version})
        version, key = entry.current()
        etag = f'"v{version}"'
        if self.headers.get("If-None-Match") == etag:
            return self._send(304, headers=[("ETag", etag)])
        body = {
            "cluster": cluster,
            "scope": scope,
            "version": version,
            "fingerprint": f"sha256:{version:08d}",
            "created_at": "2026-11-26T12:00:00Z",
            "key": key,
        }
        self._send(200, body, headers=[("ETag", etag)])

    def do_GET(self):
        self._route()

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self._route()


def _serve(server):
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    return thread


def _stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(timeout=TIMEOUT)


@pytest.fixture
def vault():
    server = FakeVault()
    thread = _serve(server)
    try:
        yield server
    finally:
        _stop(server, thread)


@pytest.fixture
def kv(vault):
    with Client(vault.url, TOKEN, timeout=5) as client:
        yield client


def same(a, b):
    return a == b


# -- keys, ETag and cache ---------------------------------------------------------------------


def test_get_app_then_revalidate_with_304(vault, kv):
    key = secrets.token_urlsafe(40)
    vault.put(CLUSTER, "app:APP1", key)
    first = kv.get_app(CLUSTER, "APP1")
    assert isinstance(first, KeyInfo)
    assert (first.cluster, first.scope, first.version, first.appid) == ("C", "app:APP1", 1, "APP1")
    assert first.fingerprint == "sha256:00000001" and first.created_at == "2026-11-26T12:00:00Z"
    ok = same(first.key, key)
    assert ok, "served key differs"
    second = kv.get_app(CLUSTER, "APP1")
    assert second is first
    seen = vault.gets("/v1/clusters/C/apps/APP1")
    assert [(s.if_none_match, s.status) for s in seen] == [(None, 200), ('"v1"', 304)]


def test_repr_hides_key_and_token(vault, kv):
    key = secrets.token_urlsafe(40)
    vault.put(CLUSTER, "root", key)
    info = kv.get_root(CLUSTER)
    assert key not in repr(info) and key not in str(info)
    assert "version=1" in repr(info) and "fingerprint=" in repr(info)
    assert TOKEN not in repr(kv) and vault.url in repr(kv)
    assert TOKEN not in repr(vars(kv))


def test_rotation_by_another_client_is_seen_at_next_call(vault, kv):
    vault.put(CLUSTER, "app:APP1", secrets.token_urlsafe(40))
    assert kv.get_app(CLUSTER, "APP1").version == 1
    with Client(vault.url, ROTATOR) as other:  # the rotate endpoint, as another process would
        response = other._request("POST", "/v1/clusters/C/apps/APP1/rotate")
        assert response.status == 200 and response.json()["version"] == 2
    info = kv.get_app(CLUSTER, "APP1")
    ok = same(info.key, vault.key_of(CLUSTER, "app:APP1", 2))
    assert info.version == 2 and ok
    assert kv.get_app(CLUSTER, "APP1") is info
    statuses = [(s.if_none_match, s.status) for s in vault.gets()]
    assert statuses == [(None, 200), ('"v1"', 200), ('"v2"', 304)]


def test_refresh_drops_entries(vault, kv):
    for scope in ("root", "app:APP1", "app:APP2"):
        vault.put(CLUSTER, scope, secrets.token_urlsafe(40))
    kv.get_root(CLUSTER), kv.get_app(CLUSTER, "APP1"), kv.get_app(CLUSTER, "APP2")
    assert kv.refresh(CLUSTER, "app:APP1") == 1
    assert kv.cached(CLUSTER, "app:APP1") is None and kv.cached(CLUSTER, "root") is not None
    assert kv.refresh(scope="app:APP1") == 0
    assert kv.refresh("other") == 0
    kv.get_app(CLUSTER, "APP1")
    assert vault.gets("/v1/clusters/C/apps/APP1")[-1].if_none_match is None
    assert kv.refresh(CLUSTER) == 3
    assert kv.refresh() == 0
    kv.get_root(CLUSTER)
    assert vault.gets("/v1/clusters/C/root")[-1].if_none_match is None


def test_path_segments_are_validated_and_quoted(vault, kv):
    vault.put(CLUSTER, "app:a.b-c_1", secrets.token_urlsafe(40))
    assert kv.get_app(CLUSTER, "a.b-c_1").scope == "app:a.b-c_1"
    for bad in ("", "..", "a/b", "a b", None):
        with pytest.raises(InvalidInput):
            kv.get_app(CLUSTER, bad)
    with pytest.raises(InvalidInput):
        kv.get_root("../x")
    assert len(vault.gets()) == 1


# -- errors ------------------------------------------------------------------------------------


def _assert_clean(exc):
    text = f"{exc} {exc!r} {exc.detail!r}" if hasattr(exc, "detail") else f"{exc} {exc!r}"
    assert TOKEN not in text and NARROW not in text


def test_error_mapping(vault):
    vault.put(CLUSTER, "root", secrets.token_urlsafe(40))
    vault.put(CLUSTER, "app:APP1", secrets.token_urlsafe(40))
    with (
        Client(vault.url, "kvt_unknown") as bad,
        Client(vault.url, NARROW) as narrow,
        Client(vault.url, TOKEN) as kv,
    ):
        with pytest.raises(Unauthorized) as info:
            bad.get_root(CLUSTER)
        assert (info.value.http_status, info.value.code) == (401, "unauthorized")
        assert "HTTP 401" in str(info.value) and "unauthorized" in str(info.value)
        assert "kvt_unknown" not in str(info.value)
        assert narrow.get_app(CLUSTER, "APP1").version == 1
        with pytest.raises(Forbidden) as info:
            narrow.get_root(CLUSTER)
        assert info.value.http_status == 403 and info.value.code == "forbidden"
        _assert_clean(info.value)
        with pytest.raises(Forbidden):
            narrow.get_app(CLUSTER, "APP2")
        with pytest.raises(NotFound) as info:
            kv.get_app(CLUSTER, "NOPE")
        assert info.value.detail == "no key for app:NOPE of C"
        _assert_clean(info.value)
        with pytest.raises(Forbidden):  # scopes are checked before existence
            kv.get_root("other")


@pytest.mark.parametrize(
    ("status", "body", "ctype", "cls", "code"),
    [
        (
            409,
            b'{"error": "conflict", "detail": "rotation in progress"}',
            "application/json",
            Conflict,
            "conflict",
        ),
        (
            400,
            b'{"error": "invalid_input", "detail": "bad appid"}',
            "application/json",
            InvalidInput,
            "invalid_input",
        ),
        (
            503,
            b'{"error": "database_error", "detail": "database unreachable"}',
            "application/json",
            Unavailable,
            "database_error",
        ),
        (502, b"<html>Bad Gateway</html>", "text/html", Unavailable, "unavailable"),
        (200, b'{"cluster": "C"}', "application/json", KeyvaultError, "error"),
        (200, b"not json", "text/plain", KeyvaultError, "error"),
    ],
)
def test_error_statuses_and_bodies(vault, kv, status, body, ctype, cls, code):
    vault.inject["/v1/clusters/C/apps/APP1"] = (status, body, ctype)
    with pytest.raises(KeyvaultError) as info:
        kv.get_app(CLUSTER, "APP1")
    assert type(info.value) is cls and info.value.code == code
    if status != 200:
        assert info.value.http_status == status and f"HTTP {status}" in str(info.value)
    _assert_clean(info.value)
    assert kv.cached(CLUSTER, "app:APP1") is None


def test_answer_for_another_scope_is_refused(vault, kv):
    vault.put(CLUSTER, "app:APP2", secrets.token_urlsafe(40))
    body = json.dumps(
        {
            "cluster": "C",
            "scope": "app:APP2",
            "version": 1,
            "fingerprint": "f",
            "created_at": "t",
            "key": "k" * 40,
        }
    ).encode()
    vault.inject["/v1/clusters/C/apps/APP1"] = (200, body, "application/json")
    with pytest.raises(KeyvaultError, match="not 'app:APP1'"):
        kv.get_app(CLUSTER, "APP1")
    assert kv.cached(CLUSTER, "app:APP1") is None


def test_404_drops_a_cached_entry(vault, kv):
    vault.put(CLUSTER, "app:APP1", secrets.token_urlsafe(40))
    kv.get_app(CLUSTER, "APP1")
    with vault.lock:
        del vault.entries[(CLUSTER, "app:APP1")]
    with pytest.raises(NotFound):
        kv.get_app(CLUSTER, "APP1")
    assert kv.cached(CLUSTER, "app:APP1") is None


def test_unreachable_and_bad_arguments():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", TOKEN, timeout=2) as kv:
        with pytest.raises(KeyvaultError, match="cannot reach keyvault") as info:
            kv.get_root(CLUSTER)
        _assert_clean(info.value)
    for url in (
        "ftp://x",
        "http://",
        f"http://u:{TOKEN}@127.0.0.1:1",
        "http://h:99999",
        "http://h/?token=x",
    ):
        with pytest.raises(InvalidInput) as info:
            Client(url, TOKEN)
        assert TOKEN not in str(info.value)
    for token in ("", "  ", "kvt_a b", None):
        with pytest.raises(InvalidInput):
            Client("http://127.0.0.1:1", token)


def test_timeout(vault):
    gate = threading.Event()

    def slow():
        gate.wait(5)
        return 1, "k" * 40

    with vault.lock:
        vault.entries[(CLUSTER, "root")] = Entry(provider=slow)
    try:
        with (
            Client(vault.url, TOKEN, timeout=0.3) as kv,
            pytest.raises(KeyvaultError, match="did not answer"),
        ):
            kv.get_root(CLUSTER)
    finally:
        gate.set()


def test_import_keyvault_client_does_not_import_httpx():
    code = (
        "import sys, keyvault, keyvault.client; "
        "assert 'httpx' not in sys.modules, 'httpx imported'; print('ok')"
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, env=env
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_threads_share_one_cache_while_keys_rotate(vault):
    vault.put(CLUSTER, "app:APP1", secrets.token_urlsafe(40))
    errors, results = [], []
    stop = time.monotonic() + 20  # bounded in time as well as in count

    def reader(kv):
        try:
            for _ in range(60):
                if time.monotonic() > stop:
                    break
                results.append(kv.get_app(CLUSTER, "APP1"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with Client(vault.url, TOKEN) as kv:
        threads = [threading.Thread(target=reader, args=(kv,)) for _ in range(6)]
        for t in threads:
            t.start()
        for _ in range(10):
            vault.rotate(CLUSTER, "app:APP1")
            time.sleep(0.01)
        for t in threads:
            t.join(timeout=TIMEOUT)
        assert not any(t.is_alive() for t in threads)
        assert not errors, [str(e) for e in errors]
        assert len(results) >= 60
        mismatched = sum(
            not same(r.key, vault.key_of(CLUSTER, "app:APP1", r.version)) for r in results
        )
        assert mismatched == 0
        final = kv.get_app(CLUSTER, "APP1")
        assert final.version == 11
        statuses = {s.status for s in vault.gets()}
        assert statuses <= {200, 304} and 304 in statuses


# -- call_ta: the TA Open API emulator and a keyvault that serves the simulator's keys ---------


@pytest.fixture
def sim(tmp_path):
    state_dir = tmp_path / "state"
    st.init_state(state_dir, ["APP1", "APP2"])
    st.generate(state_dir, "root")
    st.generate(state_dir, "app:APP1")
    st.generate(state_dir, "app:APP2")
    return state_dir


@pytest.fixture
def ta_api(sim):
    with serving(sim) as server:
        yield server


@pytest.fixture
def ta_url(ta_api):
    return f"http://127.0.0.1:{ta_api.server_address[1]}"


def serve_sim_keys(vault, sim, scopes=("root", "app:APP1", "app:APP2")):
    """The fake keyvault answers with the simulator's current key, as after each rotation."""
    for scope in scopes:

        def provider(s=scope):
            return (st.generations(sim, s), st.current_key(sim, s))

        with vault.lock:
            vault.entries[(CLUSTER, scope)] = Entry(provider=provider)


def rotate_by_another_process(sim, appid):
    env = dict(
        os.environ,
        TA_SIM_STATE_DIR=str(sim),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    res = subprocess.run(
        [sys.executable, "-m", "keyvault.sandbox.tatool", "generate_api_secret", "-appid", appid],
        env=env,
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert res.returncode == 0, "ta-tool emulator failed"


def outcomes(ta_api, api_path="open/list-event-meta"):
    return {outcome: n for (path, outcome), n in ta_api.stats.items() if path == api_path}


META = {"api_path": "open/list-event-meta", "params": {"projectId": 1}}


def test_call_ta_keeps_working_across_rotations(vault, kv, sim, ta_api, ta_url):
    serve_sim_keys(vault, sim)
    for _ in range(3):
        data = kv.call_ta(CLUSTER, appid="APP1", ta_base_url=ta_url, **META)
        assert data["projectId"] == 1
        rotate_by_another_process(sim, "APP1")
    data = kv.call_ta(CLUSTER, appid="APP1", ta_base_url=ta_url, **META)
    assert data["projectId"] == 1
    # every rotation was seen through the ETag revalidation: TA never refused a key
    assert outcomes(ta_api) == {"ok": 4}
    assert kv.cached(CLUSTER, "app:APP1").version == 4


def test_call_ta_refreshes_and_retries_when_the_key_was_rotated_meanwhile(
    vault, kv, sim, ta_api, ta_url
):
    serve_sim_keys(vault, sim)
    rotated = []

    class RotatedUnderfoot(TaClient):
        """Another process rotates between keyvault's answer and TA's check, once."""

        def call(self, *args, **kwargs):
            if not rotated:
                rotate_by_another_process(sim, "APP1")
                rotated.append(True)
            return super().call(*args, **kwargs)

    data = kv.call_ta(
        CLUSTER, appid="APP1", ta_base_url=ta_url, ta_client_factory=RotatedUnderfoot, **META
    )
    assert data["projectId"] == 1
    assert outcomes(ta_api) == {"invalid_access": 1, "ok": 1}
    seen = vault.gets("/v1/clusters/C/apps/APP1")
    # the retry fetched again without If-None-Match: the cached entry had been dropped
    assert [(s.if_none_match, s.status) for s in seen] == [(None, 200), (None, 200)]
    info = kv.cached(CLUSTER, "app:APP1")
    ok = same(info.key, st.current_key(sim, "app:APP1"))
    assert info.version == 2 and ok


def test_call_ta_raises_after_exactly_one_retry(vault, kv, sim, ta_api, ta_url):
    stale = st.new_key()  # keyvault serves a key that TA does not know, before and after refresh
    vault.put(CLUSTER, "app:APP1", stale)
    with pytest.raises(TaApiError) as info:
        kv.call_ta(CLUSTER, appid="APP1", ta_base_url=ta_url, **META)
    assert type(info.value) is TaApiError and info.value.return_code == -1008
    assert stale not in str(info.value) and "token=***" not in str(info.value)
    assert outcomes(ta_api) == {"invalid_access": 2}
    assert len(vault.gets("/v1/clusters/C/apps/APP1")) == 2


def test_call_ta_does_not_retry_other_errors(vault, kv, sim, ta_api, ta_url):
    serve_sim_keys(vault, sim)
    with pytest.raises(TaApiError) as info:  # APP1's key used for project 2
        kv.call_ta(
            CLUSTER,
            appid="APP1",
            ta_base_url=ta_url,
            api_path="open/list-event-meta",
            params={"projectId": 2},
        )
    assert info.value.return_code == -1009
    with pytest.raises(TaApiError) as info:  # no such project
        kv.call_ta(
            CLUSTER, ta_base_url=ta_url, api_path="open/list-event-meta", params={"projectId": 99}
        )
    assert info.value.return_code == -1999
    assert outcomes(ta_api) == {"no_permission": 1, "invalid_item": 1}
    assert len(vault.gets()) == 2


def test_call_ta_uses_the_factorys_invalid_key_codes(vault, kv, sim, ta_api, ta_url):
    serve_sim_keys(vault, sim)
    with pytest.raises(TaApiError) as info:
        kv.call_ta(
            CLUSTER,
            appid="APP1",
            ta_base_url=ta_url,
            api_path="open/list-event-meta",
            params={"projectId": 2},
            ta_client_factory=lambda url: TaClient(url, invalid_key_codes=[-1009]),
        )
    assert info.value.return_code == -1009
    assert outcomes(ta_api) == {"no_permission": 2}


def test_call_ta_with_the_root_key_and_post(vault, kv, sim, ta_api, ta_url):
    serve_sim_keys(vault, sim)
    data = kv.call_ta(
        CLUSTER,
        ta_base_url=ta_url,
        api_path="open/project-list",
        method="POST",
        params={"loginName": "admin"},
        json_body={},
    )
    assert [p["appid"] for p in data] == ["APP1", "APP2"]
    st.generate(sim, "root")
    data = kv.call_ta(
        CLUSTER, ta_base_url=ta_url, api_path="open/event-analyze", params={"projectId": 2}
    )
    assert data["projectId"] == 2
    assert outcomes(ta_api, "open/project-list") == {"ok": 1}
    assert [s.path for s in vault.gets()] == ["/v1/clusters/C/root"] * 2


def test_call_ta_keyvault_errors_propagate(vault, sim, ta_api, ta_url):
    serve_sim_keys(vault, sim)
    with Client(vault.url, NARROW) as narrow, pytest.raises(Forbidden):
        narrow.call_ta(
            CLUSTER,
            ta_base_url=ta_url,
            api_path="open/project-list",
            method="POST",
            params={"loginName": "admin"},
        )
    with pytest.raises(TaTransportError), Client(vault.url, TOKEN) as kv:
        kv.call_ta(CLUSTER, appid="APP1", ta_base_url="http://127.0.0.1:9", **META)
    assert ta_api.stats == {}
