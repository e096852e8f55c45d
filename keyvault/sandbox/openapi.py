"""Emulator of the TA Open API for keyvault's demo and tests; binds to 127.0.0.1 only.

URL form ``http://127.0.0.1:<port>/<api_path>?token=<key>&...``, GET or POST (JSON
body, or a form body for ``/querySql``; bodies are parsed leniently and never override
the query string). Every answer is HTTP 200 with the envelope ``{"return_code",
"return_message", "data", "stackMessage", "showStackMessage"}``. Keys are read fresh
from the state dir on every request, because ta-tool processes rotate them meanwhile:
the current root key is valid for everything, the current key of an app only for
requests whose projectId is that app's.

Return codes. Only 0 (success) and -1999 ("Invalid item") are confirmed TA numbers;
every other number here is this emulator's own choice (the real ones are unknown):

    -1     Operation not supported (unknown api path); also an internal error
    -1008  Invalid access (token missing, wrong or superseded by a newer key; the noise
           option ``accept_old_keys`` makes the previous key of each scope still work)
    -1009  You do not have permission to operate (app key used for another project
           or for the root-only project list)
    -1010  Parameter error (projectId or loginName missing or malformed)

Endpoints: ``open/list-event-meta`` and ``open/event-analyze`` (``projectId``),
``open/project-list`` (``loginName``; root key only). Tokens are never logged.
``server.stats`` counts requests per ``(api_path, outcome)`` for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from keyvault.sandbox.state import previous_keys, read_noise, read_state

DEFAULT_PORT = 8992
RC_OK, RC_NOT_SUPPORTED, RC_INVALID_ACCESS = 0, -1, -1008
RC_NO_PERMISSION, RC_PARAM_ERROR, RC_INVALID_ITEM = -1009, -1010, -1999
_ANSWERS = {  # code -> (return_message, outcome name used in server.stats)
    RC_OK: ("success", "ok"),
    RC_NOT_SUPPORTED: ("Operation not supported", "not_supported"),
    RC_INVALID_ACCESS: ("Invalid access", "invalid_access"),
    RC_NO_PERMISSION: ("You do not have permission to operate", "no_permission"),
    RC_PARAM_ERROR: ("Parameter error", "param_error"),
    RC_INVALID_ITEM: ("Invalid item", "invalid_item"),
}
_EVENTS = ["ta_app_start", "ta_app_end", "order_paid"]


class _Reject(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


def _authenticate(state, token, previous=None):
    """Return None for the root key, the projectId for an app key; else reject.

    A key that was replaced is rejected like any unknown one (TA invalidates it at once),
    unless ``previous`` (scope -> the key its last generation replaced) is given, as it is
    with the noise option ``accept_old_keys``: then those keys still work, as on a TA that
    failed to invalidate them.
    """
    if not token:
        raise _Reject(RC_INVALID_ACCESS)
    given = str(token).encode("utf-8")
    # compare_digest: no timing hints about how much of a key matched
    if state["root"]["key"] and hmac.compare_digest(given, state["root"]["key"].encode()):
        return None
    for app in state["apps"].values():
        if app["key"] and hmac.compare_digest(given, app["key"].encode()):
            return app["project_id"]
    for scope, old in (previous or {}).items():
        if old and hmac.compare_digest(given, old.encode()):
            return None if scope == "root" else state["apps"][scope[4:]]["project_id"]
    raise _Reject(RC_INVALID_ACCESS)


def _project(state, role, params):
    try:
        pid = int(params["projectId"])
    except (KeyError, TypeError, ValueError):
        raise _Reject(RC_PARAM_ERROR) from None
    if pid not in {a["project_id"] for a in state["apps"].values()}:
        raise _Reject(RC_INVALID_ITEM)
    if role is not None and role != pid:
        raise _Reject(RC_NO_PERMISSION)
    return pid


def _list_event_meta(state, role, params):
    return {"projectId": _project(state, role, params), "events": list(_EVENTS)}


def _event_analyze(state, role, params):
    pid = _project(state, role, params)
    return {
        "projectId": pid,
        "x": ["2024-01-01", "2024-01-02"],
        "y": [{"event": _EVENTS[0], "values": [42, 37]}],
    }


def _project_list(state, role, params):
    if role is not None:
        raise _Reject(RC_NO_PERMISSION)
    if not params.get("loginName"):
        raise _Reject(RC_PARAM_ERROR)
    apps = sorted(state["apps"].items(), key=lambda item: item[1]["project_id"])
    return [
        {"projectId": a["project_id"], "appid": appid, "projectName": f"Project {appid}"}
        for appid, a in apps
    ]


_ENDPOINTS = {
    "open/list-event-meta": _list_event_meta,
    "open/event-analyze": _event_analyze,
    "open/project-list": _project_list,
}


class _Handler(BaseHTTPRequestHandler):
    server_version = "TA-OpenAPI-emulator/0.1"
    _api_path = "?"

    def do_GET(self):
        self._handle(b"")

    def do_POST(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        self._handle(self.rfile.read(length) if length > 0 else b"")

    def _params(self, query, body):
        params = dict(parse_qsl(query, keep_blank_values=True))
        extra = {}
        if body:
            text = body.decode("utf-8", "replace")
            # Lenient: try JSON whatever the Content-Type claims (urllib labels every
            # body as a form), except for /querySql whose body is always a form.
            loaded = None
            if not self._api_path.endswith("querySql"):
                with contextlib.suppress(ValueError):
                    loaded = json.loads(text)
            if isinstance(loaded, dict):
                extra = loaded
            elif loaded is None:
                extra = dict(parse_qsl(text, keep_blank_values=True))
        return {**extra, **params}  # the query string wins (it carries the token)

    def _handle(self, body):
        split = urlsplit(self.path)
        self._api_path = split.path.strip("/")
        endpoint, data, outcome = _ENDPOINTS.get(self._api_path), None, None
        if endpoint is None:
            code = RC_NOT_SUPPORTED
        else:
            try:
                params = self._params(split.query, body)
                state = read_state(self.server.state_dir)  # fresh: others rotate keys
                previous = None
                if read_noise(self.server.state_dir).get("accept_old_keys"):
                    previous = previous_keys(self.server.state_dir)
                role = _authenticate(state, params.get("token"), previous)
                data = endpoint(state, role, params)
                code = RC_OK
            except _Reject as rej:
                code = rej.code
            except Exception:  # noqa: BLE001 - TA answers 200 with a code even then
                code, outcome = RC_NOT_SUPPORTED, "error"
        message, default_outcome = _ANSWERS[code]
        if outcome == "error":
            message = "There seems to be some problems with the system"
        self.server.count(self._api_path, outcome or default_outcome)
        payload = json.dumps(
            {
                "return_code": code,
                "return_message": message,
                "data": data,
                "stackMessage": "",
                "showStackMessage": False,
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    # The raw request line carries ?token=...: log only the method and the bare path.
    def log_request(self, code="-", size="-"):
        method = getattr(self, "command", None) or "?"
        sys.stderr.write(f"openapi: {method} /{self._api_path} -> {code}\n")

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        method = getattr(self, "command", None) or "?"  # unset if the request line never came
        sys.stderr.write(f"openapi: {method} /{self._api_path}: request error\n")


class TaOpenApiServer(ThreadingHTTPServer):
    """The emulator; ``stats`` maps (api_path, outcome) to a request count."""

    daemon_threads = True

    def __init__(self, address, state_dir):
        self.state_dir = os.fspath(state_dir)
        self.stats = {}
        self._stats_lock = threading.Lock()
        super().__init__(address, _Handler)

    def count(self, api_path, outcome):
        """Count one answered request."""
        with self._stats_lock:
            self.stats[(api_path, outcome)] = self.stats.get((api_path, outcome), 0) + 1


def make_server(state_dir, host="127.0.0.1", port=DEFAULT_PORT):
    """Create (not start) the emulator on 127.0.0.1:port; port 0 picks a free port."""
    if host != "127.0.0.1":
        raise ValueError(f"the TA Open API emulator binds to 127.0.0.1 only, not {host!r}")
    read_state(state_dir)  # fail now, not on the first request, if state is missing
    return TaOpenApiServer((host, port), state_dir)


@contextlib.contextmanager
def serving(state_dir, host="127.0.0.1", port=0):
    """A started emulator (in a thread) for the duration of the block; yields the server."""
    server = make_server(state_dir, host, port)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _stop_on_signals(server: ThreadingHTTPServer) -> None:
    """SIGINT and SIGTERM end ``serve_forever`` cleanly, whatever was inherited.

    A process started as a background job (``cmd &`` without job control, many CI runners)
    inherits SIGINT *ignored*, and Python then installs no KeyboardInterrupt handler: Ctrl-C
    or ``kill -INT`` would be lost and the emulator would run until killed. The handler asks
    the server to stop from another thread (``shutdown`` waits for the loop, so it cannot run
    in the loop's own thread); a signal that arrives before the loop starts still stops it,
    and no KeyboardInterrupt can land half-way through the clean-up.
    """

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


def main(argv=None):
    """Run the emulator in the foreground until Ctrl-C (SIGINT) or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m keyvault.sandbox.openapi",
        description="TA Open API emulator (127.0.0.1 only).",
    )
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    try:
        server = make_server(args.state_dir, args.host, args.port)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _stop_on_signals(server)
    host, port = server.server_address[:2]
    print(f"TA Open API emulator on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
