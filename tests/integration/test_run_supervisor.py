"""`keyvault run` against a real `keyvault serve`: the child gets the key in its environment
(and not the keyvault token), a rotation restarts it with the new key (its pid changes; a
child that ignores SIGTERM is killed after --grace) or signals it (--restart signal),
signals sent to `keyvault run` reach the child, and its exit status is passed on (128 + N
when signal N killed it).

The child is a small Python program that records what happens to it in a log file of its
directory: ``start PID`` once its key file ``key-PID`` is written, ``SIGNAME PID`` per signal,
``token-in-env PID`` if any KEYVAULT_* variable reached it.

Also: a SIGTERM that arrives while a rotation restarts the child is not lost (no new child,
the stopped child's status is the exit status), and a token revoked under a running
`keyvault run` stops the child and ends `run` with one error line, never silently.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path

from tests.support.cli import expect
from tests.support.consumers import Consumer, consumer_env, read, token_file, wait_until
from tests.support.http import World

CHILD = """
import os, signal, sys
here, on_term = sys.argv[1], sys.argv[2]
pid = os.getpid()
def log(line):
    with open(os.path.join(here, "log"), "a") as f:
        f.write(f"{line} {pid}\\n")
fd = os.open(os.path.join(here, f"key-{pid}"), os.O_WRONLY | os.O_CREAT, 0o600)
os.write(fd, os.environ.get("TA_API_KEY", "").encode())
os.close(fd)
if any(name.startswith("KEYVAULT_") for name in os.environ):
    log("token-in-env")
terms = []
def on(signum, frame):
    log(signal.Signals(signum).name)
    if signum == signal.SIGTERM:
        terms.append(signum)
        if on_term.startswith("second:"):  # ignore the first SIGTERM, exit on the second
            if len(terms) == 2:
                sys.exit(int(on_term[7:]))
        elif on_term != "ignore":
            sys.exit(int(on_term))
for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
    signal.signal(s, on)
log("start")
while True:
    signal.pause()
