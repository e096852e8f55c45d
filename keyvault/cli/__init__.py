"""The ``keyvault`` command line. Commands are thin: parse, call a service, print.

Heavy libraries (sqlalchemy, paramiko, cryptography) are imported inside the
commands that use them, so ``keyvault --help`` stays instant.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import IO, Any, cast

import click

from keyvault import __version__
from keyvault.errors import KeyvaultError
from keyvault.logs import FORMATS as LOG_FORMATS
from keyvault.textsafe import safe_line

# A group called without a command: click shows its help (not an error to shorten).
_NO_ARGS_IS_HELP: tuple[type[Exception], ...] = tuple(
    c for c in (getattr(click.exceptions, "NoArgsIsHelpError", None),) if c is not None
)


def _usage_error(ctx: click.Context, exc: click.UsageError) -> None:
    """One line, like every other error, naming where to read more; exit 2."""
    if isinstance(exc, _NO_ARGS_IS_HELP):
        raise exc
    where = exc.ctx.command_path if exc.ctx is not None else "keyvault"
    message = safe_line(exc.format_message().rstrip("."))
    click.echo(f"error: {message}; see `{where} --help`", err=True)
    ctx.exit(2)


class KeyvaultGroup(click.Group):
    """Turns ``KeyvaultError`` (and a declined confirmation) into one line on stderr and its exit code."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # The group's own options (--log-format, -v) are parsed here, before invoke.
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            _usage_error(ctx, exc)
            raise AssertionError("unreachable") from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyvaultError as exc:
            # A message may carry remote text (ta-tool output, a TA answer, a stored name):
            # shown without its terminal sequences and with every control escaped.
            click.echo(f"error: {safe_line(str(exc))}", err=True)
            ctx.exit(exc.exit_code)
        except click.UsageError as exc:
            _usage_error(ctx, exc)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except click.Abort:
            # A declined confirmation (or end of input at a prompt): nothing was done.
            click.echo(
                "error: not confirmed, nothing was changed; pass --yes to skip the question",
                err=True,
            )
            ctx.exit(1)
        except (click.ClickException, click.exceptions.Exit, SystemExit):
            raise
        except Exception as exc:  # a bug: say so without dumping locals or secrets
            if os.environ.get("KEYVAULT_DEBUG"):
                raise
            click.echo(
                f"error: internal error ({type(exc).__name__}); rerun with KEYVAULT_DEBUG=1 for a traceback",
                err=True,
            )
            ctx.exit(1)


@click.group(
    "keyvault", cls=KeyvaultGroup, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(version=__version__, prog_name="keyvault")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    envvar="KEYVAULT_LOG_FORMAT",
    show_default=True,
    show_envvar=True,
    help="Log lines on stderr as text or as one JSON object each (for collectors).",
)
@click.pass_context
def main(ctx: click.Context, verbose: int, log_format: str) -> None:
    """keyvault: keep, rotate and serve the API keys of a self-hosted TA cluster."""
    import logging

    from keyvault import logs
    from keyvault.cli.context import AppContext

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    ctx.call_on_close(_logging_restorer())  # registered first: runs after the context closes
    logs.configure(log_format, level=level, stream=cast(IO[str], _CurrentStderr()))
    ctx.obj = AppContext()
    ctx.call_on_close(ctx.obj.close)


def _logging_restorer() -> Callable[[], None]:
    """Undo `logs.configure` when the command ends, so one in-process run (tests, an
    embedding program) does not leave its handler and levels behind for the next."""
    import logging

    root, paramiko = logging.getLogger(), logging.getLogger("paramiko")
    levels = root.level, paramiko.level
    before = [h for h in root.handlers if h.get_name() == "keyvault"]

    def restore() -> None:
        for handler in [h for h in root.handlers if h.get_name() == "keyvault"]:
            root.removeHandler(handler)
        for handler in before:
            root.addHandler(handler)
        root.setLevel(levels[0])
        paramiko.setLevel(levels[1])

    return restore


class _CurrentStderr:
    """Whatever ``sys.stderr`` is when a record is written (a test runner swaps it per run)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


# Each module exports COMMANDS; importing them costs only click (heavy imports are lazy).
COMMAND_MODULES = (
    "init",
    "db",
    "master_key",
    "cluster",
    "host",
    "import_",
    "secrets",
    "rotate",
    "rotations",
    "consumers",
    "verify",
    "policy",
    "serve",
    "token",
    "audit",
    "webhook",
    "backup",
    "sandbox",
    "status",
    "completion",
    "agent",
    "run",
)


def _register() -> None:
    import importlib

    for name in COMMAND_MODULES:
        for command in importlib.import_module(f"keyvault.cli.{name}").COMMANDS:
            main.add_command(command)


_register()


def exit_status(exc: SystemExit) -> int:
    """The process exit status Python would give for ``exc`` (printing a message if it has one)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def run() -> None:
    """The ``keyvault`` executable: run the CLI, then end the process without a teardown.

    Python's shutdown frees every object of every loaded module one by one: with
    SQLAlchemy, paramiko and cryptography loaded that takes 0.1-0.25 s, longer than many
    commands. By the time a command returns, it has committed and closed its work (the
    context disposes of the engine and the SSH connections); the atexit handlers still run
    (logging, paramiko's thread join) and output is flushed. A command that leaves a
    non-daemon thread running gets the normal shutdown, which waits for it.
    """
    import atexit
    import threading

    from keyvault.cli.completion import COMPLETE_VAR

    try:
        # Named explicitly: `python -m keyvault` would otherwise call itself "python -m
        # keyvault", and shell completion would listen for another variable.
        main(prog_name="keyvault", complete_var=COMPLETE_VAR)
        status = 0
    except SystemExit as exc:
        status = exit_status(exc)
    if any(
        t.is_alive() and not t.daemon
        for t in threading.enumerate()
        if t is not threading.main_thread()
    ):
        sys.exit(status)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            # What Python does when stdout cannot be flushed at exit (a closed pipe, say).
            status = 120
    os._exit(status)


if __name__ == "__main__":  # pragma: no cover
    run()
