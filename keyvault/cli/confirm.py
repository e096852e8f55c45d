"""Asking before a destructive command, the same way everywhere.

``--yes`` skips the question (scripts, timers). Without it the command needs a terminal:
on a pipe it stops with a usage error rather than guessing. Declining raises
``click.Abort``, which the CLI group turns into one ``error:`` line and exit 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def yes_option(func: F) -> F:
    """Add ``--yes`` (do not ask) to a command."""
    return click.option("--yes", is_flag=True, help="Do not ask for confirmation (for scripts).")(
        func
    )


def confirm(yes: bool, *, command: str, warning: str, question: str) -> None:
    """Return if ``yes`` or the person at the terminal agrees; otherwise stop the command."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(
            f"{command} needs confirmation: pass --yes when not running on a terminal"
        )
    click.echo(warning, err=True)
    click.confirm(question, abort=True, err=True)