"""


def supervise(world: World, tmp_path: Path, *options: str, on_term: str = "0", env=None):
    args = ["--cluster", "c", "--appid", "a1", "--env", "TA_API_KEY", "--wait", "5", *options]
    if env is None:
        args = ["--addr", world.url, "--token-file", str(token_file(world, tmp_path)), *args]
    command = ["--", sys.executable, "-c", CHILD, str(tmp_path), on_term]
    return Consumer.start(tmp_path, "run", *args, *command, env=env)


def starts(tmp_path: Path) -> list[int]:
    return [int(line.split()[1]) for line in read(tmp_path / "log").splitlines() if "start" in line]


def started(tmp_path: Path, count: int):
    return lambda: starts(tmp_path)[count - 1] if len(starts(tmp_path)) >= count else None


def key_of(tmp_path: Path, pid: int) -> str:
    return read(tmp_path / f"key-{pid}")


def test_run_passes_the_key_and_restarts_the_child_on_rotation(served: World, tmp_path):
    world = served
    token = world.create_token("run-env", "app:c/a1")
    env = consumer_env({"KEYVAULT_ADDR": f"{world.url}", "KEYVAULT_TOKEN": token})
    env["KEYVAULT_TOKEN_FILE"] = str(token_file(world, tmp_path))  # KEYVAULT_TOKEN wins
    proc = supervise(world, tmp_path, "--restart", "restart", "--grace", "120", env=env)
    try:
        first = wait_until(started(tmp_path, 1), "the first child", proc)
        ok = key_of(tmp_path, first) == world.keys[("c", "app:a1")]
        assert ok
        world.import_key("c", "app:a1")
        second = wait_until(started(tmp_path, 2), "the restarted child", proc)
        ok = key_of(tmp_path, second) == world.keys[("c", "app:a1")]
        assert ok and second != first
        assert f"SIGTERM {first}" in read(tmp_path / "log")
    finally:
        status = proc.stop()
    assert status == 0, proc.log()
    log = read(tmp_path / "log")
    assert f"SIGTERM {second}" in log and "token-in-env" not in log
    assert not world.holds_key(read(proc.stderr)), "a key in keyvault run's output"


def test_run_kills_a_child_that_ignores_sigterm_after_the_grace_period(served: World, tmp_path):
    world = served
    proc = supervise(world, tmp_path, "--grace", "0.5", on_term="ignore")
    try:
        first = wait_until(started(tmp_path, 1), "the first child", proc)
        world.import_key("c", "app:a1")
        second = wait_until(started(tmp_path, 2), "the restarted child", proc)
        assert second != first
        ok = key_of(tmp_path, second) == world.keys[("c", "app:a1")]
        assert ok
        proc.signal(signal.SIGKILL)  # the child ignores TERM: end both for the teardown
        proc.wait()
    finally:
        import os

        for pid in starts(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert "did not stop within 0.5s: SIGKILL" in read(proc.stderr)


def test_run_signals_the_child_on_rotation(served: World, tmp_path):
    world = served
    proc = supervise(world, tmp_path, "--restart", "signal", "--signal", "USR1")
    try:
        first = wait_until(started(tmp_path, 1), "the child", proc)
        world.import_key("c", "app:a1")
        wait_until(lambda: f"SIGUSR1 {first}" in read(tmp_path / "log"), "the signal", proc)
        assert starts(tmp_path) == [first] and proc.proc.poll() is None
    finally:
        assert proc.stop() == 0, proc.log()


def test_run_forwards_signals_and_passes_the_exit_status_on(served: World, tmp_path):
    world = served
    proc = supervise(world, tmp_path, on_term="7")
    child = wait_until(started(tmp_path, 1), "the child", proc)
    proc.signal(signal.SIGHUP)
    wait_until(lambda: f"SIGHUP {child}" in read(tmp_path / "log"), "the forwarded HUP", proc)
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 7, proc.log()
    assert f"SIGTERM {child}" in read(tmp_path / "log")

    tokens = str(token_file(world, tmp_path))
    base = ["--addr", world.url, "--token-file", tokens, "--cluster", "c", "--root"]
    base += ["--env", "K", "--", sys.executable, "-c"]
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    proc = Consumer.start(tmp_path, "run", *base, killed)
    assert proc.wait() == 128 + signal.SIGKILL, proc.log()
    proc = Consumer.start(tmp_path, "run", *base, "raise SystemExit(3)")
    assert proc.wait() == 3, proc.log()


def test_run_refuses_to_start_without_its_key(served: World, tmp_path):
    world = served
    world.server.stop()
    proc = supervise(world, tmp_path)
    assert proc.wait() == 1
    assert read(proc.stderr).startswith("error: cannot reach keyvault"), proc.log()
    assert starts(tmp_path) == []


def test_run_does_not_restart_when_told_to_stop_during_a_restart(served: World, tmp_path):
    world = served
    # The child ignores the restart's SIGTERM; ours reaches it during the grace period.
    proc = supervise(world, tmp_path, "--grace", "600", on_term="second:5")
    first = wait_until(started(tmp_path, 1), "the child", proc)
    world.import_key("c", "app:a1")
    wait_until(lambda: f"SIGTERM {first}" in read(tmp_path / "log"), "the restart's TERM", proc)
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 5, proc.log()
    assert starts(tmp_path) == [first], "a new child was started after SIGTERM"
    assert read(tmp_path / "log").count(f"SIGTERM {first}") == 2


def test_run_stops_the_child_and_fails_when_its_token_is_revoked(served: World, tmp_path):
    world = served
    world.create_token("run-revoked", "app:c/a1")
    tokens = token_file(world, tmp_path, "run-revoked")
    args = ["--addr", world.url, "--token-file", str(tokens), "--cluster", "c", "--appid", "a1"]
    args += ["--env", "TA_API_KEY", "--wait", "1", "--grace", "600"]
    command = ["--", sys.executable, "-c", CHILD, str(tmp_path), "0"]
    proc = Consumer.start(tmp_path, "run", *args, *command)
    child = wait_until(started(tmp_path, 1), "the child", proc)
    expect(world.cli("token", "revoke", "run-revoked", "--yes"))
    assert proc.wait() == 1, proc.log()
    assert f"SIGTERM {child}" in read(tmp_path / "log")
    errors = [line for line in read(proc.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no longer following rotations" in errors[0], proc.log()
    assert "401" in errors[0], proc.log()
