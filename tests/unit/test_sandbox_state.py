"""Tests of the TA simulator's state store (keyvault.sandbox.state)."""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import stat
import threading
from pathlib import Path

import pytest

from keyvault.sandbox import state as st
from tests.support.timeouts import TIMEOUT

KEY_RE = re.compile(r"[A-Za-z0-9]{64}")


@pytest.fixture
def sim(tmp_path):
    state_dir = tmp_path / "state"
    st.init_state(state_dir, ["APP1", "APP2"])
    return state_dir


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_creates_private_dir_and_registers_apps(sim):
    assert _mode(sim) == 0o700
    assert _mode(sim / "state.json") == 0o600
    state = st.read_state(sim)
    assert state == {
        "root": {"key": None, "generations": 0},
        "apps": {
            "APP1": {"key": None, "generations": 0, "project_id": 1},
            "APP2": {"key": None, "generations": 0, "project_id": 2},
        },
        "total_generations": 0,
    }
    assert st.current_key(sim, "root") is None
    assert st.project_id(sim, "APP2") == 2


def test_init_is_idempotent_and_keeps_keys(sim):
    key = st.generate(sim, "app:APP1")
    st.init_state(sim, ["APP2", "APP3"])
    assert st.current_key(sim, "app:APP1") == key
    assert st.generations(sim) == 1
    assert [st.project_id(sim, a) for a in ("APP1", "APP2", "APP3")] == [1, 2, 3]


def test_add_apps_assigns_next_project_ids(sim):
    assert st.add_apps(sim, ["APP3", "APP1", "APP4"]) == {
        "APP1": 1,
        "APP2": 2,
        "APP3": 3,
        "APP4": 4,
    }


@pytest.mark.parametrize("bad", ["", "has space", "a/b", "x\n", 7])
def test_bad_appid_is_refused(sim, bad):
    with pytest.raises(ValueError):  # noqa: PT011
        st.add_apps(sim, [bad])


def test_generate_replaces_previous_key_and_counts(sim):
    first = st.generate(sim, "app:APP1")
    second = st.generate(sim, "app:APP1")
    root = st.generate(sim, "root")
    assert KEY_RE.fullmatch(first) and KEY_RE.fullmatch(second) and KEY_RE.fullmatch(root)
    assert first != second
    assert st.current_key(sim, "app:APP1") == second
    assert st.current_key(sim, "root") == root
    assert st.current_key(sim, "app:APP2") is None
    assert st.generations(sim, "app:APP1") == 2
    assert st.generations(sim, "root") == 1
    assert st.generations(sim, "app:APP2") == 0
    assert st.generations(sim) == 3
    # atomic writes leave no temporary files behind
    assert sorted(os.listdir(sim)) == ["generated.sha256", "keys", "state.json", "state.lock"]
    assert sorted(os.listdir(sim / "keys")) == ["app-APP1", "app-APP2", "root"]
    # every generated key is logged by fingerprint only, so leaks can be found later
    assert len(st.generated_fingerprints(sim)) == 3
    assert st.find_leaks(f"x {second} y {root}", st.generated_fingerprints(sim)) == 2
    assert st.find_leaks("x" * 64, st.generated_fingerprints(sim)) == 0
    assert _mode(sim / "state.json") == 0o600
    assert _mode(sim / "keys") == 0o700 and _mode(sim / "keys" / "app-APP1") == 0o600
    assert second not in (sim / "state.json").read_text()


def test_generate_unknown_app_changes_nothing(sim):
    before = st.read_state(sim)
    with pytest.raises(st.UnknownApp):
        st.generate(sim, "app:NOPE")
    assert st.read_state(sim) == before
    with pytest.raises(st.UnknownApp):
        st.project_id(sim, "NOPE")


@pytest.mark.parametrize("scope", ["app:", "APP1", "app", "Root", None])
def test_bad_scope(sim, scope):
    with pytest.raises(ValueError):  # noqa: PT011
        st.generate(sim, scope)


