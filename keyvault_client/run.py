"""``keyvault-run`` (``keyvault run``): run a command with the key in its environment, and
restart or signal it when the key rotates.

    keyvault-run --addr http://kv1:8200 --token-file /etc/app/kv-token \\
        --cluster prod --appid APP1 --env TA_API_KEY --restart restart --grace 20 \\
        -- /opt/app/bin/server --port 8080

The child inherits stdin, stdout and stderr; SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1,
SIGUSR2 and SIGWINCH sent to keyvault-run are passed on to it. When the child exits,
keyvault-run exits with its status (128 + the signal number when a signal ended it).

On rotation (followed like the agent does: events by long-poll, revalidation after an
outage): ``--restart restart`` (default) sends SIGTERM, waits ``--grace`` seconds, sends
SIGKILL if it is still there, and starts the command again with the new key;
``--restart signal`` sends ``--signal`` (default HUP) and leaves the child running: for a
program that reloads the key itself (from a file the agent keeps, or keyvault's API).

SIGTERM, SIGINT and SIGQUIT mean "stop": one that arrives while a rotation restarts the
child is passed on as well, and the child is not started again; keyvault-run exits with the
status of the child it stopped. (SIGHUP is only passed on: many programs reload on it.)

While keyvault cannot be reached, or answers 429, a redirect or a malformed body, the watch
retries with capped jittered backoff and the child keeps running with the key it has. When
keyvault refuses for good (401, 403, 404: the token or the scope is gone) or the watch fails
in any other unexpected way, keyvault-run stops the child (SIGTERM, ``--grace``, SIGKILL)
and exits 1 with one ``error:`` line: a child left on a key nobody follows any more would
fail silently at the next rotation.

Only the child's environment holds the key (never argv, never a log line); every
``KEYVAULT_*`` variable (token, token file, address) is removed from it. If keyvault cannot
be reached at start, keyvault-run fails (exit 1) rather than start the command without its key.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

from keyvault_client.agent import Parser, child_environment, setup_logging
from keyvault_client.client import Client, KeyInfo, Rotation, scope_of
from keyvault_client.errors import InvalidInput, KeyvaultError

log = logging.getLogger("keyvault_client.run")
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
# Signals that mean "stop": after one, a child stopped for a restart is not started again.
TERMINATING = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})


class WatchFailed:
    """From the watch thread: it ended (a refused token, a bug); ``run`` must end too."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        self.message = message
        self.exit_code = exit_code


