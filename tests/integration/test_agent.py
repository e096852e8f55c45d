"""`keyvault agent` against a real `keyvault serve` (SQLite and PostgreSQL): it writes the key
file (mode 0600), rewrites it when a rotation is stored by another process, runs --on-change
exactly once per change, keeps the old file while keyvault is down and catches up after it
restarts, fails over across --addr, refuses an unwritable directory with one line (old file
kept), and --once renders and exits.

Rotations are new versions stored through the CLI (`keyvault import`, which records the
`secret.rotated` event the agent follows). Files are compared with the World's keys without
ever showing one (``ok = a == b; assert ok``).
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import stat
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.consumers import (
    Consumer,
    consumer_env,
    read,
    restart_on_same_port,
    token_file,
    wait_until,
)
from tests.support.http import World, free_port

# The on-change command: appends one line per run to the counter file (no shell).
COUNT = "import sys; open(sys.argv[1], 'a').write('changed\\n')"


def agent(world: World, tmp_path: Path, target: Path, *args: str, addr=None) -> Consumer:
    addrs = addr or [world.url]
    options = [a for url in addrs for a in ("--addr", url)]
    options += ["--token-file", str(token_file(world, tmp_path)), "--cluster", "c"]
    return Consumer.start(tmp_path, "agent", *options, "--file", str(target), "--wait", "5", *args)


def holds(path: Path, world: World, scope: str, fmt: str = "{key}\n") -> bool:
    return read(path) == fmt.format(key=world.keys[("c", scope)])


def on_change(counter: Path) -> str:
    return shlex.join([sys.executable, "-c", COUNT, str(counter)])


def lines(path: Path) -> int:
    return len(read(path).splitlines())


def test_agent_writes_the_file_and_rewrites_it_once_per_rotation(served: World, tmp_path):
    world = served
    target, counter = tmp_path / "out" / "ta.key", tmp_path / "changes"
    proc = agent(world, tmp_path, target, "--appid", "a1", "--on-change", on_change(counter))
    try:
        wait_until(lambda: holds(target, world, "app:a1"), "the first key file", proc)
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        wait_until(lambda: lines(counter) == 1, "the first on-change run", proc)
        for expected in (2, 3):
            world.import_key("c", "app:a2")  # another scope: not this file's business
            world.import_key("c", "app:a1")
            wait_until(lambda: holds(target, world, "app:a1"), "the rotated key file", proc)
            wait_until(lambda n=expected: lines(counter) == n, "the on-change run", proc)
    finally:
        status = proc.stop()
    assert status == 0, proc.log()
    assert lines(counter) == 3  # exactly once per change, nothing after
    assert not world.holds_key(read(proc.stderr)), "a key in the agent's output"
    assert "wrote" in read(proc.stderr)


def test_agent_keeps_the_file_while_serve_is_down_and_catches_up(served: World, tmp_path):
    world = served
    target = tmp_path / "ta.key"
    proc = agent(world, tmp_path, target, "--root")
    try:
        wait_until(lambda: holds(target, world, "root"), "the first key file", proc)
        before = read(target)
        world.server.stop()
        world.import_key("c", "root")  # stored while no server runs: no one told the agent
        ok = read(target) == before
        assert ok and proc.proc.poll() is None
        restart_on_same_port(world)
        wait_until(lambda: holds(target, world, "root"), "the key rotated during the outage", proc)
        world.import_key("c", "root")  # and it follows the feed again afterwards
        wait_until(lambda: holds(target, world, "root"), "the next rotation", proc)
    finally:
        assert proc.stop() == 0, proc.log()
    assert "unreachable" in read(proc.stderr) and "reachable again" in read(proc.stderr)


def test_agent_fails_over_from_a_dead_first_address(served: World, tmp_path):
    world = served
    target = tmp_path / "ta.env"
    dead = f"http://127.0.0.1:{free_port()}"
    proc = agent(
        world, tmp_path, target, "--appid", "a1", "--format", "env", addr=[dead, world.url]
    )
    env_line = "TA_API_KEY={key}\n"
    try:
        wait_until(lambda: holds(target, world, "app:a1", env_line), "the env file", proc)
        world.import_key("c", "app:a1")
        wait_until(lambda: holds(target, world, "app:a1", env_line), "the rotated env", proc)
    finally:
        assert proc.stop() == 0, proc.log()


def test_agent_once_renders_and_exits_and_fails_when_keyvault_is_down(served: World, tmp_path):
    world = served
    target = tmp_path / "ta.json"
    proc = agent(world, tmp_path, target, "--appid", "a1", "--format", "json", "--once")
    assert proc.wait() == 0, proc.log()
    body = json.loads(read(target))
    ok = body["key"] == world.keys[("c", "app:a1")]
    assert ok and (body["cluster"], body["scope"], body["version"]) == ("c", "app:a1", 1)
    template = tmp_path / "app.properties.tmpl"
    template.write_text("ta.cluster=$cluster\nta.version=$version\nta.key=$key\n")
    props = tmp_path / "app.properties"
    proc = agent(
        world, tmp_path, props, "--appid", "a1", "--template", str(template), "--mode", "0640",
        "--once",
    )  # fmt: skip
    assert proc.wait() == 0, proc.log()
    expected = "ta.cluster=c\nta.version=1\nta.key={key}\n"
    assert holds(props, world, "app:a1", expected)
    assert stat.S_IMODE(props.stat().st_mode) == 0o640

    world.server.stop()
    before = read(target)
    proc = agent(world, tmp_path, target, "--appid", "a1", "--format", "json", "--once")
    assert proc.wait() == 1
    ok = read(target) == before
    assert ok and read(proc.stderr).startswith("error: cannot reach keyvault"), proc.log()
    assert len(read(proc.stderr).splitlines()) == 1, proc.log()


def test_agent_config_follows_several_keys(served: World, tmp_path):
    world = served
    first, second = tmp_path / "a1.key", tmp_path / "root.env"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'addr = ["{world.url}"]\n'
        f'token_file = "{token_file(world, tmp_path)}"\n'
        f'consumer = "test-agent"\n'
        f'[[key]]\ncluster = "c"\nappid = "a1"\nfile = "{first}"\n'
        f'[[key]]\ncluster = "c"\nroot = true\nfile = "{second}"\nformat = "env"\n'
        f'env_name = "TA_ROOT_KEY"\n'
    )
    proc = Consumer.start(tmp_path, "agent", "--config", str(config), "--wait", "5")
    try:
        wait_until(lambda: holds(first, world, "app:a1"), "the app key file", proc)
        wait_until(lambda: holds(second, world, "root", "TA_ROOT_KEY={key}\n"), "root", proc)
        world.import_key("c", "root")
        wait_until(lambda: holds(second, world, "root", "TA_ROOT_KEY={key}\n"), "rotated", proc)
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.mark.parametrize("once", [False, True])
def test_agent_refuses_an_unwritable_directory_and_keeps_the_old_file(
    served: World, tmp_path, once
):
    world = served
    # As root every directory is writable: the agent then runs as nobody, from a directory
    # nobody may enter but not write.
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="kv-agent-ro-")) if as_root else tmp_path
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir()
        target = locked / "ta.key"
        target.write_text("old content\n")
        target.chmod(0o644)
        locked.chmod(0o755 if as_root else 0o555)
        token = token_file(world, base)
        token.chmod(0o644 if as_root else 0o600)
        args = ["--addr", world.url, "--token-file", str(token), "--cluster", "c"]
        args += ["--appid", "a1", "--file", str(target)] + (["--once"] if once else [])
        popen = {"user": 65534, "group": 65534, "extra_groups": []} if as_root else {}
        proc = Consumer.start(base, "agent", *args, env=consumer_env(), **popen)
        status = proc.wait()
        out = read(proc.stderr).strip().splitlines()
        assert status == 1 and len(out) == 1, proc.log()
        assert out[0].startswith(f"error: cannot write {target}: ") and "old file is kept" in out[0]
        assert read(target) == "old content\n"
    finally:
        (base / "locked").chmod(0o755)
        if as_root:
            import shutil

            shutil.rmtree(base)


# The on-change command of the tests below: appends a line per run ("env" if any KEYVAULT_*
# variable reached it) and fails its first run.
FLAKY = """
import os, sys
with open(sys.argv[1], "a") as f:
    f.write("env\\n" if any(n.startswith("KEYVAULT_") for n in os.environ) else "ran\\n")
