"""Tests of the TA Open API emulator: a real server on 127.0.0.1, real HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from keyvault.sandbox import state as st
from keyvault.sandbox.openapi import make_server, serving
from tests.support.timeouts import TIMEOUT

REPO = Path(__file__).resolve().parents[2]
KEY_RE = re.compile(r"(?<![A-Za-z0-9])[A-Za-z0-9]{64}(?![A-Za-z0-9])")
META, ANALYZE, PROJECTS = "open/list-event-meta", "open/event-analyze", "open/project-list"


@pytest.fixture
def sim(tmp_path):
    state_dir = tmp_path / "state"
    st.init_state(state_dir, ["APP1", "APP2", "APP3"])
    return state_dir


@pytest.fixture
def api(sim):
    with serving(sim) as server:
        yield server


def call(server, path, *, body=None, content_type=None, port=None, **params):
    """One HTTP request; POST when body is given; return the parsed envelope."""
    port = port or server.server_address[1]
    url = f"http://127.0.0.1:{port}/{path}?{urllib.parse.urlencode(params)}"
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if content_type or not isinstance(body, (bytes, type(None))):
        req.add_header("Content-Type", content_type or "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        answer = json.loads(resp.read())
    assert set(answer) == {
        "return_code",
        "return_message",
        "data",
        "stackMessage",
        "showStackMessage",
    }
    assert answer["stackMessage"] == "" and answer["showStackMessage"] is False
    return answer


def code(answer):
    return answer["return_code"], answer["return_message"]


OK = (0, "success")
INVALID_ACCESS = (-1008, "Invalid access")
NO_PERMISSION = (-1009, "You do not have permission to operate")
INVALID_ITEM = (-1999, "Invalid item")
PARAM_ERROR = (-1010, "Parameter error")


def test_list_event_meta_success_envelope(api, sim):
    key = st.generate(sim, "app:APP2")
    answer = call(api, META, token=key, projectId=2)
    assert code(answer) == OK
    assert answer["data"]["projectId"] == 2 and len(answer["data"]["events"]) >= 2


def test_unknown_path_not_supported(api, sim):
    key = st.generate(sim, "root")
    assert code(call(api, "open/nothing-here", token=key)) == (-1, "Operation not supported")
    assert (
        code(
            call(
                api,
                "open/querySql",
                body=b"sql=select+1",
                token=key,
                content_type="application/x-www-form-urlencoded",
            )
        )[0]
        == -1
    )
    assert api.stats[("open/nothing-here", "not_supported")] == 1


@pytest.mark.parametrize("token", [None, "", "x" * 64])
def test_missing_or_wrong_token(api, sim, token):
    st.generate(sim, "root")
    params = {} if token is None else {"token": token}
    assert code(call(api, META, projectId=1, **params)) == INVALID_ACCESS
    assert code(call(api, PROJECTS, body={}, loginName="admin", **params)) == INVALID_ACCESS


def test_generation_invalidates_previous_key(api, sim):
    old = st.generate(sim, "app:APP1")
    assert code(call(api, META, token=old, projectId=1)) == OK
    new = st.generate(sim, "app:APP1")
    assert code(call(api, META, token=old, projectId=1)) == INVALID_ACCESS
    assert code(call(api, META, token=new, projectId=1)) == OK


def test_rotation_by_real_ta_tool_is_seen_at_once(api, sim):
    old = st.generate(sim, "app:APP3")
    env = dict(
        os.environ,
        TA_SIM_STATE_DIR=str(sim),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    res = subprocess.run(
        [sys.executable, "-m", "keyvault.sandbox.tatool", "generate_api_secret", "-appid", "APP3"],
        env=env,
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert res.returncode == 0
    printed = KEY_RE.findall(res.stdout.decode())
    assert len(printed) == 1
    assert code(call(api, META, token=old, projectId=3)) == INVALID_ACCESS
    assert code(call(api, META, token=printed[0], projectId=3)) == OK


def test_root_key_valid_for_everything(api, sim):
    root = st.generate(sim, "root")
    app1 = st.generate(sim, "app:APP1")
    for pid in (1, 2, 3):
        assert code(call(api, META, token=root, projectId=pid)) == OK
        assert code(call(api, ANALYZE, token=root, projectId=pid)) == OK
    answer = call(api, PROJECTS, body={}, token=root, loginName="admin")
    assert code(answer) == OK
    assert answer["data"] == [
        {"projectId": i, "appid": f"APP{i}", "projectName": f"Project APP{i}"} for i in (1, 2, 3)
    ]
    assert code(call(api, PROJECTS, token=root, loginName="admin")) == OK  # GET works too
    newroot = st.generate(sim, "root")
    assert code(call(api, META, token=root, projectId=1)) == INVALID_ACCESS
    assert code(call(api, META, token=newroot, projectId=1)) == OK
    assert code(call(api, META, token=app1, projectId=1)) == OK  # other scopes untouched


def test_app_key_only_for_its_project(api, sim):
    key = st.generate(sim, "app:APP2")
    assert code(call(api, META, token=key, projectId=2)) == OK
    answer = call(api, ANALYZE, token=key, projectId=2)
    assert code(answer) == OK and answer["data"]["projectId"] == 2
    assert code(call(api, META, token=key, projectId=1)) == NO_PERMISSION
    assert code(call(api, ANALYZE, token=key, projectId=3)) == NO_PERMISSION
    assert code(call(api, PROJECTS, body={}, token=key, loginName="admin")) == NO_PERMISSION


def test_unknown_project_and_bad_parameters(api, sim):
    root = st.generate(sim, "root")
    app = st.generate(sim, "app:APP1")
    assert code(call(api, META, token=root, projectId=99)) == INVALID_ITEM
    assert code(call(api, META, token=app, projectId=99)) == INVALID_ITEM
    assert code(call(api, META, token=root)) == PARAM_ERROR
    assert code(call(api, META, token=root, projectId="one")) == PARAM_ERROR
    assert code(call(api, PROJECTS, body={}, token=root)) == PARAM_ERROR


def test_post_bodies_are_parsed_leniently(api, sim):
    root = st.generate(sim, "root")
    assert code(call(api, ANALYZE, body={"projectId": 2, "eventView": {}}, token=root)) == OK
    assert code(call(api, PROJECTS, body={"loginName": "admin"}, token=root)) == OK
    assert (
        code(
            call(
                api,
                PROJECTS,
                body=b"loginName=admin",
                token=root,
                content_type="application/x-www-form-urlencoded",
            )
        )
        == OK
    )
    assert code(call(api, META, body=b"projectId=3", token=root)) == OK  # not JSON: form
    # urllib's default Content-Type is a form even for a JSON body
    assert code(call(api, META, body=b'{"projectId": 1}', token=root)) == OK
    assert (
        code(
            call(
                api,
                META,
                body=b'{"projectId": 1}',
                token=root,
                content_type="application/x-www-form-urlencoded",
            )
        )
        == OK
    )
    assert code(call(api, META, body=b"{broken", token=root)) == PARAM_ERROR
    assert code(call(api, META, body=b"[1, 2]", token=root)) == PARAM_ERROR
    # a token in the body never overrides the one in the query string
    answer = call(api, META, body={"token": root, "projectId": 1}, token="bad")
    assert code(answer) == INVALID_ACCESS


def test_stats_count_path_and_outcome(api, sim):
    key = st.generate(sim, "app:APP1")
    call(api, META, token=key, projectId=1)
    call(api, META, token=key, projectId=1)
    call(api, META, token=key, projectId=2)
    call(api, META, token="nope", projectId=1)
    assert api.stats == {(META, "ok"): 2, (META, "no_permission"): 1, (META, "invalid_access"): 1}


def test_tokens_are_never_logged(api, sim, capsys):
    key = st.generate(sim, "root")
    call(api, META, token=key, projectId=1)
    call(api, "open/unknown", token=key)
    err = capsys.readouterr().err
    assert "/open/list-event-meta" in err and "/open/unknown" in err
    assert key not in err and "token" not in err


@pytest.mark.parametrize("host", ["0.0.0.0", "localhost", "::1", "192.168.1.10", ""])
def test_only_loopback(sim, host):
    with pytest.raises(ValueError):  # noqa: PT011
        make_server(sim, host=host, port=0)


def test_missing_state(tmp_path):
    with pytest.raises(FileNotFoundError):
        make_server(tmp_path / "none", port=0)


def test_cli_serves_until_interrupted(sim):
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    cmd = [sys.executable, "-m", "keyvault.sandbox.openapi", "--state-dir", str(sim)]
    with subprocess.Popen(
        [*cmd, "--port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        try:
            banner = proc.stdout.readline().decode()
            port = int(re.search(r"127\.0\.0\.1:(\d+)/", banner).group(1))
            key = st.generate(sim, "root")
            assert code(call(None, META, port=port, token=key, projectId=1)) == OK
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0
    assert key.encode() not in err
    res = subprocess.run(
        [*cmd, "--host", "0.0.0.0", "--port", "0"], env=env, capture_output=True, timeout=TIMEOUT
    )
    assert res.returncode == 1 and b"127.0.0.1 only" in res.stderr
