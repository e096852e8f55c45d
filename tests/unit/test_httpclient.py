"""keyvault.httpclient against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from keyvault import httpclient

Route = Callable[[BaseHTTPRequestHandler], None]


class Server:
    """Answers each path with a route; records what it was sent."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                server.seen.append((self.command, self.path, dict(self.headers), body))
                server.routes[self.path.split("?")[0]](self)

            do_GET = do_POST = _any

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"


def answer(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return route


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.http.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.http.shutdown()
        srv.http.server_close()
        thread.join(10)


def test_get_returns_status_headers_and_body(server):
    server.routes["/x"] = answer(200, b'{"a": 1}', {"ETag": '"v1"'})
    got = httpclient.request("GET", f"{server.url}/x?q=1", headers={"Accept": "json"})
    assert (got.status, got.header("etag"), got.json()) == (200, '"v1"', {"a": 1})
    method, path, headers, _ = server.seen[0]
    assert (method, path, headers["Accept"]) == ("GET", "/x?q=1", "json")


def test_post_sends_the_body(server):
    server.routes["/p"] = answer(204)
    got = httpclient.request("POST", f"{server.url}/p", body=b"hello")
    assert got.status == 204 and got.body == b""
    assert server.seen[0][3] == b"hello"


def test_error_statuses_and_redirects_are_answers(server):
    server.routes["/e"] = answer(503, b"busy")
    server.routes["/r"] = answer(302, b"", {"Location": "/elsewhere"})
    assert httpclient.request("GET", f"{server.url}/e").status == 503
    moved = httpclient.request("GET", f"{server.url}/r")
    assert moved.status == 302 and [p for _, p, _, _ in server.seen] == ["/e", "/r"]


def test_environment_proxies_are_ignored(server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    server.routes["/x"] = answer(200, b"direct")
    assert httpclient.request("GET", f"{server.url}/x").body == b"direct"


def test_an_oversized_answer_fails_or_is_cut(server):
    server.routes["/big"] = answer(200, b"x" * 5000)
    with pytest.raises(httpclient.HttpError, match="more than 1000 bytes"):
        httpclient.request("GET", f"{server.url}/big", max_bytes=1000)
    cut = httpclient.request("GET", f"{server.url}/big", max_bytes=1000, truncate=True)
    assert cut.body == b"x" * 1000


def test_no_answer_in_time(server):
    server.routes["/slow"] = lambda h: server.release.wait(30)
    with pytest.raises(httpclient.HttpError, match=r"did not answer within 0\.3s") as info:
        httpclient.request("GET", f"{server.url}/slow?token=SECRET", timeout=0.3, what="peer")
    assert info.value.timed_out and "SECRET" not in str(info.value)


def test_nobody_listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(httpclient.HttpError, match="cannot reach the receiver at") as info:
        httpclient.request(
            "GET", f"http://127.0.0.1:{port}/x?token=SECRET", what="the receiver", timeout=5
        )
    assert not info.value.timed_out and "SECRET" not in str(info.value)


def test_a_broken_answer_is_an_error_and_text_is_scrubbed(server):
    def garbage(h: BaseHTTPRequestHandler) -> None:
        h.wfile.write(b"NOT HTTP SECRET\r\n\r\n")

    server.routes["/g"] = garbage
    with pytest.raises(httpclient.HttpError, match="failed mid-exchange") as info:
        httpclient.request(
            "GET", f"{server.url}/g", shown="the peer", scrub=lambda t: t.replace("SECRET", "***")
        )
    assert "SECRET" not in str(info.value) and "the peer" in str(info.value)


def test_the_shown_target_never_has_credentials_or_query():
    with pytest.raises(httpclient.HttpError) as info:
        httpclient.request("GET", "http://user:pw@127.0.0.1:9/x?token=SECRET", timeout=5)
    text = str(info.value)
    assert "pw" not in text and "SECRET" not in text and "http://127.0.0.1:9/x" in text


def test_only_http_urls():
    with pytest.raises(ValueError, match="http"):
        httpclient.request("GET", "ftp://127.0.0.1/x")
