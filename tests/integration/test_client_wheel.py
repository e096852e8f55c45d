"""The light client distribution as a consumer installs it: the wheel built from
clients/python, installed into a fresh venv with no package index (so pip cannot pull
anything in), imports without the server stack and works against a real `keyvault serve`:
``Client.get_app``, ``watch()`` seeing a rotation, and ``keyvault-agent --once``.

Building the wheel needs the build backend (hatchling) from the package index, like CI's
wheel check of the server distribution.
"""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.support.consumers import CLIENT_PROJECT, read, token_file
from tests.support.http import World
from tests.support.timeouts import TIMEOUT

pytestmark = pytest.mark.slow
SERVER_STACK = ("keyvault", "sqlalchemy", "paramiko", "fastapi", "uvicorn", "cryptography")

CHECK = """
import importlib.util, sys, threading
server = [m for m in sys.argv[3].split(",") if importlib.util.find_spec(m) is not None]
assert not server, f"server packages importable: {server}"
from keyvault_client import Client
kv = Client(sys.argv[1], token_file=sys.argv[2], consumer="wheel-check")
info = kv.get_app("c", "a1")
print("version", info.version, "stale", info.stale, flush=True)
changes = kv.watch(wait=5)
sys.stdin.readline()  # the test rotates the key, then writes a line
change = next(changes)
print("rotated", change.version, change.previous_version, flush=True)
"""


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=TIMEOUT, check=False, **kwargs
    )


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("client-wheel")
    built = _run(
        sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(CLIENT_PROJECT),
        "-w", str(where / "dist"),
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    wheels = list((where / "dist").glob("ta_keyvault_client-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        assert "Requires-Dist" not in wheel.read(metadata).decode()  # standard library only
    assert all(n.startswith(("keyvault_client/", "ta_keyvault_client-")) for n in names), names
    venv.EnvBuilder(with_pip=True, clear=True).create(where / "venv")
    python = where / "venv" / "bin" / "python"
    installed = _run(
        str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheels[0])
    )  # --no-deps: nothing but this wheel is installed
    assert installed.returncode == 0, installed.stderr[-2000:]
    return where / "venv"


def test_the_client_wheel_installs_alone_and_works_against_serve(
    client_venv: Path, served: World, tmp_path
):
    world = served
    python, bin_dir = client_venv / "bin" / "python", client_venv / "bin"
    token = str(token_file(world, tmp_path))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no PYTHONPATH to the sources
    listed = _run(str(python), "-m", "pip", "list", "--format=freeze", env=env)
    names = {line.split("==")[0].lower() for line in listed.stdout.splitlines()}
    assert "ta-keyvault-client" in names and not names & {"sqlalchemy", "paramiko", "fastapi"}

    proc = subprocess.Popen(
        [str(python), "-c", CHECK, world.url, token, ",".join(SERVER_STACK)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        first = proc.stdout.readline()
        assert first == "version 1 stale False\n", first or proc.stderr.read()
        world.import_key("c", "app:a1")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "rotated 2 1\n"
    finally:
        proc.kill()
        proc.communicate(timeout=TIMEOUT)

    target = tmp_path / "ta.key"
    agent = _run(
        str(bin_dir / "keyvault-agent"), "--addr", world.url, "--token-file", token,
        "--cluster", "c", "--appid", "a1", "--file", str(target), "--once", env=env,
    )  # fmt: skip
    assert agent.returncode == 0, agent.stderr[-1500:]
    ok = read(target) == world.keys[("c", "app:a1")] + "\n"
    assert ok and not world.holds_key(agent.stdout + agent.stderr)
    helped = _run(str(bin_dir / "keyvault-run"), "--help", env=env)
    assert helped.returncode == 0 and "--restart" in helped.stdout
