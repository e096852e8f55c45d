"""Tests of the ta-tool emulator, always run as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from keyvault.sandbox import state as st
from tests.support.timeouts import TIMEOUT

REPO = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, "-m", "keyvault.sandbox.tatool"]
KEY_RE = re.compile(r"(?<![A-Za-z0-9])[A-Za-z0-9]{64}(?![A-Za-z0-9])")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


def _env(state_dir=None):
    env = dict(os.environ)
    env.pop("TA_SIM_STATE_DIR", None)
    if state_dir is not None:
        env["TA_SIM_STATE_DIR"] = str(state_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_tool(state_dir, *args):
    return subprocess.run([*TOOL, *args], env=_env(state_dir), capture_output=True, timeout=TIMEOUT)


def keys_in(output):
    return KEY_RE.findall(ANSI_RE.sub("", output.decode()))


def wait_for(predicate, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.02)


@pytest.fixture
def sim(tmp_path):
    state_dir = tmp_path / "state"
    st.init_state(state_dir, ["APP1", "APP2"])
    return state_dir


def test_generate_root_secret(sim):
    res = run_tool(sim, "generate_root_secret")
    assert res.returncode == 0 and res.stderr == b""
    lines = res.stdout.decode().splitlines()
    assert lines[0] == "generate root secret success"
    assert keys_in(res.stdout) == [st.current_key(sim, "root")]
    assert st.generations(sim, "root") == 1


@pytest.mark.parametrize("args", [["-appid", "APP1"], ["-appid=APP1"]])
def test_generate_api_secret(sim, args):
    res = run_tool(sim, "generate_api_secret", *args)
    assert res.returncode == 0
    assert res.stdout.decode().splitlines()[0] == "generate api secret success, appid: APP1"
    assert keys_in(res.stdout) == [st.current_key(sim, "app:APP1")]
    assert st.current_key(sim, "app:APP2") is None and st.current_key(sim, "root") is None


def test_regenerating_replaces_the_key(sim):
    first = keys_in(run_tool(sim, "generate_api_secret", "-appid", "APP2").stdout)
    second = keys_in(run_tool(sim, "generate_api_secret", "-appid", "APP2").stdout)
    assert len(first) == len(second) == 1 and first != second
    assert st.current_key(sim, "app:APP2") == second[0]
    assert st.generations(sim, "app:APP2") == 2


def test_unknown_appid_generates_nothing(sim):
    res = run_tool(sim, "generate_api_secret", "-appid", "NOPE")
    assert res.returncode == 1
    assert res.stdout.decode().strip() == "ERROR: appid NOPE does not exist"
    assert st.generations(sim) == 0
    assert not (sim / "last_run.json").exists()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["modify_meta"],
        ["generate_api_secret"],
        ["generate_api_secret", "-appid"],
        ["generate_api_secret", "-appid="],
        ["generate_api_secret", "APP1"],
        ["generate_root_secret", "x"],
        ["-appid=APP1"],
    ],
)
def test_bad_usage(sim, args):
    res = run_tool(sim, *args)
    assert res.returncode == 1
    assert res.stdout == b""
    assert res.stderr.decode().startswith("usage: ta-tool")
    assert st.generations(sim) == 0


def test_missing_state_dir_env(sim):
    res = subprocess.run(
        [*TOOL, "generate_root_secret"], env=_env(), capture_output=True, timeout=TIMEOUT
    )
    assert res.returncode == 1 and b"TA_SIM_STATE_DIR" in res.stderr and res.stdout == b""


def test_uninitialised_state_dir(tmp_path):
    res = run_tool(tmp_path / "nothing", "generate_root_secret")
    assert res.returncode == 1 and b"does not exist" in res.stderr


def test_last_run_has_pid_and_scope_but_no_key(sim):
    with subprocess.Popen(
        [*TOOL, "generate_api_secret", "-appid", "APP1"], env=_env(sim), stdout=subprocess.PIPE
    ) as proc:
        proc.communicate(timeout=TIMEOUT)
    text = (sim / "last_run.json").read_text()
    assert st.current_key(sim, "app:APP1") not in text
    last = json.loads(text)
    assert last["pid"] == proc.pid and last["scope"] == "app:APP1"


def test_installed_wrapper(tmp_path):
    state_dir = tmp_path / "it's state"
    st.init_state(state_dir, ["APP1"])
    wrapper = tmp_path / "bin dir" / "ta-tool"
    st.install_wrapper(wrapper, state_dir)
    res = subprocess.run(
        [str(wrapper), "generate_api_secret", "-appid=APP1"],
        env=_env(),
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert res.returncode == 0
    assert keys_in(res.stdout) == [st.current_key(state_dir, "app:APP1")]
    # pythonpath= lets the wrapper work without PYTHONPATH (as after `su - ta`)
    st.install_wrapper(wrapper, state_dir, pythonpath=REPO)
    env = _env()
    del env["PYTHONPATH"]
    res = subprocess.run(
        [str(wrapper), "generate_root_secret"],
        env=env,
        capture_output=True,
        cwd="/",
        timeout=TIMEOUT,
    )
    assert res.returncode == 0
    assert keys_in(res.stdout) == [st.current_key(state_dir, "root")]
    res = subprocess.run([str(wrapper), "bogus"], env=env, capture_output=True, timeout=TIMEOUT)
    assert res.returncode == 1 and b"usage" in res.stderr


def test_concurrent_generations_keep_the_last_key(sim):
    procs = [
        subprocess.Popen(
            [*TOOL, "generate_api_secret", "-appid", "APP1"], env=_env(sim), stdout=subprocess.PIPE
        )
        for _ in range(8)
    ]
    printed = []
    for proc in procs:
        with proc:
            out, _ = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0
        printed.extend(keys_in(out))
    assert len(printed) == 8 and len(set(printed)) == 8
    assert st.generations(sim, "app:APP1") == 8 and st.generations(sim) == 8
    assert printed.count(st.current_key(sim, "app:APP1")) == 1


def test_noise_banner(sim):
    st.set_noise(sim, banner=["Last login: Mon Jan 1 from 10.0.0.1", "Welcome to ta1"])
    res = run_tool(sim, "generate_root_secret")
    lines = res.stdout.decode().splitlines()
    assert res.returncode == 0
    assert lines[:3] == [
        "Last login: Mon Jan 1 from 10.0.0.1",
        "Welcome to ta1",
        "generate root secret success",
    ]
    assert keys_in(res.stdout) == [st.current_key(sim, "root")]


def test_noise_crlf(sim):
    st.set_noise(sim, crlf=True, banner=["motd"])
    res = run_tool(sim, "generate_root_secret")
    assert res.returncode == 0
    assert res.stdout.count(b"\r\n") == res.stdout.count(b"\n") == 3
    assert keys_in(res.stdout) == [st.current_key(sim, "root")]


def test_noise_ansi(sim):
    st.set_noise(sim, ansi=True)
    res = run_tool(sim, "generate_api_secret", "-appid", "APP1")
    key_line = res.stdout.decode().splitlines()[1]
    assert key_line.startswith("\x1b[") and key_line.endswith("\x1b[0m")
    assert keys_in(res.stdout) == [st.current_key(sim, "app:APP1")]


def test_noise_delay(sim):
    st.set_noise(sim, delay_seconds=0.2)
    started = time.monotonic()
    res = run_tool(sim, "generate_root_secret")
    assert res.returncode == 0 and time.monotonic() - started >= 0.2
    assert st.generations(sim) == 1


@pytest.mark.parametrize(
    ("args", "scope"),
    [(["generate_api_secret", "-appid", "APP1"], "app:APP1"), (["generate_root_secret"], "root")],
)
def test_noise_fail_apps(sim, args, scope):
    old = st.generate(sim, scope)
    st.set_noise(sim, fail_apps=["APP1", "root"])
    res = run_tool(sim, *args)
    assert res.returncode == 1
    assert res.stdout.decode().strip() == "ERROR: internal error"
    assert st.generations(sim) == 1 and st.current_key(sim, scope) == old
    assert run_tool(sim, "generate_api_secret", "-appid", "APP2").returncode == 0


def test_noise_no_key(sim):
    old = st.generate(sim, "app:APP1")
    st.set_noise(sim, output_mode="no_key")
    res = run_tool(sim, "generate_api_secret", "-appid", "APP1")
    assert res.returncode == 0
    assert res.stdout.decode().strip() == "generate success" and keys_in(res.stdout) == []
    new = st.current_key(sim, "app:APP1")
    assert new is not None and new != old  # generated: the old key is dead, the new unknown
    assert st.generations(sim, "app:APP1") == 2


def test_noise_two_keys(sim):
    st.set_noise(sim, output_mode="two_keys")
    res = run_tool(sim, "generate_root_secret")
    found = keys_in(res.stdout)
    assert res.returncode == 0 and len(found) == 2 and found[0] != found[1]
    assert found.count(st.current_key(sim, "root")) == 1
    assert res.stdout.decode().splitlines()[-1].startswith("trace: ")


def _start_holding(sim, tmp_path, **noise):
    release = tmp_path / "release"
    st.set_noise(sim, hold_file=release, **noise)
    proc = subprocess.Popen(
        [*TOOL, "generate_api_secret", "-appid", "APP1"], env=_env(sim), stdout=subprocess.PIPE
    )
    return proc, release


def test_hold_after_print(sim, tmp_path):
    proc, release = _start_holding(sim, tmp_path)
    with proc:
        try:
            wait_for(lambda: (sim / "holding").exists() or proc.poll() is not None)
            assert proc.poll() is None
            assert int((sim / "holding").read_text()) == proc.pid
            # the key was printed and flushed before the hold began
            lines = [proc.stdout.readline(), proc.stdout.readline()]
            assert keys_in(b"".join(lines)) == [st.current_key(sim, "app:APP1")]
            proc.send_signal(signal.SIGHUP)  # a dropped SSH session must not kill it
            release.touch()
            assert proc.wait(timeout=TIMEOUT) == 0
        finally:
            release.touch()
            if proc.poll() is None:
                proc.kill()
    assert not (sim / "holding").exists()


def test_hold_before_print(sim, tmp_path):
    proc, release = _start_holding(sim, tmp_path, hold_before_print=True)
    with proc:
        try:
            wait_for(lambda: (sim / "holding").exists() or proc.poll() is not None)
            assert proc.poll() is None
            assert st.generations(sim, "app:APP1") == 1  # generated already ...
            assert select.select([proc.stdout], [], [], 0)[0] == []  # ... but nothing printed
            release.touch()
            out, _ = proc.communicate(timeout=TIMEOUT)
        finally:
            release.touch()
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0
    assert keys_in(out) == [st.current_key(sim, "app:APP1")]


@pytest.fixture
def shared_tmp():
    # tmp_path lives under a root-only 0700 dir; another user needs a traversable one.
    path = Path(tempfile.mkdtemp(prefix="kv-sim-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _runs_as_nobody(python):
    try:
        return (
            subprocess.run(
                [python, "-c", "import sys; assert sys.version_info >= (3, 11)"],
                user="nobody",
                capture_output=True,
                timeout=TIMEOUT,
            ).returncode
            == 0
        )
    except OSError:  # e.g. an interpreter under /root
        return False


def test_wrapper_runs_as_owner(shared_tmp):
    if os.geteuid() != 0:
        pytest.skip("needs root to run as another user")
    usable = [p for p in (sys.executable, "/usr/bin/python3") if _runs_as_nobody(p)]
    if not usable or not os.access(REPO, os.R_OK | os.X_OK):
        pytest.skip("no Python 3.11+ that the user 'nobody' can run")
    state_dir, wrapper = shared_tmp / "state", shared_tmp / "bin" / "ta-tool"
    st.init_state(state_dir, ["APP1"], owner="nobody")
    st.install_wrapper(wrapper, state_dir, python=usable[0], pythonpath=REPO, owner="nobody")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/"}
    for _ in range(2):  # root rotating in between must not lock the owner out
        res = subprocess.run(
            [str(wrapper), "generate_api_secret", "-appid", "APP1"],
            env=env,
            user="nobody",
            capture_output=True,
            timeout=TIMEOUT,
        )
        assert res.returncode == 0, res.stderr.decode()
        assert keys_in(res.stdout) == [st.current_key(state_dir, "app:APP1")]
        st.generate(state_dir, "root")
    assert st.generations(state_dir) == 4