def exit_status(returncode: int) -> int:
    """A shell's view of a child's end: its code, or 128 + the signal that killed it."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """The child process, restarted or signalled on rotation."""

    def __init__(
        self,
        command: list[str],
        env_name: str,
        *,
        mode: str,
        reload_signal: int,
        grace: float,
    ) -> None:
        self.command = command
        self.env_name = env_name
        self.mode = mode
        self.reload_signal = reload_signal
        self.grace = grace
        self.child: subprocess.Popen[bytes] | None = None
        self.version: int | None = None
        # The first terminating signal received (set by the handler, in the main thread).
        self.terminating: int | None = None
        # (child, returncode) from the reaper thread, a Rotation or WatchFailed from the
        # watch thread: the main thread handles them, one at a time.
        self.inbox: queue.Queue[tuple[subprocess.Popen[bytes], int] | Rotation | WatchFailed] = (
            queue.Queue()
        )

    def start(self, info: KeyInfo) -> None:
        env = child_environment()
        env[self.env_name] = info.key
        try:
            child = subprocess.Popen(self.command, env=env)
        except OSError as exc:
            raise KeyvaultError(
                f"cannot start {self.command[0]}: {exc.strerror or exc}",
                hint="give the command's path, or make sure it is on PATH",
            ) from None
        self.child, self.version = child, info.version
        if self.terminating is not None:  # arrived while it was starting: it was not passed on
            self.forward(self.terminating)
        log.info(
            "started %s (pid %d) with %s version %d",
            self.command[0],
            child.pid,
            info.scope,
            info.version,
        )
        threading.Thread(target=self._reap, args=(child,), daemon=True).start()

    def _reap(self, child: subprocess.Popen[bytes]) -> None:
        self.inbox.put((child, child.wait()))

    def on_signal(self, signum: int, _frame: object = None) -> None:
        """The handler of every forwarded signal: remember a terminating one, pass it on."""
        if signum in TERMINATING and self.terminating is None:
            self.terminating = signum
        self.forward(signum)

    def forward(self, signum: int) -> None:
        child = self.child
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    def supervise(self) -> int:
        """Handle exits and rotations until the child exits on its own; its exit status."""
        while True:
            item = self.inbox.get()
            if isinstance(item, WatchFailed):
                return self._watch_failed(item)
            if isinstance(item, Rotation):
                status = self._rotated(item)
                if status is not None:
                    return status
            elif item[0] is self.child:
                return exit_status(item[1])

    def _rotated(self, rotation: Rotation) -> int | None:
        if rotation.version == self.version:
            return None
        if self.mode == "signal":
            log.info(
                "key rotated to version %d: sending %s",
                rotation.version,
                signal.Signals(self.reload_signal).name,
            )
            self.forward(self.reload_signal)
            self.version = rotation.version
            return None
        log.info("key rotated to version %d: restarting %s", rotation.version, self.command[0])
        returncode, on_its_own = self._stop_child()
        if on_its_own or self.terminating is not None:
            # Exited by itself, or we were told to stop meanwhile: no new child.
            return exit_status(returncode)
        self.start(rotation.key)
        return None

    def _watch_failed(self, failure: WatchFailed) -> int:
        child = self.child
        if child is not None and child.poll() is None:
            log.warning(
                "stopping %s (pid %d): its key is no longer followed", self.command[0], child.pid
            )
            self._stop_child()
        print(f"error: {failure.message}", file=sys.stderr)
        return failure.exit_code

    def _stop_child(self) -> tuple[int, bool]:
        """SIGTERM, ``grace`` seconds, SIGKILL. Returns the child's return code, and whether
        it had already exited on its own before we asked (then it is not restarted)."""
        child = self.child
        assert child is not None
        if child.poll() is not None:
            return child.returncode, True
        self.forward(signal.SIGTERM)
        try:
            child.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %gs: SIGKILL", self.command[0], self.grace)
            self.forward(signal.SIGKILL)
            child.wait()
        self.child = None  # its exit message is now ignored
        return child.returncode, False


def _watch(client: Client, supervisor: Supervisor, scope: tuple[str, str], wait: float) -> None:
    """The watch thread. It retries transient failures itself (``Follower``); whatever ends
    it is fatal for ``run``, and reported, never silent."""
    try:
        for rotation in client.watch([scope], wait=wait):
            supervisor.inbox.put(rotation)
        failure = WatchFailed("the rotation watch ended unexpectedly; keyvault-run stops")
    except KeyvaultError as exc:
        failure = WatchFailed(
            f"no longer following rotations of {scope[1]} in {scope[0]}: "
            f"{' '.join(str(exc).split())}; the child was stopped",
            exc.exit_code,
        )
    except Exception as exc:  # noqa: BLE001 - a bug here must end run loudly, not silently
        failure = WatchFailed(
            f"the rotation watch failed ({type(exc).__name__}); the child was stopped"
        )
    supervisor.inbox.put(failure)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description="Run COMMAND with a TA key in its environment; restart or signal it on rotation.",
    )
    p.add_argument(
        "--addr",
        action="append",
        help="keyvault URL (repeat to fail over; default KEYVAULT_ADDR, comma-separated)",
    )
    p.add_argument(
        "--token-file",
        help="file holding the token (default KEYVAULT_TOKEN, then KEYVAULT_TOKEN_FILE)",
    )
    p.add_argument("--cluster", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--appid")
    which.add_argument("--root", action="store_true")
    p.add_argument("--env", required=True, dest="env_name", help="variable holding the key")
    p.add_argument("--restart", choices=("restart", "signal"), default="restart")
    p.add_argument("--signal", default="HUP", help="signal for --restart signal (default HUP)")
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds between SIGTERM and SIGKILL on restart (default 10)",
    )
    p.add_argument("--consumer", help="name sent as X-Keyvault-Consumer (default: host name)")
    p.add_argument("--wait", type=float, default=25.0, help=argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    return p


def _signal_number(name: str) -> int:
    text = name.upper().removeprefix("SIG")
    try:
        return int(signal.Signals[f"SIG{text}"])
    except KeyError:
        raise InvalidInput(f"unknown signal {name[:20]!r}", hint="e.g. HUP, USR1, TERM") from None


def main(argv: Sequence[str] | None = None, *, prog: str = "keyvault-run") -> int:
    """The command; returns the exit status (the child's, once it ran)."""
    args = build_parser(prog).parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    setup_logging(args.quiet)
    try:
        if not command:
            raise InvalidInput("no command to run", hint="put it after --: keyvault run ... -- CMD")
        if not args.env_name.isidentifier():
            raise InvalidInput(f"invalid --env name {args.env_name[:40]!r}")
        if args.grace < 0:
            raise InvalidInput("--grace cannot be negative")
        supervisor = Supervisor(
            command,
            args.env_name,
            mode=args.restart,
            reload_signal=_signal_number(args.signal),
            grace=args.grace,
        )
        client = Client(args.addr, token_file=args.token_file, consumer=args.consumer)
        scope = (args.cluster, scope_of(args.appid))
        info = client.get(*scope)
        for signum in FORWARDED:
            signal.signal(signum, supervisor.on_signal)
        supervisor.start(info)
    except KeyvaultError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    threading.Thread(
        target=_watch, args=(client, supervisor, scope, args.wait), daemon=True
    ).start()
    return supervisor.supervise()


def run() -> None:
    """The ``keyvault-run`` console script."""
    sys.exit(main())