def test_uninitialised_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        st.read_state(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not initialised"):
        st.generate(tmp_path, "root")


def test_threads_generating_at_once_are_serialised(sim):
    keys = []
    threads = [
        threading.Thread(target=lambda: keys.append(st.generate(sim, "root"))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT)
    assert len(set(keys)) == 8
    assert st.generations(sim, "root") == 8
    assert st.current_key(sim, "root") in keys


def test_noise_merge_remove_clear(sim, tmp_path):
    assert st.read_noise(sim) == {}
    st.set_noise(sim, banner=("Welcome",), crlf=True, hold_file=tmp_path / "go")
    st.set_noise(sim, output_mode="two_keys", crlf=None)
    assert st.read_noise(sim) == {
        "banner": ["Welcome"],
        "hold_file": str(tmp_path / "go"),
        "output_mode": "two_keys",
    }
    assert _mode(sim / "noise.json") == 0o600
    st.clear_noise(sim)
    st.clear_noise(sim)  # idempotent
    assert st.read_noise(sim) == {}


def test_noise_validation(sim):
    with pytest.raises(ValueError, match="unknown"):
        st.set_noise(sim, colour=True)
    with pytest.raises(ValueError, match="output_mode"):
        st.set_noise(sim, output_mode="loud")
    with pytest.raises(ValueError, match="fail_apps"):
        st.set_noise(sim, fail_apps="APP1")  # a str would match substrings
    with pytest.raises(ValueError, match="banner"):
        st.set_noise(sim, banner=["ok", 3])
    assert st.read_noise(sim) == {}


def test_install_wrapper_quotes_paths(tmp_path):
    state_dir = tmp_path / "it's a state"
    dest = tmp_path / "bin dir" / "ta-tool"
    st.install_wrapper(dest, state_dir, python="/opt/py thon/python3")
    assert _mode(dest) == 0o755
    lines = dest.read_text().splitlines()
    assert lines[0] == "#!/bin/sh"
    env = ["PYTHONPYCACHEPREFIX=${HOME}/.cache/keyvault-ta-sim", f"TA_SIM_STATE_DIR={state_dir}"]
    assert shlex.split(lines[-1]) == [
        f"PYTHONPATH={Path(st.__file__).parents[2]}",
        *env,
        "exec",
        "/opt/py thon/python3",
        "-P",
        "-S",
        "-c",
        "import sys; from keyvault.sandbox.tatool import main; sys.exit(main())",
        "$@",
    ]
    assert lines[-1].endswith('"$@"')
    st.install_wrapper(dest, state_dir, python="/usr/bin/python3", pythonpath="/src dir")
    assert shlex.split(dest.read_text().splitlines()[-1])[:4] == [
        "PYTHONPATH=/src dir",
        *env,
        "exec",
    ]


def _nobody():
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user")


def test_owner_gets_dir_and_files_and_keeps_them(tmp_path):
    user = _nobody()
    state_dir = tmp_path / "state"
    st.init_state(state_dir, ["APP1"], owner="nobody")
    st.set_noise(state_dir, crlf=True)
    st.generate(state_dir, "root")  # root writes must not steal the files from the owner
    for path in (
        state_dir,
        state_dir / "state.json",
        state_dir / "state.lock",
        state_dir / "noise.json",
    ):
        assert os.stat(path).st_uid == user.pw_uid


def test_install_wrapper_owner_chowns_state(tmp_path):
    user = _nobody()
    state_dir = tmp_path / "state"
    st.init_state(state_dir, ["APP1"])
    st.install_wrapper(tmp_path / "ta-tool", state_dir, owner="nobody")
    assert os.stat(state_dir).st_uid == user.pw_uid
    assert os.stat(state_dir / "state.json").st_uid == user.pw_uid
    with pytest.raises(ValueError, match="no such user"):
        st.init_state(state_dir, owner="no-such-user-kv")


def test_cli(tmp_path, capsys):
    state_dir = str(tmp_path / "state")
    assert st.main(["init", "--state-dir", state_dir, "--apps", "A1, B2,"]) == 0
    assert st.main(["add-apps", "--state-dir", state_dir, "C3"]) == 0
    assert st.project_id(state_dir, "C3") == 3
    st.generate(state_dir, "app:B2")
    capsys.readouterr()
    assert st.main(["generations", "--state-dir", state_dir]) == 0
    assert st.main(["generations", "--state-dir", state_dir, "--scope", "app:A1"]) == 0
    assert capsys.readouterr().out.split() == ["1", "0"]
    assert st.main(["generations", "--state-dir", state_dir, "--scope", "app:ZZ"]) == 1
    assert "ZZ does not exist" in capsys.readouterr().err
    dest = tmp_path / "ta-tool"
    assert st.main(["install", "--dest", str(dest), "--state-dir", state_dir]) == 0
    assert os.access(dest, os.X_OK)
    assert st.generations(state_dir) == 1
    assert json.loads((tmp_path / "state" / "state.json").read_text())["format"] == 2


def test_init_upgrades_a_format_1_state_and_keeps_every_key(tmp_path):
    state_dir = tmp_path / "old"
    state_dir.mkdir(mode=0o700)
    old = {
        "root": {"key": "R" * 64, "generations": 2},
        "total_generations": 3,
        "apps": {
            "A1": {"key": "K" * 64, "generations": 1, "project_id": 4},
            "B2": {"key": None, "generations": 0, "project_id": 7},
        },
    }
    (state_dir / "state.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="old format.*init"):  # noqa: RUF043
        st.read_state(state_dir)
    st.init_state(state_dir, ["C3"])
    state = st.read_state(state_dir)
    assert state["root"] == {"key": "R" * 64, "generations": 2}
    assert state["apps"] == {
        "A1": {"key": "K" * 64, "generations": 1, "project_id": 4},
        "B2": {"key": None, "generations": 0, "project_id": 7},
        "C3": {"key": None, "generations": 0, "project_id": 8},
    }
    assert "K" * 64 not in (state_dir / "state.json").read_text()
