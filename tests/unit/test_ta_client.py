"""keyvault.ta against a real local HTTP server answering canned TA envelopes."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import pytest

from keyvault import ta
from keyvault.errors import InvalidInput, TaApiError, TaTransportError

TOKEN = "kvSECRET" + "A1b2C3d4" * 7  # 64 characters, distinctive enough to grep for
assert len(TOKEN) == 64


def envelope(code: int = 0, message: str = "success", data=None, stack: str = "") -> dict:
    return {
        "return_code": code,
        "return_message": message,
        "data": data,
        "stackMessage": stack,
        "showStackMessage": False,
    }


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    headers: dict
    body: bytes


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - keep pytest output clean
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        self.server.requests.append(
            Recorded(self.command, parts.path, parse_qs(parts.query), dict(self.headers), body)
        )
        route = self.server.routes.get(parts.path, (404, b"no route", "text/plain"))
        if callable(route):
            route(self)
            return
        status, payload, content_type = route
        if not isinstance(payload, bytes):
            payload = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _serve


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = False  # so server_close() joins every handler thread


@dataclass
class FakeTa:
    server: _Server
    routes: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def json(self, path: str, payload, status: int = 200) -> None:
        self.routes[path] = (status, payload, "application/json")


@pytest.fixture
def fake_ta():
    server = _Server(("127.0.0.1", 0), _Handler)
    fake = FakeTa(server)
    server.routes, server.requests, server.release = fake.routes, fake.requests, fake.release
    # A short poll interval keeps shutdown() (and so each teardown) fast.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.release.set()  # wake any stalled handler before joining
        server.shutdown()
        thread.join()
        server.server_close()


@pytest.fixture
def client(fake_ta) -> ta.TaClient:
    return ta.TaClient(fake_ta.base_url, timeout=5)


def test_success_returns_data_and_sends_token(fake_ta, client):
    fake_ta.json("/open/list-event-meta", envelope(data={"events": ["login"]}))
    data = client.call("open/list-event-meta", token=TOKEN, params={"projectId": 7})
    assert data == {"events": ["login"]}
    (req,) = fake_ta.requests
    assert req.method == "GET"
    assert req.query == {"token": [TOKEN], "projectId": ["7"]}


def test_call_envelope_returns_whole_envelope_even_on_failure(fake_ta, client):
    fake_ta.json("/open/x", envelope(-1999, "no such project"))
    env = client.call_envelope("open/x", token=TOKEN)
    assert env["return_code"] == -1999 and env["return_message"] == "no such project"


def test_nonzero_return_code_uses_table_meaning(fake_ta, client):
    fake_ta.json("/open/x", envelope(-1999, "project 9 not found", stack="java.lang.X\n\tat a.b"))
    with pytest.raises(TaApiError) as info:
        client.call("open/x", token=TOKEN)
    exc = info.value
    assert type(exc) is TaApiError
    assert (exc.return_code, exc.meaning) == (-1999, "invalid item")
    assert exc.return_message == "project 9 not found"
    assert exc.stack_message == "java.lang.X\n\tat a.b"
    text = str(exc)
    for part in ("open/x", "-1999", "invalid item", "project 9 not found"):
        assert part in text
    assert "java.lang.X" not in text


def test_string_return_code_is_accepted(fake_ta, client):
    fake_ta.json("/open/x", {"return_code": "-1005", "return_message": "slow down"})
    with pytest.raises(TaApiError) as info:
        client.call("open/x", token=TOKEN)
    assert info.value.return_code == -1005
    assert info.value.meaning == "request frequency too fast (unverified)"


def test_operator_table_extends_and_overrides(fake_ta):
    client = ta.TaClient(fake_ta.base_url, error_codes={-1003: "not logged in", -1999: "bad item"})
    fake_ta.json("/open/a", envelope(-1003, "please log in"))
    fake_ta.json("/open/b", envelope(-1999, "?"))
    with pytest.raises(TaApiError) as a:
        client.call("open/a", token=TOKEN)
    with pytest.raises(TaApiError) as b:
        client.call("open/b", token=TOKEN)
    assert a.value.meaning == "not logged in" and "not logged in" in str(a.value)
    assert b.value.meaning == "bad item"
    assert ta.DEFAULT_RETURN_CODES[-1999] == "invalid item"  # the default table is untouched


def test_unknown_code(fake_ta, client):
    fake_ta.json("/open/x", envelope(-4242, ""))
    with pytest.raises(TaApiError) as info:
        client.call("open/x", token=TOKEN)
    assert info.value.meaning == ta.UNKNOWN_MEANING
    assert "[ta] error_codes" in str(info.value) and "-4242" in str(info.value)
    assert "(no return_message)" in str(info.value)


def test_http_500(fake_ta, client):
    fake_ta.routes["/open/x"] = (500, f"boom {TOKEN}".encode(), "text/plain")
    with pytest.raises(TaTransportError) as info:
        client.call("open/x", token=TOKEN)
    text = str(info.value)
    assert "HTTP 500" in text and "token=***" in text and "boom" in text
    assert TOKEN not in text and info.value.return_code is None


def test_redirect_is_not_followed(fake_ta, client):
    def redirect(handler):
        handler.send_response(302)
        handler.send_header("Location", "/login")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    fake_ta.routes["/open/x"] = redirect
    with pytest.raises(TaTransportError, match="HTTP 302"):
        client.call("open/x", token=TOKEN)
    assert [r.path for r in fake_ta.requests] == ["/open/x"]


def test_non_json_body(fake_ta, client):
    fake_ta.routes["/open/x"] = (200, b"<html>login</html>", "text/html")
    with pytest.raises(TaTransportError) as info:
        client.call("open/x", token=TOKEN)
    assert "not JSON" in str(info.value) and "text/html" in str(info.value)
    assert "token=***" in str(info.value)


@pytest.mark.parametrize("payload", [{"data": 1}, [1, 2], {"return_code": None}, "ok"])
def test_envelope_less_json(fake_ta, client, payload):
    fake_ta.json("/open/x", payload)
    with pytest.raises(TaTransportError, match="without a TA envelope"):
        client.call("open/x", token=TOKEN)


def test_connection_refused():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ta.TaClient(f"http://127.0.0.1:{port}", timeout=5)
    with pytest.raises(TaTransportError) as info:
        client.call("open/x", token=TOKEN)
    assert "cannot reach" in str(info.value) and TOKEN not in str(info.value)


def test_timeout(fake_ta):
    fake_ta.routes["/open/slow"] = lambda handler: handler.server.release.wait(30)
    client = ta.TaClient(fake_ta.base_url, timeout=0.3)
    with pytest.raises(TaTransportError, match=r"did not answer within 0\.3s") as info:
        client.call("open/slow", token=TOKEN)
    assert TOKEN not in str(info.value)


def test_post_json_body(fake_ta, client):
    fake_ta.json("/open/event-analyze", envelope(data=[1]))
    body = {"events": [{"name": "登录"}], "flag": True}
    assert client.call("open/event-analyze", token=TOKEN, method="post", json_body=body) == [1]
    (req,) = fake_ta.requests
    assert req.method == "POST" and req.query == {"token": [TOKEN]}
    assert req.headers["Content-Type"].startswith("application/json")
    assert json.loads(req.body) == body


def test_post_form_body(fake_ta, client):
    fake_ta.json("/querySql", envelope(data="rows"))
    form = {"sql": "select 1 & 2", "format": "json", "timeoutSeconds": 30}
    client.call("/querySql", token=TOKEN, method="POST", form_body=form)
    (req,) = fake_ta.requests
    assert req.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert parse_qs(req.body.decode()) == {
        "sql": ["select 1 & 2"],
        "format": ["json"],
        "timeoutSeconds": ["30"],
    }


def test_post_without_body(fake_ta, client):
    fake_ta.json("/open/project-list", envelope(data=[]))
    client.call("open/project-list", token=TOKEN, method="POST", params={"loginName": "root"})
    (req,) = fake_ta.requests
    assert req.method == "POST" and req.body == b"" and req.query["loginName"] == ["root"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "DELETE"},
        {"method": "GET", "json_body": {}},
        {"method": "POST", "json_body": {}, "form_body": {}},
        {"params": {"TOKEN": "x"}},
    ],
)
def test_bad_call_arguments(kwargs):
    client = ta.TaClient("http://127.0.0.1:9")  # rejected before any connection is made
    with pytest.raises(InvalidInput):
        client.call("open/x", token=TOKEN, **kwargs)


def test_token_never_leaks(fake_ta, client, caplog):
    caplog.set_level(logging.DEBUG, logger="keyvault.ta")
    echo = f"invalid token {TOKEN}"
    fake_ta.json("/open/ok", envelope(data=1))
    fake_ta.json("/open/bad", envelope(-1001, echo, stack=f"at check({TOKEN})"))
    fake_ta.routes["/open/html"] = (200, f"<p>{TOKEN}</p>".encode(), "text/html")
    fake_ta.routes["/open/500"] = (500, TOKEN.encode(), "text/plain")
    errors = []
    client.call("open/ok", token=TOKEN)
    for path in ("open/bad", "open/html", "open/500"):
        with pytest.raises(TaApiError) as info:
            client.call(path, token=TOKEN)
        errors.append(info.value)
    for exc in errors:
        assert TOKEN not in str(exc) and TOKEN not in repr(exc)
        assert TOKEN not in exc.return_message
        assert TOKEN not in getattr(exc, "stack_message", "")
    assert TOKEN not in repr(client)
    result = ta.verify_key(client, token=TOKEN, method="GET", api_path="open/bad", params=None)
    assert TOKEN not in repr(result)
    assert caplog.records and "token=***" in caplog.text
    assert TOKEN not in caplog.text


def test_is_key_rejected(fake_ta):
    client = ta.TaClient(fake_ta.base_url, invalid_key_codes=[-1017])
    fake_ta.json("/open/coded", envelope(-1017, "nope"))
    fake_ta.json("/open/text", envelope(-1, "Invalid Access"))
    fake_ta.json("/open/other", envelope(-1999, "no such project"))
    results = {}
    for path in ("coded", "text", "other"):
        with pytest.raises(TaApiError) as info:
            client.call(f"open/{path}", token=TOKEN)
        results[path] = client.is_key_rejected(info.value)
    assert results == {"coded": True, "text": True, "other": False}
    assert not ta.is_key_rejected(TaApiError("x", return_code=-1017, return_message="nope"))
    assert ta.is_key_rejected(TaApiError("x", return_code=-3, return_message="bad SECRET"))
    assert not ta.is_key_rejected(TaTransportError("token refused by proxy"))
    assert not ta.is_key_rejected(ValueError("token"))


def test_verify_key_default_checks(fake_ta, client):
    fake_ta.json("/open/list-event-meta", envelope(data=[]))
    fake_ta.json("/open/project-list", envelope(-1999, "unknown login"))
    check = ta.APP_KEY_CHECK
    ok = ta.verify_key(
        client, token=TOKEN, method=check.method, api_path=check.api_path, params={check.param: 3}
    )
    detail = "GET open/list-event-meta answered return_code 0"
    assert ok == ta.VerifyResult(True, 0, "success", detail)
    check = ta.ROOT_KEY_CHECK
    bad = ta.verify_key(
        client,
        token=TOKEN,
        method=check.method,
        api_path=check.api_path,
        params={check.param: "root"},
    )
    assert (bad.ok, bad.return_code, bad.return_message) == (False, -1999, "unknown login")
    assert "invalid item" in bad.detail
    app, root = fake_ta.requests
    assert (app.method, app.path, app.query["projectId"]) == ("GET", "/open/list-event-meta", ["3"])
    assert (root.method, root.path, root.query["loginName"]) == (
        "POST",
        "/open/project-list",
        ["root"],
    )


def test_verify_key_transport_failure(fake_ta, client):
    fake_ta.routes["/open/x"] = (502, b"bad gateway", "text/plain")
    result = ta.verify_key(client, token=TOKEN, method="GET", api_path="open/x", params=None)
    assert not result.ok and result.return_code is None and "HTTP 502" in result.detail


def test_redact_url():
    url = ta.build_url("http://ta2:8992", "open/x", TOKEN, {"projectId": 1})
    assert ta.redact_url(url) == "http://ta2:8992/open/x?token=***&projectId=1"
    assert ta.redact_url("http://h/p?a=1&TOKEN=abc&b=2#f") == "http://h/p?a=1&TOKEN=***&b=2#f"
    assert ta.redact_url("http://h/p?a=1") == "http://h/p?a=1"
    assert ta.redact_url("token=abc") == "token=***"
    assert ta.redact_url("http://h/p?mytoken=abc") == "http://h/p?mytoken=abc"


@pytest.mark.parametrize(
    ("base", "path", "expected"),
    [
        ("http://ta2:8992", "open/x", "http://ta2:8992/open/x"),
        ("http://ta2:8992/", "/open/x", "http://ta2:8992/open/x"),
        ("http://ta2:8992///", "//open/x/", "http://ta2:8992/open/x"),
        ("HTTPS://ta2.example:443/prefix/", "querySql", "https://ta2.example:443/prefix/querySql"),
        ("http://[::1]:8992", "open/x", "http://[::1]:8992/open/x"),
        ("  http://ta2:8992  ", "open/x", "http://ta2:8992/open/x"),
    ],
)
def test_build_url_joins_cleanly(base, path, expected):
    assert ta.build_url(base, path, "k") == f"{expected}?token=k"


def test_build_url_params():
    url = ta.build_url(
        "http://ta2:8992", "open/x", "k", {"a": "x y&z", "b": True, "c": None, "d": [1, 2]}
    )
    assert url == "http://ta2:8992/open/x?token=k&a=x+y%26z&b=true&d=1&d=2"


@pytest.mark.parametrize(
    ("base", "fragment"),
    [
        ("ftp://ta2:8992", "http:// or https://"),
        ("ta2:8992", "http:// or https://"),
        ("ta2", "http:// or https://"),
        ("", "http:// or https://"),
        ("http://", "no host"),
        ("http://:8992", "no host"),
        ("http://ta2:notaport", "invalid port"),
        ("http://ta2:8992/?token=abc", "query"),
    ],
)
def test_build_url_bad_base(base, fragment):
    with pytest.raises(InvalidInput, match=fragment) as info:
        ta.build_url(base, "open/x", TOKEN)
    assert "abc" not in str(info.value) and TOKEN not in str(info.value)


def test_build_url_rejects_credentials_without_echoing_them():
    with pytest.raises(InvalidInput, match="user:password") as info:
        ta.TaClient("http://admin:hunter2@ta2:8992")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("path", ["", "/", "open/x?a=1", "open/../admin", "open x", "open/x#f"])
def test_build_url_bad_path(path):
    with pytest.raises(InvalidInput, match="API path"):
        ta.build_url("http://ta2:8992", path, "k")


@pytest.mark.parametrize("token", ["", "   "])
def test_build_url_empty_token(token):
    with pytest.raises(InvalidInput, match="token"):
        ta.build_url("http://ta2:8992", "open/x", token)


def test_client_repr_and_validation():
    assert repr(ta.TaClient("http://ta2:8992/")) == "TaClient(base_url='http://ta2:8992')"
    with pytest.raises(InvalidInput, match="timeout"):
        ta.TaClient("http://ta2:8992", timeout=0)


def test_tables():
    assert ta.DEFAULT_RETURN_CODES == {
        0: "success",
        -1999: "invalid item",
        -1005: "request frequency too fast (unverified)",
    }
    assert "Invalid access" in ta.KNOWN_DESCRIPTIONS and len(ta.KNOWN_DESCRIPTIONS) == 41