with open(sys.argv[1]) as f:
    sys.exit(1 if len(f.read().splitlines()) == 1 else 0)
"""


def test_agent_once_runs_a_missed_on_change_and_fixes_mode_owner_and_directories(
    served: World, tmp_path
):
    world = served
    target, counter = tmp_path / "ta.key", tmp_path / "changes"
    proc = agent(world, tmp_path, target, "--appid", "a1", "--mode", "0644", "--once")
    assert proc.wait() == 0, proc.log()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    # As if the agent had been killed between the write and --on-change: no marker yet.
    once = ["--appid", "a1", "--mode", "0600", "--on-change", on_change(counter), "--once"]
    proc = agent(world, tmp_path, target, *once)
    assert proc.wait() == 0, proc.log()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600, "a changed --mode was not applied"
    assert lines(counter) == 1, "the missed on-change did not run"
    marker = tmp_path / ".ta.key.applied"
    assert stat.S_IMODE(marker.stat().st_mode) == 0o600
    assert not world.holds_key(read(marker)), "a key in the marker"
    proc = agent(world, tmp_path, target, *once)
    assert proc.wait() == 0, proc.log()
    assert lines(counter) == 1, "on-change ran again for an unchanged, applied file"

    nobody = pwd.getpwnam("nobody")
    owned = tmp_path / "new" / "dir" / "ta.key"
    proc = agent(world, tmp_path, owned, "--appid", "a1", "--owner", "nobody", "--once")
    assert proc.wait() == 0, proc.log()
    for path in (owned, owned.parent, owned.parent.parent):
        assert (path.stat().st_uid, path.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert stat.S_IMODE(owned.parent.stat().st_mode) == 0o700

    failing = shlex.join([sys.executable, "-c", "raise SystemExit(3)"])
    other = tmp_path / "other.key"
    proc = agent(world, tmp_path, other, "--appid", "a1", "--on-change", failing, "--once")
    assert proc.wait() == 1, proc.log()
    errors = [x for x in read(proc.stderr).splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "on-change command failed" in errors[0], proc.log()
    assert not (tmp_path / ".other.key.applied").exists()


def test_agent_retries_a_failed_on_change_without_keyvault_variables(served: World, tmp_path):
    world = served
    target, counter = tmp_path / "ta.key", tmp_path / "changes"
    command = shlex.join([sys.executable, "-c", FLAKY, str(counter)])
    options = ["--addr", world.url, "--token-file", str(token_file(world, tmp_path))]
    options += ["--cluster", "c", "--appid", "a1", "--file", str(target), "--wait", "5"]
    env = consumer_env({"KEYVAULT_ADDR": world.url, "KEYVAULT_TOKEN_FILE": "/nonexistent"})
    proc = Consumer.start(tmp_path, "agent", *options, "--on-change", command, env=env)
    try:
        wait_until(lambda: lines(counter) >= 2, "the retried on-change", proc)
        wait_until((tmp_path / ".ta.key.applied").exists, "the applied marker", proc)
    finally:
        status = proc.stop()
    assert status == 0, proc.log()
    assert read(counter) == "ran\nran\n", "a KEYVAULT_* variable reached on-change"
    assert "retrying in" in read(proc.stderr)
